"""Decoder-only text encoders (Mistral-Small-3.2 text stack, Qwen3) up to FLUX.2's deepest output layer.

Imports only torch and config. Attribute names mirror HF transformers (modeling_mistral.py,
modeling_qwen3.py), so the key map is the identity on `model.…` names. A deliberate mirror of
mlx_backend/text_encoder.py: change both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextEncoderConfig


def rotary_embedding(L: int, head_dim: int, theta: float, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """HF default RoPE: cos/sin (L, head_dim) of arange(L)·inv_freq in float32, halves duplicated, then
    cast to the activation dtype as transformers does."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                            device=device).float() / head_dim)
    freqs = torch.arange(L, dtype=torch.float32, device=device)[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    """HF's RMSNorm: normalized in float32, back to the input dtype, then scaled."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention; Qwen3 adds per-head RMSNorm on q and k before RoPE."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        D, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(D, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, D, bias=False)
        self.qk_norm = cfg.kind == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, has_key):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5,
                                             enable_gqa=True)
        # A left-pad query sees no real key: zero output there, the reference's value on every kernel
        # (the math kernel would give NaN). `where`, not a product, so a NaN cannot leak through.
        out = torch.where(has_key[:, None, :, None], out, out.new_zeros(()))
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, has_key):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, has_key)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """HF `MistralModel` / `Qwen3Model` without the final norm, cut after the deepest output layer."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        # A given weight skips nn.Embedding's random init: on the meta device its normal_ runs through
        # torch's Python reference ops, whose first call imports torch._dynamo (about 2 s).
        shape = (cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(max(cfg.output_layers)))


class TextEncoder(nn.Module):
    """(ids, mask) → (B, L, len(output_layers)·D): hidden_states[k] for k in output_layers, layer slot
    outer. mask is 1 for real tokens, 0 for padding."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderModel(cfg)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L = ids.shape
        x = self.model.embed_tokens(ids)
        # Positions are arange(L) whatever the padding, as in transformers.
        cos, sin = rotary_embedding(L, self.cfg.head_dim, self.cfg.rope_theta, x.dtype, x.device)
        real = mask.bool()
        causal = torch.ones((L, L), dtype=torch.bool, device=x.device).tril()
        attn_mask = causal[None, None] & real[:, None, None, :]
        has_key = real.int().cumsum(dim=1) > 0  # some real key at or before i
        hidden = {}
        for n, layer in enumerate(self.model.layers, start=1):
            x = layer(x, cos, sin, attn_mask, has_key)
            if n in self.cfg.output_layers:
                hidden[n] = x
        return torch.cat([hidden[k] for k in self.cfg.output_layers], dim=-1)
