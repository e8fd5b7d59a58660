"""The FLUX.2 autoencoder in PyTorch, attribute names as in BFL's `ae.safetensors`.

Imports only torch and config (flux2 src/flux2/autoencoder.py); a deliberate mirror of mlx_backend/vae.py
(change both). The convolutions
run channels-first as PyTorch's do; `encode` and `decode` take and return channels-last (NHWC) tensors,
the layout the MLX backend and the pipeline use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig


def _norm(groups: int, c: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head attention over all H·W positions; q/k/v/proj_out are 1x1 convs as in BFL."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(groups, c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(B, 1, C, H * W).transpose(-1, -2) for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(C))
        return x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric: zero-pad only right and bottom, then a 3x3 stride-2 conv without padding.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` (ResNet list) and an optional `downsample` / `upsample`."""

    def __init__(self, blocks: list[ResnetBlock], name: str | None = None, sampler: nn.Module | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.sampler = name
        if name is not None:
            setattr(self, name, sampler)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            h = block(h)
        return getattr(self, self.sampler)(h) if self.sampler else h


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chans = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for lvl, cout in enumerate(chans):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, cout, g))
                cin = cout
            if lvl == len(chans) - 1:
                self.down.append(Level(blocks))
            else:
                self.down.append(Level(blocks, "downsample", Downsample(cout)))
        self.mid = Mid(cin, g)
        self.norm_out = _norm(g, cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chans, z = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult], cfg.z_channels
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.conv_in = nn.Conv2d(z, chans[-1], 3, padding=1)
        self.mid = Mid(chans[-1], g)
        # BFL builds levels top-down, inserting each at the front: up[0] is full resolution.
        up = []
        cin = chans[-1]
        for lvl in reversed(range(len(chans))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, chans[lvl], g))
                cin = chans[lvl]
            up.insert(0, Level(blocks, "upsample", Upsample(cin)) if lvl else Level(blocks))
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(g, cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class BatchNormStats(nn.Module):
    """BFL's `bn` (BatchNorm2d, affine=False), only ever used in eval mode: its running stats."""

    def __init__(self, c: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def std(self) -> torch.Tensor:
        return torch.sqrt(self.running_var + self.eps)


class AutoEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.z_channels = cfg.z_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.bn = BatchNormStats(4 * cfg.z_channels, cfg.bn_eps)

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, H, W, 3) in [-1, 1], H and W multiples of 16 → BN-normalized, patchified
        latents (B, H/16, W/16, 4z)."""
        x = x.to(self.bn.running_mean.dtype).permute(0, 3, 1, 2)
        z = self.encoder(x)[:, : self.z_channels]  # the mean
        B, C, H, W = z.shape
        # 2x2 patchify to channels-last, new channel index c·4 + pi·2 + pj, as diffusers' _patchify_latents.
        z = z.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return (z.reshape(B, H // 2, W // 2, 4 * C) - self.bn.running_mean) / self.bn.std()

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, h, w, 4z) normalized latents → (B, 16h, 16w, 3) image in about [-1, 1], unclamped."""
        z = z.to(self.bn.running_mean.dtype) * self.bn.std() + self.bn.running_mean
        B, h, w, C4 = z.shape
        z = z.reshape(B, h, w, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C4 // 4, 2 * h, 2 * w)
        # In the weights' layout (channels-last on CUDA and the CPU): no convolution converts its input.
        z = z.contiguous(memory_format=torch.channels_last if self.decoder.conv_in.weight.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format)
        return self.decoder(z).permute(0, 2, 3, 1)
