"""Shared PyTorch building blocks of the FLUX.2 DiT: norms, RoPE, attention, embedders, modulation.

Imports only torch and the stdlib. Names follow BFL's flux2 src/flux2/model.py. A deliberate mirror of
mlx_backend/layers.py: change both.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


@lru_cache
def _time_freqs(half: int, max_period: int) -> tuple[float, ...]:
    """The reference's float32 exponents, exponentiated exactly: 1000·g·freq reaches 4000 rad for
    dev's guidance, where one ulp of torch.exp's error moves cos/sin by 1e-4."""
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / half
    return tuple(math.exp(e) for e in exponent.tolist())


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """BFL timestep_embedding: [cos, sin] of 1000·t; 1000·t is taken in t's dtype (bf16 rounding)."""
    t = t * time_factor
    freqs = torch.tensor(_time_freqs(dim // 2, max_period), dtype=torch.float32, device=t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


def rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """(cos, sin) pairs (B, 1, L, head_dim/2, 2) for 4-axis positions (t, h, w, l), angles in float32."""
    pos = (ids[None] if ids.ndim == 2 else ids).float()
    angles = []
    for i, d in enumerate(axes_dim):
        omega = torch.tensor([theta ** (-k / d) for k in range(0, d, 2)], dtype=torch.float32,
                             device=ids.device)
        angles.append(pos[..., i : i + 1] * omega)
    a = torch.cat(angles, dim=-1)[:, None]
    return torch.stack([torch.cos(a), torch.sin(a)], dim=-1)


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent feature pairs (2k, 2k+1), BFL's interleaved convention, in float32. Eager: the pair
    as one complex number times cos + i·sin, the same arithmetic in one pass instead of seven; compiled:
    written out, as inductor fuses real arithmetic but not complex."""
    B, H, L, D = x.shape
    xf = x.float().reshape(B, H, L, D // 2, 2)
    if torch.compiler.is_compiling():
        cos, sin, x0, x1 = pe[..., 0], pe[..., 1], xf[..., 0], xf[..., 1]
        out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(xf) * torch.view_as_complex(pe))
    return out.reshape(B, H, L, D).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked SDPA over (B, heads, L, D) with RoPE already applied; returns (B, L, heads·D)."""
    out = F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)
    B, H, L, D = out.shape
    return out.transpose(1, 2).reshape(B, L, H * D)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # One fused multiply-add over the (L, H) tensor instead of a product and a sum.
    return torch.addcmul(shift, layer_norm(x), 1 + scale)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SiLU of the first half times the second half (BFL SiLUActivation)."""
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


class SiLUActivation(nn.Module):
    """Parameter-free placeholder so `img_mlp.0` / `img_mlp.2` keep BFL's Sequential indices."""

    def forward(self, x):
        return swiglu(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x):
        # BFL: normalize in float32, back to x's dtype, then scale (torch's fused kernel, no weight).
        return F.rms_norm(x.float(), x.shape[-1:], eps=1e-6).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=False)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """One shared modulation for all blocks of a kind: 2 (double) or 1 (single) (shift, scale, gate)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.sets = 2 if double else 1
        self.lin = nn.Linear(dim, 3 * self.sets * dim, bias=False)

    def forward(self, vec: torch.Tensor):
        out = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.sets, dim=-1)
        return [tuple(out[3 * i : 3 * i + 3]) for i in range(self.sets)]
