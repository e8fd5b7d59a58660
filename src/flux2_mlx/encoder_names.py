"""Text-encoder names: HF checkpoints under their wrapper prefixes, llama.cpp GGUFs (`blk.N.…`, their Q/K
rows permuted and their hyper-parameters in `{arch}.…` metadata) and FP8 block-quantized checkpoints, all
read into HF's `model.…` names. Numpy only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .config import TextEncoderConfig
from .entries import Entry, check_stored, stored_type
from .filekind import refuse_other_kind
from .weights import FP8Blocks, GGMLTensor, GGUFFile, WeightsError, WeightSource

# Where the decoder stack sits: Mistral3ForConditionalGeneration (transformers >= 4.52, then legacy),
# Qwen3ForCausalLM and ComfyUI's bare packs.
_TE_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_TE_UNUSED = ("lm_head.", "language_model.lm_head.", "vision_tower.", "model.vision_tower.",
              "multi_modal_projector.", "model.multi_modal_projector.")
_LAYER = re.compile(r"layers\.(\d+)\.")

# llama.cpp tensor names → HF (docs/file-formats.md, 'llama.cpp tensor names'). Whole-name lookups, so
# `attn_q_norm` can never be mistaken for `attn_q`.
_LCPP_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LCPP_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Each direction: how its names look, its whole-model and per-layer tables, the prefix of a layer's names.
_TO_HF = (re.compile(r"^(?:blk\.(?P<i>\d+)\.)?(?P<t>[a-z_0-9]+)\.(?P<p>weight|bias)$"),
          _LCPP_GLOBAL, _LCPP_BLOCK, "model.layers")
_TO_LLAMA_CPP = (re.compile(r"^(?:model\.layers\.(?P<i>\d+)\.)?(?P<t>.+)\.(?P<p>weight|bias)$"),
                 {v: k for k, v in _LCPP_GLOBAL.items()}, {v: k for k, v in _LCPP_BLOCK.items()}, "blk")
# llama.cpp's converter (LlamaModel.permute) reorders q_proj/k_proj rows for ggml's adjacent-pair RoPE in
# the archs it converts through LlamaModel: `llama` (Mistral by older llama.cpp) and `mistral3` (Mistral 3
# HF checkpoints by newer ones; native-format Mistral weights already are in that order). Qwen2/Qwen3 use
# NEOX (rotate-half) RoPE and are stored unpermuted.
_QK_PERMUTED_ARCHS = ("llama", "mistral3")
_QK_PLAIN_ARCHS = ("qwen2", "qwen3")
# config.json's names for a llama.cpp encoder GGUF's `{arch}.…` hyper-parameters, and their types.
_GGUF_HPARAMS = {
    "hidden_size": ("embedding_length", int), "num_hidden_layers": ("block_count", int),
    "intermediate_size": ("feed_forward_length", int), "num_attention_heads": ("attention.head_count", int),
    "num_key_value_heads": ("attention.head_count_kv", int), "head_dim": ("attention.key_length", int),
    "rope_theta": ("rope.freq_base", float), "rms_norm_eps": ("attention.layer_norm_rms_epsilon", float),
    "max_position_embeddings": ("context_length", int),
}

# FP8 checkpoints (Qwen/Qwen3-*-FP8, what BFL's klein reference loads; transformers' fine-grained FP8):
# a Linear's `X.weight` is F8_E4M3 and `X.weight_scale_inv` holds one float per block of rows × columns
# (128 × 128 in every Qwen3 release); entries load them as weights.FP8Blocks.
# Activations are not quantized: we run W-dequantized bf16/f32, unlike the reference's W8A8 (transformers'
# FP8 Linear also quantizes activations), so embeddings differ slightly from BFL's klein reference; torch's
# --fp8-matmul runs W8A8 too, with its per-token activation scales, one per weight column block.
_FP8_SCALE = ".weight_scale_inv"
_FP8_BOOKKEEPING = (_FP8_SCALE, ".input_scale", ".activation_scale")
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


def _rename(name: str, direction) -> str | None:
    pattern, whole_model, per_layer, layers = direction
    m = pattern.match(name)
    if not m:
        return None
    i, t, p = m.group("i", "t", "p")
    if i is None:
        return f"{whole_model[t]}.{p}" if t in whole_model else None
    return f"{layers}.{i}.{per_layer[t]}.{p}" if t in per_layer else None


def llama_cpp_to_hf(name: str) -> str | None:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; None for names not in the map."""
    return _rename(name, _TO_HF)


def hf_to_llama_cpp(name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight` (the inverse of llama_cpp_to_hf)."""
    return _rename(name, _TO_LLAMA_CPP)


def gguf_encoder_config(f: GGUFFile) -> dict:
    """A llama.cpp text-encoder GGUF's hyper-parameters under config.json's names (those it has), the
    vocabulary size read from its embedding. A value of the wrong type is a WeightsError naming its key."""
    arch = f.field("general.architecture", kind=str)
    values = {name: f.field(f"{arch}.{key}", kind=kind) for name, (key, kind) in _GGUF_HPARAMS.items()}
    emb = f.shape("token_embd.weight") if "token_embd.weight" in f.keys() else ()
    values["vocab_size"] = emb[0] if len(emb) == 2 else None
    return {k: v for k, v in values.items() if v is not None}


def permute_qk(a: np.ndarray | GGMLTensor, n_head: int) -> np.ndarray | GGMLTensor:
    """llama.cpp's `LlamaModel.permute`: HF rotate-half row order → ggml's adjacent pairs, per head; a
    GGMLTensor on its raw block rows (exact, for the reason unpermute_qk gives)."""
    if isinstance(a, GGMLTensor):
        return GGMLTensor(permute_qk(a.data, n_head), a.ggml_type, a.shape)
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
            lo[d] = max(lo[d], -(-n // k))  # ceil(n / k)
            if k > 1:
                hi[d] = min(hi[d], -(-n // (k - 1)) - 1)
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
        out[hf] = Entry(shape, load, stored_type(source, k))
    return check_stored(out, source.path)


def text_encoder_entries(source: WeightSource, cfg: TextEncoderConfig) -> dict[str, Entry]:
    """Canonical `model.…` tensors of a Qwen3 / Mistral3 checkpoint, less what FLUX.2 never uses
    (layers from the deepest output layer on, final norm, LM head, vision tower, projector).
    FP8 block-quantized Linears come back as FP8Blocks (codes and block scales, validated on load);
    llama.cpp GGUF encoders are renamed and un-permuted (quantized tensors stay GGMLTensors)."""
    keys = source.keys()
    refuse_other_kind(source.path, keys, "text_encoder")
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
            load = lambda k=k, s=pairs[k]: FP8Blocks(source.get(k), source.get(s), block)
        else:
            load = lambda k=k: source.get(k)
        out[name] = Entry(source.shape(k), load, stored_type(source, k))
    return check_stored(out, source.path, fp8=True)
