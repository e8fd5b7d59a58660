"""PyTorch quantized layers: GGUF blocks and block-scaled FP8 weights, held as stored.

GGUF weights are repacked (quant/affine.py) into the affine layout MLX runs: per group of
`group_size` values w = scale · q + bias, the codes q a little-endian bit stream. FP8 checkpoints keep
their one-byte codes and block scales. Both stay so in device memory; each call decodes one layer's
weight into the compute dtype, right before its matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bit stream (…, n·bits/8) → codes (…, n), code j in bits [j·bits, (j+1)·bits) of the stream."""
    if bits == 8:
        return packed
    if bits == 4:
        return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)
    # 8 codes fill exactly `bits` bytes, and a code of at most 8 bits spans at most two of them.
    b = packed.unflatten(-1, (-1, bits)).to(torch.int32)
    codes = []
    for j in range(8):
        i, off = divmod(j * bits, 8)
        word = b[..., i] | (b[..., i + 1] << 8) if i + 1 < bits else b[..., i]
        codes.append((word >> off) & ((1 << bits) - 1))
    return torch.stack(codes, dim=-1).flatten(-2).to(torch.uint8)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
               group_size: int) -> torch.Tensor:
    """w = scales · q + biases, per group, in the scales' dtype (what mx.dequantize computes)."""
    q = unpack(packed, bits).to(scales.dtype).unflatten(-1, (-1, group_size))
    return (q * scales[..., None] + biases[..., None]).flatten(-2)


class QuantLinear(nn.Module):
    """A bias-free Linear whose weight is held packed: `weight` uint8 (out, in·bits/8), `scales` and
    `biases` (out, in / group_size) in the compute dtype."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                 group_size: int):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("biases", biases)

    def dense(self) -> torch.Tensor:
        return dequantize(self.weight, self.scales, self.biases, self.bits, self.group_size)

    def forward(self, x):
        return F.linear(x, self.dense())


class QuantEmbedding(QuantLinear):
    """An Embedding held packed; only the looked-up rows are unpacked."""

    def forward(self, ids):
        return dequantize(self.weight[ids], self.scales[ids], self.biases[ids], self.bits, self.group_size)


class FP8Linear(nn.Module):
    """A bias-free Linear held as FP8 codes (out, in) and float32 `scale_inv` per block of rows × columns.
    The weight is decoded as the numpy loader decodes it (code · scale in float32, one rounding), then cast
    to the compute dtype: the same values the MLX backend multiplies by."""

    def __init__(self, codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                 dtype: torch.dtype):
        super().__init__()
        self.block, self.dtype = block, dtype
        self.register_buffer("weight", codes)
        self.register_buffer("scale_inv", scale_inv)

    def dense(self) -> torch.Tensor:
        (n, k), (bn, bk) = self.weight.shape, self.block
        scale = self.scale_inv.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        return (self.weight.float() * scale).to(self.dtype)

    def forward(self, x):
        return F.linear(x, self.dense())


def quantized_layer(old: nn.Module, q, dtype: torch.dtype) -> nn.Module:
    """A QuantLinear / QuantEmbedding / FP8Linear standing in for `old`, from q: an AffineQuant whose
    weight, scales and biases are already device tensors (weight as uint8 bytes, scales and biases in the
    compute dtype `dtype`), or an FP8Blocks of device tensors."""
    if hasattr(q, "scale_inv"):
        if isinstance(old, nn.Linear) and old.bias is None:
            return FP8Linear(q.codes, q.scale_inv, q.block, dtype)
        raise ValueError(f"an FP8 tensor cannot stand in for {type(old).__name__}")
    if isinstance(old, nn.Embedding):
        return QuantEmbedding(q.weight, q.scales, q.biases, q.bits, q.group_size)
    if isinstance(old, nn.Linear) and old.bias is None:
        return QuantLinear(q.weight, q.scales, q.biases, q.bits, q.group_size)
    raise ValueError(f"a quantized tensor cannot stand in for {type(old).__name__}")


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at a dotted parameter path such as `double_blocks.3.img_attn.qkv`."""
    parent, _, last = path.rpartition(".")
    setattr(root.get_submodule(parent), last, new)
