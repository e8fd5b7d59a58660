"""Checkpoint layouts → canonical (BFL) tensor names, the reverse maps, and strict key checks.

Numpy only. Canonical names are BFL's, so BFL files map by identity (less an optional
`model.diffusion_model.` prefix); diffusers files are renamed, QKV-concatenated and half-swapped.
Text encoders keep HF's `model.…` names under whichever wrapper prefix the file uses; llama.cpp GGUF
encoders (`blk.N.…`) are renamed to them and their Q/K rows un-permuted where llama.cpp permuted them.
Entries load numpy arrays, or `GGMLTensor`s (raw ggml blocks) for quantized GGUF tensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import (MODELS, TextEncoderConfig, TransformerConfig, text_encoder_shapes, transformer_config_from_shapes,
                     transformer_shapes, vae_shapes)
from .weights import GGML_QUANTIZED, GGMLTensor, WeightsError, WeightSource, to_float32


@dataclass(frozen=True)
class Entry:
    """A canonical tensor: its shape known up front, its data read only when `load()` is called
    (a numpy array, or a `GGMLTensor` for a quantized GGUF tensor)."""

    shape: tuple[int, ...]
    load: Callable[[], np.ndarray | GGMLTensor]
    stored: str = ""  # the file's type name ("BF16", "Q4_K", ...) when known: the memory planner sizes by it


def _stored(source, key: str) -> str:
    dtype = getattr(source, "dtype", None)  # shape-only stand-ins have none
    return dtype(key) if dtype is not None else ""


# What a FLUX.2 weight may be stored as; FP8 text-encoder weights reach here already decoded ("F32").
_DENSE_WEIGHTS = ("F32", "F16", "BF16")


def check_stored(entries: dict[str, Entry], where, quantized: bool = True) -> dict[str, Entry]:
    """Refuse, naming the file and the tensor, what no layer can take: an empty tensor, a type flux2-mlx
    does not run, a quantized type where the layer must be dense (a norm, a bias, a conv; `quantized`
    False: anywhere). Runs before configs or layers are built from the shapes."""
    for name, e in entries.items():
        if 0 in e.shape:
            raise WeightsError(f"{where}: tensor {name} has shape {list(e.shape)}, with no values; the file "
                               f"is damaged")
        if not e.stored or e.stored in _DENSE_WEIGHTS:
            continue
        if e.stored not in GGML_QUANTIZED:
            raise WeightsError(f"{where}: tensor {name} is stored as {e.stored}, which flux2-mlx does not run "
                               f"as a weight (it runs {', '.join(_DENSE_WEIGHTS + GGML_QUANTIZED)})")
        if not quantized or len(e.shape) != 2 or not name.endswith(".weight"):
            raise WeightsError(f"{where}: tensor {name} {list(e.shape)} is stored as {e.stored}, but only "
                               f"the matrices of linear layers can be quantized; convert the file again")
    return entries


def transformer_config(entries: dict[str, Entry], where, fallback: TransformerConfig | None = None
                       ) -> TransformerConfig:
    """The DiT config these entries' shapes describe. fallback: returned when a tensor the config is read
    from is absent, so that check_keys can name everything missing; without one, that is an error."""
    try:
        return transformer_config_from_shapes({k: tuple(e.shape) for k, e in entries.items()})
    except KeyError as e:
        if fallback is None:
            raise WeightsError(f"{where}: no FLUX.2 transformer tensors found ({e.args[0]} is missing)") from None
        return fallback
    except ValueError as e:
        raise WeightsError(f"{where}: {e}") from None


def block_key(name: str, block_lists: tuple[str, ...]) -> tuple[int, int, str] | None:
    """`single_blocks.3.linear1.weight` in ("double_blocks", "single_blocks") → (1, 3, "linear1.weight"): which
    block list, which block, the name inside it; None outside the blocks."""
    for k, prefix in enumerate(block_lists):
        if name.startswith(prefix + "."):
            head, dot, rest = name[len(prefix) + 1:].partition(".")
            if dot and head.isdigit():
                return k, int(head), rest
    return None


# (BFL name, diffusers names, transform); "{i}" is a block index. All rules but "concat" and "swap" are
# renames (docs/file-formats.md, 'BFL and diffusers names').
_DIT_RULES = [
    ("img_in.weight", ["x_embedder.weight"], None),
    ("txt_in.weight", ["context_embedder.weight"], None),
    ("time_in.in_layer.weight", ["time_guidance_embed.timestep_embedder.linear_1.weight"], None),
    ("time_in.out_layer.weight", ["time_guidance_embed.timestep_embedder.linear_2.weight"], None),
    ("guidance_in.in_layer.weight", ["time_guidance_embed.guidance_embedder.linear_1.weight"], None),
    ("guidance_in.out_layer.weight", ["time_guidance_embed.guidance_embedder.linear_2.weight"], None),
    ("double_stream_modulation_img.lin.weight", ["double_stream_modulation_img.linear.weight"], None),
    ("double_stream_modulation_txt.lin.weight", ["double_stream_modulation_txt.linear.weight"], None),
    ("single_stream_modulation.lin.weight", ["single_stream_modulation.linear.weight"], None),
    ("double_blocks.{i}.img_attn.qkv.weight",
     [f"transformer_blocks.{{i}}.attn.to_{c}.weight" for c in "qkv"], "concat"),
    ("double_blocks.{i}.txt_attn.qkv.weight",
     [f"transformer_blocks.{{i}}.attn.add_{c}_proj.weight" for c in "qkv"], "concat"),
    ("double_blocks.{i}.img_attn.norm.query_norm.scale", ["transformer_blocks.{i}.attn.norm_q.weight"], None),
    ("double_blocks.{i}.img_attn.norm.key_norm.scale", ["transformer_blocks.{i}.attn.norm_k.weight"], None),
    ("double_blocks.{i}.txt_attn.norm.query_norm.scale",
     ["transformer_blocks.{i}.attn.norm_added_q.weight"], None),
    ("double_blocks.{i}.txt_attn.norm.key_norm.scale",
     ["transformer_blocks.{i}.attn.norm_added_k.weight"], None),
    ("double_blocks.{i}.img_attn.proj.weight", ["transformer_blocks.{i}.attn.to_out.0.weight"], None),
    ("double_blocks.{i}.txt_attn.proj.weight", ["transformer_blocks.{i}.attn.to_add_out.weight"], None),
    ("double_blocks.{i}.img_mlp.0.weight", ["transformer_blocks.{i}.ff.linear_in.weight"], None),
    ("double_blocks.{i}.img_mlp.2.weight", ["transformer_blocks.{i}.ff.linear_out.weight"], None),
    ("double_blocks.{i}.txt_mlp.0.weight", ["transformer_blocks.{i}.ff_context.linear_in.weight"], None),
    ("double_blocks.{i}.txt_mlp.2.weight", ["transformer_blocks.{i}.ff_context.linear_out.weight"], None),
    ("single_blocks.{i}.linear1.weight", ["single_transformer_blocks.{i}.attn.to_qkv_mlp_proj.weight"], None),
    ("single_blocks.{i}.linear2.weight", ["single_transformer_blocks.{i}.attn.to_out.weight"], None),
    ("single_blocks.{i}.norm.query_norm.scale", ["single_transformer_blocks.{i}.attn.norm_q.weight"], None),
    ("single_blocks.{i}.norm.key_norm.scale", ["single_transformer_blocks.{i}.attn.norm_k.weight"], None),
    # diffusers' AdaLayerNormContinuous wants (scale, shift); BFL stores (shift, scale).
    ("final_layer.adaLN_modulation.1.weight", ["norm_out.linear.weight"], "swap"),
    ("final_layer.linear.weight", ["proj_out.weight"], None),
]

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_FLUX1_MARKERS = ("vector_in.", "img_mod.lin", "time_text_embed.", ".norm1.linear.", "norm1_context.")
_VAE_MARKERS = ("encoder.conv_in.weight", "decoder.conv_in.weight")
_TEXT_MARKERS = ("embed_tokens.weight", "token_embd.weight")


def _pattern(p: str) -> re.Pattern:
    return re.compile(re.escape(p).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def _swap_halves(a: np.ndarray | GGMLTensor) -> np.ndarray | GGMLTensor:
    if isinstance(a, GGMLTensor):  # whole rows of blocks move unchanged
        return GGMLTensor(_swap_halves(a.data), a.ggml_type, a.shape)
    h = a.shape[0] // 2
    return np.concatenate([a[h:], a[:h]], axis=0)


def _concat_rows(parts: list) -> np.ndarray | GGMLTensor:
    if isinstance(parts[0], GGMLTensor):
        shape = (sum(p.shape[0] for p in parts),) + parts[0].shape[1:]
        return GGMLTensor(np.concatenate([p.data for p in parts]), parts[0].ggml_type, shape)
    return np.concatenate(parts, axis=0)


def _strip_prefix(keys: list[str]) -> str:
    for p in _PREFIXES:
        if keys and sum(k.startswith(p) for k in keys) > len(keys) // 2:
            return p
    return ""


def _refuse_foreign(path, keys: list[str], want: str) -> None:
    if any(m in k for k in keys for m in _FLUX1_MARKERS):
        raise WeightsError(f"{path} is a FLUX.1 checkpoint; flux2-mlx runs FLUX.2 only "
                           f"(get the FLUX.2 weights, e.g. black-forest-labs/FLUX.2-klein-4B)")
    if want != "vae" and any(k.endswith(m) for k in keys for m in _VAE_MARKERS):
        raise WeightsError(f"{path} holds an autoencoder, not a {want}; pass it as the VAE")
    if any(k.endswith(m) for k in keys for m in _TEXT_MARKERS):
        raise WeightsError(f"{path} holds a text encoder, not a {want}")


def transformer_entries(source: WeightSource) -> dict[str, Entry]:
    """Canonical DiT tensors of a BFL or diffusers checkpoint (layout detected from the keys)."""
    keys = source.keys()
    _refuse_foreign(source.path, keys, "transformer")
    prefix = _strip_prefix(keys)
    names = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    if any(n.startswith(("double_blocks.", "single_blocks.", "img_in.")) for n in names):
        return check_stored({n: Entry(source.shape(k), lambda k=k: source.get(k), _stored(source, k))
                             for n, k in names.items()}, source.path)
    if not any(n.startswith(("transformer_blocks.", "x_embedder.")) for n in names):
        raise WeightsError(f"{source.path}: no FLUX.2 transformer tensors found (neither BFL nor "
                           f"diffusers names); is this the right file?")
    out: dict[str, Entry] = {}
    used: set[str] = set()
    for bfl, parts, how in _DIT_RULES:
        first = _pattern(parts[0])
        for n in names:
            m = first.match(n)
            if not m:
                continue
            i = m.groupdict().get("i")
            fill = (lambda s: s.replace("{i}", i)) if i is not None else (lambda s: s)
            srcs = [fill(p) for p in parts]
            absent = [s for s in srcs if s not in names]
            if absent:
                raise WeightsError(f"{source.path}: missing tensors {', '.join(absent)}")
            used.update(srcs)
            keys_ = [names[s] for s in srcs]
            shape = source.shape(keys_[0])
            if how == "concat":
                kinds = {(tuple(source.shape(k)[1:]), len(source.shape(k)), _stored(source, k)) for k in keys_}
                if len(kinds) > 1 or not shape:
                    raise WeightsError(f"{source.path}: {', '.join(keys_)} differ in shape or type, so they "
                                       f"cannot be joined into {fill(bfl)}; the file is damaged")
                shape = (sum(source.shape(k)[0] for k in keys_),) + shape[1:]
                load = lambda ks=keys_: _concat_rows([source.get(k) for k in ks])
            elif how == "swap":
                load = lambda k=keys_[0]: _swap_halves(source.get(k))
            else:
                load = lambda k=keys_[0]: source.get(k)
            out[fill(bfl)] = Entry(shape, load, _stored(source, keys_[0]))
    for n in names:  # unknown diffusers names stay visible to check_keys as "unexpected"
        if n not in used:
            out[n] = Entry(source.shape(names[n]), lambda k=names[n]: source.get(k), _stored(source, names[n]))
    return check_stored(out, source.path)


def transformer_to_diffusers(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BFL-named DiT tensors → diffusers names (split QKV, swap adaLN halves)."""
    out = {}
    for name, a in tensors.items():
        for bfl, parts, how in _DIT_RULES:
            m = _pattern(bfl).match(name)
            if not m:
                continue
            i = m.groupdict().get("i")
            srcs = [p.replace("{i}", i) if i is not None else p for p in parts]
            if how == "concat":
                out.update(zip(srcs, np.split(a, 3, axis=0)))
            else:
                out[srcs[0]] = _swap_halves(a) if how == "swap" else a
            break
        else:
            raise KeyError(f"no diffusers name for {name}")
    return out


# VAE: diffusers → BFL renames as (regex, replacement) pairs, applied in order. The decoder
# up-block index is reversed separately because it needs the level count.
_VAE_TO_BFL = [
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"^quant_conv\.", "encoder.quant_conv."),
    (r"^post_quant_conv\.", "decoder.post_quant_conv."),
]
_VAE_TO_DIFFUSERS = [
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.([qkv])\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"\.norm_out\.", ".conv_norm_out."),
    (r"^encoder\.quant_conv\.", "quant_conv."),
    (r"^decoder\.post_quant_conv\.", "post_quant_conv."),
]
_UP = re.compile(r"^decoder\.(up_blocks|up)\.(\d+)\.(resnets|block|upsamplers\.0|upsample)\.")
_UP_SWAP = {"up_blocks": "up", "up": "up_blocks", "resnets": "block", "block": "resnets",
            "upsamplers.0": "upsample", "upsample": "upsamplers.0"}
_ATTN_1X1 = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_IGNORED = ("bn.num_batches_tracked",)


def _rename(name: str, rules, levels: int) -> str:
    for pat, rep in rules:
        name = re.sub(pat, rep, name)
    m = _UP.match(name)
    if m:
        kind, lvl, sub = m.groups()
        name = f"decoder.{_UP_SWAP[kind]}.{levels - 1 - int(lvl)}.{_UP_SWAP[sub]}." + name[m.end():]
    return name


def _levels(names) -> int:
    ids = [int(m.group(2)) for n in names if (m := _UP.match(n))]
    return max(ids) + 1 if ids else 0


def vae_entries(source: WeightSource) -> dict[str, Entry]:
    """Canonical VAE tensors of a BFL `ae.safetensors` or a diffusers `vae/` folder."""
    keys = source.keys()
    _refuse_foreign(source.path, keys, "vae")
    if any(k.startswith(("double_blocks.", "transformer_blocks.", "model.diffusion_model."))
           for k in keys):
        raise WeightsError(f"{source.path} holds a transformer, not an autoencoder")
    if "decoder.conv_in.weight" in keys and "bn.running_mean" not in keys \
            and source.shape("decoder.conv_in.weight")[1:2] == (16,):
        raise WeightsError(f"{source.path} is a FLUX.1 autoencoder (16 latent channels); FLUX.2 "
                           f"needs its own ae.safetensors from black-forest-labs/FLUX.2-dev")
    diffusers = any(".down_blocks." in k or ".mid_block." in k for k in keys)
    levels = _levels(keys)
    out = {}
    for k in keys:
        if k in _IGNORED:
            continue
        name = _rename(k, _VAE_TO_BFL, levels) if diffusers else k
        shape = source.shape(k)
        if diffusers and _ATTN_1X1.search(name) and len(shape) == 2:
            shape = shape + (1, 1)  # diffusers stores the attention 1x1 convs as Linear
            out[name] = Entry(shape, lambda k=k, s=shape: source.get(k).reshape(s), _stored(source, k))
        else:
            out[name] = Entry(shape, lambda k=k: source.get(k), _stored(source, k))
    return check_stored(out, source.path, quantized=False)


def vae_to_diffusers(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BFL-named VAE tensors → diffusers names (reversed up-block index, 1x1 attention convs → Linear)."""
    levels = _levels(tensors)
    out = {}
    for name, a in tensors.items():
        if _ATTN_1X1.search(name):
            a = a.reshape(a.shape[:2])
        out[_rename(name, _VAE_TO_DIFFUSERS, levels)] = a
    return out


# Where the decoder stack sits: Mistral3ForConditionalGeneration (transformers >= 4.52, then legacy),
# Qwen3ForCausalLM and ComfyUI's bare packs.
_TE_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_TE_UNUSED = ("lm_head.", "language_model.lm_head.", "vision_tower.", "model.vision_tower.",
              "multi_modal_projector.", "model.multi_modal_projector.")
_DIT_MARKERS = ("double_blocks.", "single_blocks.", "transformer_blocks.", "x_embedder.", "img_in.")
_LAYER = re.compile(r"layers\.(\d+)\.")

# FP8 checkpoints (Qwen/Qwen3-*-FP8, what BFL's klein reference loads; transformers' fine-grained FP8):
# a Linear's `X.weight` is F8_E4M3 and `X.weight_scale_inv` holds one float per block of rows × columns
# (128 × 128 in every Qwen3 release); the weight is fp8 value × its block's scale_inv.
# Activations are not quantized: we run W-dequantized bf16/f32, unlike the reference's W8A8 (transformers'
# FP8 Linear also quantizes activations), so embeddings differ slightly from BFL's klein reference.
_FP8_SCALE = ".weight_scale_inv"
_FP8_BOOKKEEPING = (_FP8_SCALE, ".input_scale", ".activation_scale")
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _configured_fp8_block(path) -> tuple[int, int] | None:
    """`quantization_config.weight_block_size` from the checkpoint folder's config.json, if any."""
    if not isinstance(path, Path):
        return None
    try:
        conf = json.loads(((path if path.is_dir() else path.parent) / "config.json").read_text())
        block = (conf.get("quantization_config") or {}).get("weight_block_size")
        return (int(block[0]), int(block[1])) if block and len(block) == 2 else None
    except (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError):
        return None


def _fp8_block_size(source, pairs: dict[str, str]) -> tuple[int, int]:
    """(rows, cols) per scale block for every `weight → weight_scale_inv` pair. Each block size b must
    give ceil(n / b) = scale length along that axis for every pair; config.json's value is used when
    present (and checked against the shapes), else 128 when it fits, else the smallest b that fits."""
    lo, hi = [1, 1], [float("inf")] * 2
    for w, s in pairs.items():
        ws, ss = source.shape(w), source.shape(s)
        if len(ws) != 2 or len(ss) != 2 or any(not 1 <= k <= max(n, 1) for n, k in zip(ws, ss)):
            raise WeightsError(f"{source.path}: {s} has shape {list(ss)}, which is not a block grid of "
                               f"{w} {list(ws)}; the FP8 checkpoint is damaged or of an unknown kind")
        for d, (n, k) in enumerate(zip(ws, ss)):
            lo[d] = max(lo[d], _ceil_div(n, k))
            if k > 1:
                hi[d] = min(hi[d], _ceil_div(n, k - 1) - 1)
    if lo[0] > hi[0] or lo[1] > hi[1]:
        raise WeightsError(f"{source.path}: the weight_scale_inv grids of the FP8 weights do not fit any "
                           f"one block size; the checkpoint is damaged or of an unknown kind")
    configured = _configured_fp8_block(source.path)
    if configured is not None:
        if not all(lo[d] <= configured[d] <= hi[d] for d in range(2)):
            raise WeightsError(f"{source.path}: config.json says weight_block_size {list(configured)}, but "
                               f"the weight_scale_inv shapes do not fit it")
        return configured
    return tuple(128 if lo[d] <= 128 <= hi[d] else lo[d] for d in range(2))


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Block-wise FP8 → float32: each (rows × cols) block times its scale_inv; the last block of an axis
    may be short (ceil division). Allocates the float32 result only (scales are expanded over rows)."""
    out = to_float32(weight)
    if out.ndim != 2:
        raise WeightsError(f"an FP8 weight of shape {list(out.shape)} is not a matrix")
    (n, k), (bn, bk) = out.shape, block
    scale = to_float32(scale_inv)
    if scale.shape != (_ceil_div(n, bn), _ceil_div(k, bk)):
        raise WeightsError(f"FP8 scale grid {list(scale.shape)} does not fit weight {[n, k]} in blocks "
                           f"of {list(block)}")
    rows = np.repeat(scale, bn, axis=0)[:n]  # (n, column blocks)
    for j in range(scale.shape[1]):
        out[:, j * bk:(j + 1) * bk] *= rows[:, j:j + 1]
    return out


# llama.cpp tensor names → HF (docs/file-formats.md, 'llama.cpp tensor names'). Whole-name lookups, so
# `attn_q_norm` can never be mistaken for `attn_q`.
_LCPP_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LCPP_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LCPP_NAME = re.compile(r"^(?:blk\.(?P<i>\d+)\.)?(?P<t>[a-z_0-9]+)\.(?P<p>weight|bias)$")
# llama.cpp's converter (LlamaModel.permute) reorders q_proj/k_proj rows for ggml's adjacent-pair RoPE in
# the archs it converts through LlamaModel: `llama` (Mistral by older llama.cpp) and `mistral3` (Mistral 3
# HF checkpoints by newer ones; native-format Mistral weights already are in that order). Qwen2/Qwen3 use
# NEOX (rotate-half) RoPE and are stored unpermuted.
_QK_PERMUTED_ARCHS = ("llama", "mistral3")
_QK_PLAIN_ARCHS = ("qwen2", "qwen3")


def llama_cpp_to_hf(name: str) -> str | None:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; None for names not in the map."""
    m = _LCPP_NAME.match(name)
    if not m:
        return None
    i, t, p = m.group("i"), m.group("t"), m.group("p")
    if i is None:
        return f"{_LCPP_GLOBAL[t]}.{p}" if t in _LCPP_GLOBAL else None
    return f"model.layers.{i}.{_LCPP_BLOCK[t]}.{p}" if t in _LCPP_BLOCK else None


_HF_GLOBAL = {v: k for k, v in _LCPP_GLOBAL.items()}
_HF_BLOCK = {v: k for k, v in _LCPP_BLOCK.items()}
_HF_NAME = re.compile(r"^(?:model\.layers\.(?P<i>\d+)\.)?(?P<t>.+)\.(?P<p>weight|bias)$")


def hf_to_llama_cpp(name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight` (the inverse of llama_cpp_to_hf)."""
    m = _HF_NAME.match(name)
    if not m:
        return None
    i, t, p = m.group("i"), m.group("t"), m.group("p")
    if i is None:
        return f"{_HF_GLOBAL[t]}.{p}" if t in _HF_GLOBAL else None
    return f"blk.{i}.{_HF_BLOCK[t]}.{p}" if t in _HF_BLOCK else None


def permute_qk(a: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: HF rotate-half row order → ggml's adjacent pairs, per head."""
    return np.ascontiguousarray(
        a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape))


def unpermute_qk(a: np.ndarray | GGMLTensor, n_head: int) -> np.ndarray | GGMLTensor:
    """Undo llama.cpp's Q/K permutation: within each head of d rows, GGUF row 2j + i is HF row i·d/2 + j.

    A GGMLTensor is un-permuted on its raw block rows. That is exact: ggml blocks run along the input
    axis (ne[0]) and never span two rows, so every row's bytes encode that row alone, and moving whole
    rows moves their values unchanged (the result is a copy; the memmap is never written)."""
    if isinstance(a, GGMLTensor):
        return GGMLTensor(unpermute_qk(a.data, n_head), a.ggml_type, a.shape)
    rows = a.shape[0]
    if rows % (2 * n_head):
        raise WeightsError(f"cannot un-permute {rows} Q/K rows over {n_head} heads")
    return np.ascontiguousarray(
        a.reshape(n_head, rows // n_head // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape))


def _llama_cpp_text_encoder(source, cfg: TextEncoderConfig) -> dict[str, Entry]:
    """Canonical entries of a llama.cpp-named text-encoder GGUF (`token_embd`, `blk.N.…`)."""
    arch = (getattr(source, "metadata", None) or {}).get("general.architecture")
    if arch in _QK_PERMUTED_ARCHS:
        permuted = True
    elif arch in _QK_PLAIN_ARCHS:
        permuted = False
    else:  # no or another arch: llama.cpp converts every Mistral through LlamaModel, Qwen never
        permuted = cfg.kind == "mistral"
    deepest = max(cfg.output_layers)
    out = {}
    keys = source.keys()
    for k in keys:
        hf = llama_cpp_to_hf(k)
        if hf is None:
            out[k] = Entry(source.shape(k), lambda k=k: source.get(k))  # "unexpected" to check_keys
            continue
        m = _LAYER.search(hf)
        if hf.startswith(("lm_head.", "model.norm.")) or (m and int(m.group(1)) >= deepest):
            continue
        shape = source.shape(k)
        if permuted and (".self_attn.q_proj." in hf or ".self_attn.k_proj." in hf):
            load = lambda k=k, s=shape: unpermute_qk(source.get(k), max(s[0] // cfg.head_dim, 1))
        else:
            load = lambda k=k: source.get(k)
        out[hf] = Entry(shape, load, _stored(source, k))
    return check_stored(out, source.path)


def text_encoder_entries(source: WeightSource, cfg: TextEncoderConfig) -> dict[str, Entry]:
    """Canonical `model.…` tensors of a Qwen3 / Mistral3 checkpoint, less what FLUX.2 never uses
    (layers from the deepest output layer on, final norm, LM head, vision tower, projector).
    FP8 block-quantized Linears come back as float32 entries, dequantized one tensor at a time;
    llama.cpp GGUF encoders are renamed and un-permuted (quantized tensors stay GGMLTensors)."""
    keys = source.keys()
    if any(m in k for k in keys for m in _DIT_MARKERS):
        raise WeightsError(f"{source.path} holds a FLUX transformer, not a text encoder")
    if any(k.endswith(_VAE_MARKERS) for k in keys):
        raise WeightsError(f"{source.path} holds an autoencoder, not a text encoder")
    if any(k == "token_embd.weight" or k.startswith("blk.") for k in keys):
        return _llama_cpp_text_encoder(source, cfg)
    prefix = next((p for p in _TE_PREFIXES
                   if any(k.startswith(p + "layers.") or k == p + "embed_tokens.weight" for k in keys)),
                  None)
    if prefix is None:
        raise WeightsError(f"{source.path}: no text-encoder tensors found (expected "
                           f"model.embed_tokens.weight and model.layers.N.…); is this the right file?")
    deepest = max(cfg.output_layers)
    kept = {}
    for k in keys:
        if k.startswith(prefix):
            rest = k[len(prefix):]
            m = _LAYER.match(rest)
            if rest == "norm.weight" or (m and int(m.group(1)) >= deepest) or rest.endswith(_FP8_BOOKKEEPING):
                continue
            kept[k] = "model." + rest
        elif not k.startswith(_TE_UNUSED):
            kept[k] = k  # stays visible to check_keys as "unexpected"
    dtype = getattr(source, "dtype", None)  # shape-only stand-ins have none
    key_set = set(keys)
    pairs = {}
    for k in kept:
        scale = k[:-len(".weight")] + _FP8_SCALE if k.endswith(".weight") else None
        fp8 = dtype is not None and dtype(k) in _FP8_DTYPES
        if scale in key_set:
            if dtype is not None and not fp8:
                raise WeightsError(f"{source.path}: {k} has a weight_scale_inv but is stored as {dtype(k)}, "
                                   f"not FP8; this quantized format is not supported")
            pairs[k] = scale
        elif fp8:
            raise WeightsError(f"{source.path}: {k} is FP8 ({dtype(k)}) but its block scales "
                               f"{scale or k + '_scale_inv'} are missing; the download is incomplete, or "
                               f"the checkpoint uses an FP8 format flux2-mlx does not read (use the bf16 "
                               f"weights or a Qwen/Qwen3-*-FP8 checkpoint)")
    block = _fp8_block_size(source, pairs) if pairs else None
    out = {}
    for k, name in kept.items():
        if k in pairs:
            load = lambda k=k, s=pairs[k]: dequantize_fp8(source.get(k), source.get(s), block)
        else:
            load = lambda k=k: source.get(k)
        out[name] = Entry(source.shape(k), load, "F32" if k in pairs else _stored(source, k))
    return check_stored(out, source.path)


def _listing(names, limit=6) -> str:
    names = sorted(names)
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_keys(entries: dict[str, Entry], expected: dict[str, tuple[int, ...]], what: str,
               hint: str = "") -> None:
    """Raise WeightsError naming every missing, unexpected and mis-shaped tensor."""
    missing = expected.keys() - entries.keys()
    unexpected = entries.keys() - expected.keys()
    misshaped = [f"{k} {list(entries[k].shape)} (expected {list(expected[k])})"
                 for k in sorted(expected.keys() & entries.keys())
                 if tuple(entries[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if misshaped:
        parts.append(f"{len(misshaped)} with the wrong shape: {_listing(misshaped, 3)}")
    raise WeightsError(f"{what} does not match: " + "; ".join(parts) + (f". {hint}" if hint else ""))


def guess_transformer(entries: dict[str, Entry], candidates: dict[str, TransformerConfig]) -> str | None:
    """Name of the first candidate config whose full tensor set matches these shapes, if any."""
    shapes = {k: tuple(e.shape) for k, e in entries.items()}
    for name, cfg in candidates.items():
        if transformer_shapes(cfg) == shapes:
            return name
    return None


def checked_entries(component: str, source, cfg) -> tuple[dict[str, Entry], object]:
    """(canonical entries, where they come from) of a "transformer", "vae" or "text_encoder" in `source`
    (a WeightSource, or canonical entries already built), checked strictly against `cfg`: what both
    backends' loaders start from."""
    where = getattr(source, "path", "weights")
    if component == "transformer":
        entries = source if isinstance(source, dict) else transformer_entries(source)
        check_transformer(entries, cfg, where)
    elif component == "vae":
        entries = source if isinstance(source, dict) else vae_entries(source)
        check_keys(entries, vae_shapes(cfg), f"autoencoder {where}")
    else:
        entries = source if isinstance(source, dict) else text_encoder_entries(source, cfg)
        shapes = {k: tuple(e.shape) for k, e in entries.items()}
        repo = next((s.text_encoder.repo_id for s in MODELS.values()
                     if s.text_encoder != cfg and text_encoder_shapes(s.text_encoder) == shapes), None)
        hint = f"These weights have the shapes of {repo}: choose a model that uses it." if repo else ""
        check_keys(entries, text_encoder_shapes(cfg), f"text encoder {where}", hint)
    return entries, where


def check_transformer(entries: dict[str, Entry], cfg: TransformerConfig, where) -> None:
    """check_keys for a DiT, naming the registered model whose shapes these are when it is another."""
    name = guess_transformer(entries, {n: s.transformer for n, s in MODELS.items()})
    hint = f"These weights have the shapes of {name}: choose that model." if name else ""
    check_keys(entries, transformer_shapes(cfg), f"transformer {where}", hint)
