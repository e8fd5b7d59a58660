"""Shared MLX building blocks of the FLUX.2 DiT: norms, RoPE, attention, embedders, modulation.

Imports only mlx and the stdlib. Names follow BFL's flux2 src/flux2/model.py.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn


@lru_cache
def _time_freqs(half: int, max_period: int) -> mx.array:
    """The reference's float32 exponents, exponentiated exactly: 1000·g·freq reaches 4000 rad for
    dev's guidance, where one ulp of mx.exp's error moves cos/sin by 1e-4."""
    exponent = -math.log(max_period) * mx.arange(half, dtype=mx.float32) / half
    return mx.array([math.exp(e) for e in exponent.tolist()], dtype=mx.float32)


def timestep_embedding(t: mx.array, dim: int = 256, max_period: int = 10000,
                       time_factor: float = 1000.0) -> mx.array:
    """BFL timestep_embedding: [cos, sin] of 1000·t; 1000·t is taken in t's dtype (bf16 rounding)."""
    t = t * time_factor
    half = dim // 2
    freqs = _time_freqs(half, max_period)
    args = t[:, None].astype(mx.float32) * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1).astype(t.dtype)


def rope(ids: mx.array, axes_dim: tuple[int, ...], theta: int) -> tuple[mx.array, mx.array]:
    """cos/sin tables (B, 1, L, head_dim/2) for 4-axis positions (t, h, w, l), angles in float32."""
    pos = (ids[None] if ids.ndim == 2 else ids).astype(mx.float32)
    angles = []
    for i, d in enumerate(axes_dim):
        omega = mx.array([theta ** (-k / d) for k in range(0, d, 2)], dtype=mx.float32)
        angles.append(pos[..., i : i + 1] * omega)
    a = mx.concatenate(angles, axis=-1)[:, None]
    return mx.cos(a), mx.sin(a)


def apply_rope(x: mx.array, pe: tuple[mx.array, mx.array]) -> mx.array:
    """Rotate adjacent feature pairs (2k, 2k+1), BFL's interleaved convention, in float32."""
    cos, sin = pe
    B, H, L, D = x.shape
    xf = x.astype(mx.float32).reshape(B, H, L, D // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = mx.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], axis=-1)
    return out.reshape(B, H, L, D).astype(x.dtype)


def attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Unmasked SDPA over (B, heads, L, D) with RoPE already applied; returns (B, L, heads·D)."""
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)
    B, H, L, D = out.shape
    return out.transpose(0, 2, 1, 3).reshape(B, L, H * D)


def layer_norm(x: mx.array) -> mx.array:
    return mx.fast.layer_norm(x, None, None, eps=1e-6)


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return (1 + scale) * layer_norm(x) + shift


def swiglu(x: mx.array) -> mx.array:
    """SiLU of the first half times the second half (BFL SiLUActivation)."""
    a, b = mx.split(x, 2, axis=-1)
    return nn.silu(a) * b


class SiLUActivation(nn.Module):
    """Parameter-free placeholder so `img_mlp.0` / `img_mlp.2` keep BFL's Sequential indices."""

    def __call__(self, x):
        return swiglu(x)


class SiLU(nn.Module):
    def __call__(self, x):
        return nn.silu(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = mx.ones((dim,))

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.scale, 1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def __call__(self, q, k, v):
        return self.query_norm(q).astype(v.dtype), self.key_norm(k).astype(v.dtype)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=False)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def __call__(self, x):
        return self.out_layer(nn.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """One shared modulation for all blocks of a kind: 2 (double) or 1 (single) (shift, scale, gate)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.sets = 2 if double else 1
        self.lin = nn.Linear(dim, 3 * self.sets * dim, bias=False)

    def __call__(self, vec: mx.array):
        out = mx.split(self.lin(nn.silu(vec))[:, None, :], 3 * self.sets, axis=-1)
        return [tuple(out[3 * i : 3 * i + 3]) for i in range(self.sets)]
