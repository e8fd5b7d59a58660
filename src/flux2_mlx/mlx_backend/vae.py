"""The FLUX.2 autoencoder in MLX (channels-last), attribute names as in BFL's `ae.safetensors`.

Imports only mlx and config (flux2 src/flux2/autoencoder.py). Patchify order and the batch-norm latent
statistics: docs/architecture.md, 'VAE and latents'.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..config import VAEConfig


def _norm(groups: int, c: int) -> nn.GroupNorm:
    # PyTorch groups consecutive channels; MLX's default would put channel c in group c mod G.
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True, pytorch_compatible=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if "nin_shortcut" in self else x) + h


class AttnBlock(nn.Module):
    """Single-head attention over all H·W positions; q/k/v/proj_out are 1x1 convs as in BFL."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(groups, c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(B, 1, H * W, C) for f in (self.q, self.k, self.v))
        h = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(C))
        return x + self.proj_out(h.reshape(B, H, W, C))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # Asymmetric: zero-pad only right and bottom, then a 3x3 stride-2 conv without padding.
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
        return self.conv(x.reshape(B, 2 * H, 2 * W, C))


class Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def __call__(self, x: mx.array) -> mx.array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` (ResNet list) and an optional `downsample` / `upsample`."""

    def __init__(self, blocks: list[ResnetBlock], name: str | None = None,
                 sampler: nn.Module | None = None):
        super().__init__()
        self.block = blocks
        if name is not None:
            setattr(self, name, sampler)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chans = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = []
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

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if "downsample" in level:
                h = level.downsample(h)
        h = self.conv_out(nn.silu(self.norm_out(self.mid(h))))
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
        self.up = up
        self.norm_out = _norm(g, cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if "upsample" in level:
                h = level.upsample(h)
        return self.conv_out(nn.silu(self.norm_out(h)))


class BatchNormStats(nn.Module):
    """BFL's `bn` (BatchNorm2d, affine=False), only ever used in eval mode: its running stats."""

    def __init__(self, c: int, eps: float):
        super().__init__()
        self.eps = eps
        self.running_mean = mx.zeros((c,))
        self.running_var = mx.ones((c,))

    def std(self) -> mx.array:
        return mx.sqrt(self.running_var + self.eps)


class AutoEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.z_channels = cfg.z_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.bn = BatchNormStats(4 * cfg.z_channels, cfg.bn_eps)

    def encode(self, x: mx.array) -> mx.array:
        """Image (B, H, W, 3) in [-1, 1], H and W multiples of 16 → BN-normalized, patchified
        latents (B, H/16, W/16, 4z)."""
        z = self.encoder(x.astype(self.bn.running_mean.dtype))[..., : self.z_channels]  # the mean
        B, H, W, C = z.shape
        # 2x2 patchify, new channel index c·4 + pi·2 + pj, (pi, pj) the offset inside the cell (BFL's order).
        z = z.reshape(B, H // 2, 2, W // 2, 2, C).transpose(0, 1, 3, 5, 2, 4)
        return (z.reshape(B, H // 2, W // 2, 4 * C) - self.bn.running_mean) / self.bn.std()

    def decode(self, z: mx.array) -> mx.array:
        """(B, h, w, 4z) normalized latents → (B, 16h, 16w, 3) image in about [-1, 1], unclamped."""
        z = z.astype(self.bn.running_mean.dtype) * self.bn.std() + self.bn.running_mean
        B, h, w, C4 = z.shape
        z = z.reshape(B, h, w, C4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
        return self.decoder(z.reshape(B, 2 * h, 2 * w, C4 // 4))
