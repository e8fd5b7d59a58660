"""Decoder-only text encoders (Mistral-Small-3.2 text stack, Qwen3) up to FLUX.2's deepest output layer.

Imports only mlx and config. Attribute names mirror HF transformers (modeling_mistral.py,
modeling_qwen3.py), so the key map is the identity on `model.…` names.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import TextEncoderConfig


def rotary_embedding(L: int, head_dim: int, theta: float, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """HF default RoPE: cos/sin (L, head_dim) of arange(L)·inv_freq in float32, halves duplicated, then
    cast to the activation dtype as transformers does."""
    inv_freq = 1.0 / mx.power(theta, mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)
    freqs = mx.arange(L, dtype=mx.float32)[:, None] * inv_freq[None]
    emb = mx.concatenate([freqs, freqs], axis=-1)
    return mx.cos(emb).astype(dtype), mx.sin(emb).astype(dtype)


def rotate_half(x: mx.array) -> mx.array:
    x1, x2 = mx.split(x, 2, axis=-1)
    return mx.concatenate([-x2, x1], axis=-1)


def apply_rotary_pos_emb(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    return x * cos + rotate_half(x) * sin


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
            self.q_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)

    def __call__(self, x, cos, sin, mask, has_key):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        # A left-pad query sees no real key; PyTorch's CPU / memory-efficient SDPA returns 0 there (the
        # reference's values), MLX a mean or NaN. `where`, not a product, so a NaN cannot leak through.
        out = mx.where(has_key[:, None, :, None], out, mx.zeros((), out.dtype))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x, cos, sin, mask, has_key):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, has_key)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """HF `MistralModel` / `Qwen3Model` without the final norm, cut after the deepest output layer."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg) for _ in range(max(cfg.output_layers))]


class TextEncoder(nn.Module):
    """(ids, mask) → (B, L, len(output_layers)·D): hidden_states[k] for k in output_layers, layer slot
    outer (docs/architecture.md, 'Text encoders'). mask is 1 for real tokens, 0 for padding."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderModel(cfg)

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        B, L = ids.shape
        x = self.model.embed_tokens(ids)
        # Positions are arange(L) whatever the padding, as in transformers.
        cos, sin = rotary_embedding(L, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        real = mask.astype(mx.bool_)
        causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
        attn_mask = causal[None, None] & real[:, None, None, :]
        has_key = mx.cumsum(real.astype(mx.int32), axis=1) > 0  # some real key at or before i
        hidden = {}
        for n, layer in enumerate(self.model.layers, start=1):
            x = layer(x, cos, sin, attn_mask, has_key)
            if n in self.cfg.output_layers:
                hidden[n] = x
        return mx.concatenate([hidden[k] for k in self.cfg.output_layers], axis=-1)
