"""Checkpoint layouts → canonical (BFL) tensor names, the reverse maps, and strict key checks.

Numpy only. Canonical names are BFL's, so BFL files map by identity (less an optional
`model.diffusion_model.` prefix); diffusers files are renamed, QKV-concatenated and half-swapped.
Text encoders keep HF's `model.…` names under whichever wrapper prefix the file uses.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .config import TextEncoderConfig, TransformerConfig, transformer_shapes
from .weights import WeightsError, WeightSource


@dataclass(frozen=True)
class Entry:
    """A canonical tensor: its shape known up front, its data read only when `load()` is called."""

    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


# (BFL name, diffusers names, transform); "{i}" is a block index (flux2-architecture.md §7.3).
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


def _swap_halves(a: np.ndarray) -> np.ndarray:
    h = a.shape[0] // 2
    return np.concatenate([a[h:], a[:h]], axis=0)


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
        return {n: Entry(source.shape(k), lambda k=k: source.get(k)) for n, k in names.items()}
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
                shape = (sum(source.shape(k)[0] for k in keys_),) + shape[1:]
                load = lambda ks=keys_: np.concatenate([source.get(k) for k in ks], axis=0)
            elif how == "swap":
                load = lambda k=keys_[0]: _swap_halves(source.get(k))
            else:
                load = lambda k=keys_[0]: source.get(k)
            out[fill(bfl)] = Entry(shape, load)
    for n in names:  # unknown diffusers names stay visible to check_keys as "unexpected"
        if n not in used:
            out[n] = Entry(source.shape(names[n]), lambda k=names[n]: source.get(k))
    return out


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


# VAE: diffusers → BFL renames as (regex, replacement) pairs, applied in order (§7.4). The decoder
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
            and source.shape("decoder.conv_in.weight")[1] == 16:
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
            out[name] = Entry(shape, lambda k=k, s=shape: source.get(k).reshape(s))
        else:
            out[name] = Entry(shape, lambda k=k: source.get(k))
    return out


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
# Qwen3ForCausalLM and ComfyUI's bare packs (flux2-architecture.md §7.5).
_TE_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_TE_UNUSED = ("lm_head.", "language_model.lm_head.", "vision_tower.", "model.vision_tower.",
              "multi_modal_projector.", "model.multi_modal_projector.")
_DIT_MARKERS = ("double_blocks.", "single_blocks.", "transformer_blocks.", "x_embedder.", "img_in.")
_LAYER = re.compile(r"layers\.(\d+)\.")


def text_encoder_entries(source: WeightSource, cfg: TextEncoderConfig) -> dict[str, Entry]:
    """Canonical `model.…` tensors of a Qwen3 / Mistral3 checkpoint, less what FLUX.2 never uses
    (layers from the deepest output layer on, final norm, LM head, vision tower, projector)."""
    keys = source.keys()
    if any(m in k for k in keys for m in _DIT_MARKERS):
        raise WeightsError(f"{source.path} holds a FLUX transformer, not a text encoder")
    if any(k.endswith(_VAE_MARKERS) for k in keys):
        raise WeightsError(f"{source.path} holds an autoencoder, not a text encoder")
    prefix = next((p for p in _TE_PREFIXES
                   if any(k.startswith(p + "layers.") or k == p + "embed_tokens.weight" for k in keys)),
                  None)
    if prefix is None:
        raise WeightsError(f"{source.path}: no text-encoder tensors found (expected "
                           f"model.embed_tokens.weight and model.layers.N.…); is this the right file?")
    deepest = max(cfg.output_layers)
    out = {}
    for k in keys:
        if k.startswith(prefix):
            rest = k[len(prefix):]
            m = _LAYER.match(rest)
            if rest == "norm.weight" or (m and int(m.group(1)) >= deepest):
                continue
            name = "model." + rest
        elif k.startswith(_TE_UNUSED):
            continue
        else:
            name = k  # stays visible to check_keys as "unexpected"
        out[name] = Entry(source.shape(k), lambda k=k: source.get(k))
    return out


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
