"""The FLUX.2 flow transformer (dev, klein 4B/9B) in PyTorch, attribute names as in BFL's checkpoint.

Imports only torch, config and layers (flux2 src/flux2/model.py). A deliberate mirror of
mlx_backend/transformer.py, block for block (the two backends are one model in two frameworks): change both.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TransformerConfig
from .layers import (
    MLPEmbedder,
    Modulation,
    QKNorm,
    SiLUActivation,
    apply_rope,
    attention,
    modulate,
    rope,
    swiglu,
    timestep_embedding,
)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x: torch.Tensor, pe):
        """q, k, v as (B, heads, L, D), q and k normed and rotated."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return apply_rope(q, pe), apply_rope(k, pe), v


def _mlp(H: int, M: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(H, 2 * M, bias=False), SiLUActivation(), nn.Linear(M, H, bias=False))


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        H, M = cfg.hidden_size, cfg.mlp_hidden
        self.img_attn = SelfAttention(H, cfg.num_heads)
        self.txt_attn = SelfAttention(H, cfg.num_heads)
        self.img_mlp = _mlp(H, M)
        self.txt_mlp = _mlp(H, M)

    def _out(self, stream: str, x, attn, mod):
        (_, _, gate1), (shift2, scale2, gate2) = mod
        x = torch.addcmul(x, gate1, getattr(self, f"{stream}_attn").proj(attn))
        return torch.addcmul(x, gate2, getattr(self, f"{stream}_mlp")(modulate(x, shift2, scale2)))

    def forward(self, img, txt, pe, mod_img, mod_txt, ref=None, kv=None):
        """pe: (txt, img) RoPE tables. ref (klein KV, first step): (tokens, pe, modulation) of the
        reference stream, run with the image weights and attending only to itself. kv (klein KV, later
        steps): cached reference (k, v) the image and text attend to. Returns img, txt and, with ref,
        (ref tokens, k, v)."""
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, *mod_txt[0][:2]), pe[0])
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, *mod_img[0][:2]), pe[1])
        out = None
        if ref is not None:
            r, r_pe, r_mod = ref
            r_q, r_k, r_v = self.img_attn.qkv_heads(modulate(r, *r_mod[0][:2]), r_pe)
            out = (self._out("img", r, attention(r_q, r_k, r_v), r_mod), r_k, r_v)
            kv = (r_k, r_v)
        # Joint attention over [txt ; img (; ref)]: reference keys go last, attention ignores their order.
        k, v = [txt_k, img_k], [txt_v, img_v]
        if kv is not None:
            k, v = k + [kv[0]], v + [kv[1]]
        attn = attention(torch.cat([txt_q, img_q], dim=2), torch.cat(k, dim=2), torch.cat(v, dim=2))
        n = txt.shape[1]
        return self._out("img", img, attn[:, n:], mod_img), self._out("txt", txt, attn[:, :n], mod_txt), out


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on [txt ; img]: linear1 = Q|K|V|gate|up, linear2 = attn-out|mlp-out."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        H, M = cfg.hidden_size, cfg.mlp_hidden
        self.num_heads, self.hidden_size = cfg.num_heads, H
        self.linear1 = nn.Linear(H, 3 * H + 2 * M, bias=False)
        self.linear2 = nn.Linear(H + M, H, bias=False)
        self.norm = QKNorm(cfg.head_dim)

    def _in(self, x, pe, mod):
        shift, scale, _ = mod
        B, L, _ = x.shape
        h = self.linear1(modulate(x, shift, scale))
        qkv, mlp = h[..., : 3 * self.hidden_size], h[..., 3 * self.hidden_size :]
        q, k, v = qkv.reshape(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return apply_rope(q, pe), apply_rope(k, pe), v, mlp

    def _out(self, x, attn, mlp, mod):
        return torch.addcmul(x, mod[2], self.linear2(torch.cat([attn, swiglu(mlp)], dim=-1)))

    def forward(self, x, pe, mod, ref=None, kv=None):
        """As DoubleStreamBlock, on the joint [txt ; img] sequence; returns x and, with ref, (ref, k, v)."""
        q, k, v, mlp = self._in(x, pe, mod)
        out = None
        if ref is not None:
            r, r_pe, r_mod = ref
            r_q, r_k, r_v, r_mlp = self._in(r, r_pe, r_mod)
            out = (self._out(r, attention(r_q, r_k, r_v), r_mlp, r_mod), r_k, r_v)
            kv = (r_k, r_v)
        if kv is not None:
            k, v = torch.cat([k, kv[0]], dim=2), torch.cat([v, kv[1]], dim=2)
        return self._out(x, attention(q, k, v), mlp, mod), out


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=False))
        self.linear = nn.Linear(hidden_size, out_channels, bias=False)

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


class Flux2(nn.Module):
    """dtype: the compute dtype the loader fills the parameters in (a quantized layer holds packed codes,
    so the parameters cannot tell it)."""

    def __init__(self, cfg: TransformerConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        H = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, H, bias=False)
        self.txt_in = nn.Linear(cfg.context_in_dim, H, bias=False)
        self.time_in = MLPEmbedder(256, H)
        if cfg.use_guidance_embed:
            self.guidance_in = MLPEmbedder(256, H)
        self.double_stream_modulation_img = Modulation(H, double=True)
        self.double_stream_modulation_txt = Modulation(H, double=True)
        self.single_stream_modulation = Modulation(H, double=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(H, cfg.in_channels)

    def _rope(self, ids):
        return rope(ids, self.cfg.axes_dim, self.cfg.theta)

    def _vec(self, t, guidance, dtype):
        vec = self.time_in(timestep_embedding(t.to(dtype)))
        if self.cfg.use_guidance_embed:
            if guidance is None:
                raise ValueError("this model embeds guidance: pass a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype)))
        return vec

    @torch.inference_mode()
    def forward(self, x, x_ids, t, ctx, ctx_ids, guidance=None, ref=None, ref_ids=None, kv_cache=None):
        """x (B, N, C) tokens, x_ids (B|1, N, 4), t (B,) in [0, 1], ctx (B, L, D), ctx_ids (B|1, L, 4),
        guidance (B,) or None → velocity (B, N, C) in the compute dtype.

        ref (B, R, C), ref_ids (1, R, 4): reference-image tokens: they join the image tokens and
        their outputs are dropped. kv_cache (klein KV): a list that belongs to one generation. While
        it is empty, the references run as their own stream, modulated at t = 0 and attending only to
        themselves, and every block's reference K/V is appended to it; once filled, later calls attend to
        those K/V and take no `ref`.
        """
        dtype = self.dtype
        n = x.shape[1]
        extract = kv_cache is not None and not kv_cache and ref is not None
        if ref is not None and kv_cache is None:
            x = torch.cat([x, ref.to(x.dtype)], dim=1)
            x_ids = torch.cat([x_ids, ref_ids], dim=1)
        vec = self._vec(t, guidance, dtype)
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        (mod_single,) = self.single_stream_modulation(vec)

        img, txt = self.img_in(x.to(dtype)), self.txt_in(ctx.to(dtype))
        pe = (self._rope(ctx_ids), self._rope(x_ids))
        pe_joint = torch.cat(pe, dim=2)
        r = cached = None
        if extract:
            ref_vec = self._vec(torch.zeros_like(t), guidance, dtype)
            r, r_pe = self.img_in(ref.to(dtype)), self._rope(ref_ids)
            r_mod_img = self.double_stream_modulation_img(ref_vec)
            (r_mod_single,) = self.single_stream_modulation(ref_vec)
        elif kv_cache:
            cached = iter(kv_cache)

        for block in self.double_blocks:
            img, txt, out = block(img, txt, pe, mod_img, mod_txt, kv=next(cached) if cached else None,
                                  ref=(r, r_pe, r_mod_img) if extract else None)
            if extract:
                r, k, v = out
                kv_cache.append((k, v))
        h = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            h, out = block(h, pe_joint, mod_single, ref=(r, r_pe, r_mod_single) if extract else None,
                           kv=next(cached) if cached else None)
            if extract:
                r, k, v = out
                kv_cache.append((k, v))
        return self.final_layer(h[:, txt.shape[1] : txt.shape[1] + n], vec)
