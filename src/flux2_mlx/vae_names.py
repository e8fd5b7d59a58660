"""Autoencoder (VAE) names: BFL ⇄ diffusers, both directions generated from one table. Numpy only.

Canonical names are BFL's (`ae.safetensors`); a diffusers `vae/` folder is renamed, its decoder up-blocks
numbered the other way round and its 1x1 attention convolutions, stored as Linear, given their two unit axes.
"""

from __future__ import annotations

import re

import numpy as np

from .entries import Entry, check_stored, stored_type
from .filekind import refuse_other_kind
from .weights import WeightsError, WeightSource

# (diffusers, BFL) pieces of names, renamed in this order. A piece that starts with a dot is found anywhere
# in a name, any other only at its start; "{n}" stands for a number, "{c}" for q, k or v.
_RENAMES = [
    ("encoder.down_blocks.{n}.resnets.", "encoder.down.{n}.block."),
    ("encoder.down_blocks.{n}.downsamplers.0.", "encoder.down.{n}.downsample."),
    (".mid_block.resnets.0.", ".mid.block_1."),
    (".mid_block.resnets.1.", ".mid.block_2."),
    (".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm."),
    (".mid_block.attentions.0.to_{c}.", ".mid.attn_1.{c}."),
    (".mid_block.attentions.0.to_out.0.", ".mid.attn_1.proj_out."),
    (".conv_shortcut.", ".nin_shortcut."),
    (".conv_norm_out.", ".norm_out."),
    ("quant_conv.", "encoder.quant_conv."),
    ("post_quant_conv.", "decoder.post_quant_conv."),
]
# The decoder's up path, whose block index also runs the other way (it needs the level count).
_UP_RENAMES = {"up_blocks": "up", "resnets": "block", "upsamplers.0": "upsample"}
_UP_SWAP = {**_UP_RENAMES, **{bfl: diffusers for diffusers, bfl in _UP_RENAMES.items()}}
_UP = re.compile(r"^decoder\.(up_blocks|up)\.(\d+)\.(resnets|block|upsamplers\.0|upsample)\.")
_ATTN_1X1 = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_IGNORED = ("bn.num_batches_tracked",)


def _rule(old: str, new: str) -> tuple[re.Pattern, str]:
    """A (pattern, replacement) pair for re.sub from one piece of _RENAMES to the other."""
    pattern = re.escape(old).replace(re.escape("{n}"), r"(\d+)").replace(re.escape("{c}"), "([qkv])")
    replacement = new.replace("{n}", r"\1").replace("{c}", r"\1")
    return re.compile(pattern if old.startswith(".") else "^" + pattern), replacement


_TO_BFL = [_rule(diffusers, bfl) for diffusers, bfl in _RENAMES]
_TO_DIFFUSERS = [_rule(bfl, diffusers) for diffusers, bfl in _RENAMES]


def _rename(name: str, rules, levels: int) -> str:
    for pattern, replacement in rules:
        name = pattern.sub(replacement, name)
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
    refuse_other_kind(source.path, keys, "vae")
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
        name = _rename(k, _TO_BFL, levels) if diffusers else k
        shape = source.shape(k)
        if diffusers and _ATTN_1X1.search(name) and len(shape) == 2:
            shape = shape + (1, 1)  # diffusers stores the attention 1x1 convs as Linear
            out[name] = Entry(shape, lambda k=k, s=shape: source.get(k).reshape(s), stored_type(source, k))
        else:
            out[name] = Entry(shape, lambda k=k: source.get(k), stored_type(source, k))
    return check_stored(out, source.path, quantized=False)


def vae_to_diffusers(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BFL-named VAE tensors → diffusers names (reversed up-block index, 1x1 attention convs → Linear)."""
    levels = _levels(tensors)
    out = {}
    for name, a in tensors.items():
        if _ATTN_1X1.search(name):
            a = a.reshape(a.shape[:2])
        out[_rename(name, _TO_DIFFUSERS, levels)] = a
    return out
