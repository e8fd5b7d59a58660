"""Transformer (DiT) names: BFL ⇄ diffusers, both directions generated from one table. Numpy only.

Canonical names are BFL's, so BFL files map by identity (less a wrapper prefix such as
`model.diffusion_model.`); diffusers files are renamed, their Q, K and V concatenated and the final
adaLN halves swapped. Entries load numpy arrays, `GGMLTensor`s for quantized GGUF tensors, or for FP8 / NVFP4
layers (comfy_quant) their ScaledFP8 / NVFP4 weights.
"""

from __future__ import annotations

import re

import numpy as np

from .comfy_quant import scaled_entries
from .entries import Entry, check_stored, stored_type
from .filekind import refuse_other_kind
from .weights import GGMLTensor, WeightsError, WeightSource

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


def wrapper_prefix(keys: list[str]) -> str:
    """The wrapper prefix (`model.diffusion_model.`, ...) most keys start with, or ""."""
    for p in _PREFIXES:
        if keys and sum(k.startswith(p) for k in keys) > len(keys) // 2:
            return p
    return ""


def transformer_entries(source: WeightSource) -> dict[str, Entry]:
    """Canonical DiT tensors of a BFL or diffusers checkpoint (layout detected from the keys)."""
    keys = source.keys()
    refuse_other_kind(source.path, keys, "transformer")
    prefix = wrapper_prefix(keys)
    names = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    scaled, used = scaled_entries(source, names, prefix)
    if any(n.startswith(("double_blocks.", "single_blocks.", "img_in.")) for n in names):
        plain = {n: Entry(source.shape(k), lambda k=k: source.get(k), stored_type(source, k))
                 for n, k in names.items() if n not in used}
        return check_stored(plain | scaled, source.path)
    if not any(n.startswith(("transformer_blocks.", "x_embedder.")) for n in names):
        raise WeightsError(f"{source.path}: no FLUX.2 transformer tensors found (neither BFL nor "
                           f"diffusers names); is this the right file?")
    if scaled:  # diffusers' split Q, K, V would each have their own per-tensor scales
        raise WeightsError(f"{source.path}: FP8/NVFP4 layers under diffusers names, which flux2-mlx does not "
                           f"read; use the BFL-named file (FLUX.2's own releases are)")
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
                kinds = {(tuple(source.shape(k)[1:]), len(source.shape(k)), stored_type(source, k))
                         for k in keys_}
                if len(kinds) > 1 or not shape:
                    raise WeightsError(f"{source.path}: {', '.join(keys_)} differ in shape or type, so they "
                                       f"cannot be joined into {fill(bfl)}; the file is damaged")
                shape = (sum(source.shape(k)[0] for k in keys_),) + shape[1:]
                load = lambda ks=keys_: _concat_rows([source.get(k) for k in ks])
            elif how == "swap":
                load = lambda k=keys_[0]: _swap_halves(source.get(k))
            else:
                load = lambda k=keys_[0]: source.get(k)
            out[fill(bfl)] = Entry(shape, load, stored_type(source, keys_[0]))
    for n, k in names.items():  # unknown diffusers names stay visible to check_keys as "unexpected"
        if n not in used:
            out[n] = Entry(source.shape(k), lambda k=k: source.get(k), stored_type(source, k))
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
