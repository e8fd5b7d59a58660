"""The FLUX.2 flow transformer (dev, klein 4B/9B) in MLX, attribute names as in BFL's checkpoint.

Imports only mlx, config and layers (flux2 src/flux2/model.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import TransformerConfig
from .layers import (MLPEmbedder, Modulation, QKNorm, SiLU, SiLUActivation, attention, modulate,
                     rope, swiglu, timestep_embedding)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x: mx.array):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return q, k, v


def _mlp(layers, x):
    return layers[2](layers[1](layers[0](x)))


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        H, M = cfg.hidden_size, cfg.mlp_hidden
        self.img_attn = SelfAttention(H, cfg.num_heads)
        self.txt_attn = SelfAttention(H, cfg.num_heads)
        self.img_mlp = [nn.Linear(H, 2 * M, bias=False), SiLUActivation(), nn.Linear(M, H, bias=False)]
        self.txt_mlp = [nn.Linear(H, 2 * M, bias=False), SiLUActivation(), nn.Linear(M, H, bias=False)]

    def __call__(self, img, txt, pe, mod_img, mod_txt):
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = mod_img
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = mod_txt
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_shift1, txt_scale1))
        # Joint attention over [txt ; img].
        attn = attention(mx.concatenate([txt_q, img_q], axis=2), mx.concatenate([txt_k, img_k], axis=2),
                         mx.concatenate([txt_v, img_v], axis=2), pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * _mlp(self.img_mlp, modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * _mlp(self.txt_mlp, modulate(txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on [txt ; img]: linear1 = Q|K|V|gate|up, linear2 = attn-out|mlp-out."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        H, M = cfg.hidden_size, cfg.mlp_hidden
        self.num_heads, self.hidden_size = cfg.num_heads, H
        self.linear1 = nn.Linear(H, 3 * H + 2 * M, bias=False)
        self.linear2 = nn.Linear(H + M, H, bias=False)
        self.norm = QKNorm(cfg.head_dim)

    def __call__(self, x, pe, mod):
        shift, scale, gate = mod
        B, L, _ = x.shape
        qkv, mlp = mx.split(self.linear1(modulate(x, shift, scale)), [3 * self.hidden_size], axis=-1)
        q, k, v = qkv.reshape(B, L, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        out = self.linear2(mx.concatenate([attention(q, k, v, pe), swiglu(mlp)], axis=-1))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = [SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=False)]
        self.linear = nn.Linear(hidden_size, out_channels, bias=False)

    def __call__(self, x, vec):
        shift, scale = mx.split(self.adaLN_modulation[1](self.adaLN_modulation[0](vec))[:, None], 2, -1)
        return self.linear(modulate(x, shift, scale))


class Flux2(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, H, bias=False)
        self.txt_in = nn.Linear(cfg.context_in_dim, H, bias=False)
        self.time_in = MLPEmbedder(256, H)
        if cfg.use_guidance_embed:
            self.guidance_in = MLPEmbedder(256, H)
        self.double_stream_modulation_img = Modulation(H, double=True)
        self.double_stream_modulation_txt = Modulation(H, double=True)
        self.single_stream_modulation = Modulation(H, double=False)
        self.double_blocks = [DoubleStreamBlock(cfg) for _ in range(cfg.depth)]
        self.single_blocks = [SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks)]
        self.final_layer = LastLayer(H, cfg.in_channels)

    def __call__(self, x, x_ids, t, ctx, ctx_ids, guidance=None):
        """x (B, N, C) tokens, x_ids (B|1, N, 4), t (B,) in [0, 1], ctx (B, L, D), ctx_ids (B|1, L, 4),
        guidance (B,) or None → velocity (B, N, C) in the parameters' dtype."""
        # A quantized layer's weight holds packed uint32 codes; its scales carry the compute dtype.
        dtype = getattr(self.img_in, "scales", self.img_in.weight).dtype
        vec = self.time_in(timestep_embedding(t.astype(dtype)))
        if self.cfg.use_guidance_embed:
            if guidance is None:
                raise ValueError("this model embeds guidance: pass a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance.astype(dtype)))
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        (mod_single,) = self.single_stream_modulation(vec)

        img, txt = self.img_in(x.astype(dtype)), self.txt_in(ctx.astype(dtype))
        pe_x = rope(x_ids, self.cfg.axes_dim, self.cfg.theta)
        pe_ctx = rope(ctx_ids, self.cfg.axes_dim, self.cfg.theta)
        pe = tuple(mx.concatenate([c, i], axis=2) for c, i in zip(pe_ctx, pe_x))

        for block in self.double_blocks:
            img, txt = block(img, txt, pe, mod_img, mod_txt)
        h = mx.concatenate([txt, img], axis=1)
        for block in self.single_blocks:
            h = block(h, pe, mod_single)
        return self.final_layer(h[:, txt.shape[1] :], vec)
