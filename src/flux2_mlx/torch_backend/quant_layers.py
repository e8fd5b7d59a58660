"""PyTorch quantized layers: GGUF blocks, block-scaled FP8 and per-tensor-scaled FP8 / NVFP4 weights, held
as stored.

GGUF weights are repacked (quant/affine.py) into the affine layout MLX runs: per group of
`group_size` values w = scale · q + bias, the codes q a little-endian bit stream; Q6_K, Q3_K and Q2_K keep
their blocks' fields as the file stores them (quant/kblocks.py). FP8 checkpoints keep
their one-byte codes and block scales. Both stay so in device memory; each call decodes one layer's
weight into the compute dtype, right before its matmul, or (FP8, `--fp8-matmul`; NVFP4 on GPUs with FP4
tensor cores) quantizes the activations to FP8 / NVFP4 too and multiplies codes by codes on the GPU's
scaled matmul kernels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.ggml import GGMLType
from ..quant.kblocks import FIELDS, KBlocks
from ..quant.scaled import E2M1, FPQuant, ScaledFP8


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


def _shifts(values, shape, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device).reshape(shape)


# gguf-py's dequantize_blocks, on the fields of a block (quant/kblocks.py) broadcast over (h, s, k, t) of
# element 128 h + 32 s + 16 k + t; the same float32 products in the same order, so the same bits. Signed
# levels are formed in uint8 (wrapping) and read as int8: one float32 pass fewer per offset.
def _q6_k(ql, qh, scales, d):
    # s = 2 n + j: nibble n of ql[64 h + 32 j + 16 k + t] | bit pair s of qh[32 h + 16 k + t] << 4
    lead = ql.shape[:-1]
    low = (ql.reshape(*lead, 2, 1, 2, 2, 16) >> _shifts([0, 4], (2, 1, 1, 1), ql)).bitwise_and_(15)
    high = (qh.reshape(*lead, 2, 1, 1, 2, 16) >> _shifts([0, 2, 4, 6], (2, 2, 1, 1), qh)).bitwise_and_(3)
    q = low.bitwise_or_(high.bitwise_left_shift_(4)).sub_(32).view(torch.int8)
    sc = scales.float().reshape(*lead, 2, 2, 2, 2, 1)
    return (d.float().reshape(*lead, 1, 1, 1, 1, 1) * sc) * q.float()


def _q3_k(hmask, qs, scales, d):
    lead = qs.shape[:-1]
    low = (qs.reshape(*lead, 2, 1, 2, 16) >> _shifts([0, 2, 4, 6], (4, 1, 1), qs)).bitwise_and_(3)
    high = (hmask.reshape(*lead, 1, 1, 2, 16) >> _shifts(list(range(8)), (2, 4, 1, 1), qs)).bitwise_and_(1)
    q = low.add_(high.bitwise_left_shift_(2)).sub_(4).view(torch.int8)  # minus 4 where the bit is clear
    # 6-bit scales: low 4 bits from nibbles of bytes 0-7, high 2 bits from bit pairs of bytes 8-11
    lo = (scales[..., :8].reshape(*lead, 1, 8) >> _shifts([0, 4], (2, 1), qs)) & 15
    hi = (scales[..., 8:].reshape(*lead, 1, 4) >> _shifts([0, 2, 4, 6], (4, 1), qs)) & 3
    sc = (lo.reshape(*lead, 16) | (hi.reshape(*lead, 16) << 4)).float() - 32
    return (d.float().reshape(*lead, 1, 1, 1, 1) * sc.reshape(*lead, 2, 4, 2, 1)) * q.float()


def _q2_k(scales, qs, d, dmin):
    lead = qs.shape[:-1]
    q = (qs.reshape(*lead, 2, 1, 2, 16) >> _shifts([0, 2, 4, 6], (4, 1, 1), qs)).bitwise_and_(3)
    sc = scales.reshape(*lead, 2, 4, 2, 1)
    dl = d.float().reshape(*lead, 1, 1, 1, 1) * (sc & 15).float()
    ml = dmin.float().reshape(*lead, 1, 1, 1, 1) * (sc >> 4).float()
    return torch.addcmul(-ml, dl, q.float())  # dl · q is exact: a fused multiply-add rounds the same


_DECODE = {GGMLType.Q6_K: _q6_k, GGMLType.Q3_K: _q3_k, GGMLType.Q2_K: _q2_k}


def decode_kblocks(t: GGMLType, fields, dtype: torch.dtype) -> torch.Tensor:
    """Block fields (*lead, blocks, bytes) → weights (*lead, blocks · 256) in `dtype`, as gguf-py decodes
    them (bit for bit in float32)."""
    *lead, nb, _ = fields[0].shape
    return _DECODE[GGMLType(t)](*fields).to(dtype).reshape(*lead, nb * 256)


class KBlocksLinear(nn.Module):
    """A bias-free Linear held as Q6_K / Q3_K / Q2_K block fields (quant.kblocks.KBlocks), its weight decoded
    into `dtype` on each call and dropped after the matmul."""

    def __init__(self, q: KBlocks, dtype: torch.dtype):
        super().__init__()
        self.type, self.dtype = q.type, dtype
        for name, a in zip(q.names, q.fields):
            self.register_buffer(name, a)

    def fields(self, rows=None) -> list[torch.Tensor]:
        return [getattr(self, n) if rows is None else getattr(self, n)[rows] for n, _, _ in FIELDS[self.type]]

    def dense(self) -> torch.Tensor:
        return decode_kblocks(self.type, self.fields(), self.dtype)

    def forward(self, x):
        return F.linear(x, self.dense())


class KBlocksEmbedding(KBlocksLinear):
    """An Embedding held as block fields; only the looked-up rows are decoded."""

    def forward(self, ids):
        return decode_kblocks(self.type, self.fields(ids), self.dtype)


class LoraLinear(nn.Module):
    """A quantized Linear with its LoRAs as a separate branch (lora.LoraQuant): y = base_scale ⊙ base(x) +
    (x @ downᵀ) @ upᵀ + x @ denseᵀ; the factors absent (None) where the file has no such terms."""

    def __init__(self, base: nn.Module, down, up, dense, base_scale=None):
        super().__init__()
        self.base = base
        self.register_buffer("down", down)
        self.register_buffer("up", up)
        self.register_buffer("dense", dense)
        self.register_buffer("base_scale", base_scale)

    def forward(self, x):
        y = self.base(x)
        if self.base_scale is not None:
            y = y * self.base_scale
        if self.down is not None:
            y = y + F.linear(F.linear(x, self.down), self.up)
        if self.dense is not None:
            y = y + F.linear(x, self.dense)
        return y


class QuantEmbedding(QuantLinear):
    """An Embedding held packed; only the looked-up rows are unpacked."""

    def forward(self, ids):
        return dequantize(self.weight[ids], self.scales[ids], self.biases[ids], self.bits, self.group_size)


E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantize_fp8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (m, k) → e4m3 codes (m, k) and float32 scales (m, ceil(k / group)), x ≈ codes · scale: per row and
    group of `group` columns, scale = amax / 448 (the largest value maps to e4m3's largest)."""
    k = x.shape[1]
    g = F.pad(x.float(), (0, -k % group)).unflatten(1, (-1, group))
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX  # an all-zero group: codes 0
    # The clamp guards the one rounding that can push amax / scale past 448 (no infinity in e4m3fn).
    codes = (g / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes.flatten(1)[:, :k], scale.squeeze(-1)


@functools.cache
def fp8_matmul_kind(device: torch.device, dtype: torch.dtype) -> str | None:
    """How FP8Linear can multiply in FP8 on `device` with `dtype` results: "blockwise" (one call with
    1 × 128 activation and 128 × 128 weight scales: Hopper with cuBLAS ≥ 12.9), "rowwise" (one call per
    column block: CUDA 8.9+, the CPU), or None. One tiny call of each answers: torch's support depends on
    the GPU, the cuBLAS it loads and the build, not on the device type alone."""
    ones = functools.partial(torch.ones, device=device)

    def codes(*shape):
        return torch.zeros(*shape, device=device).to(torch.float8_e4m3fn)

    def runs(call) -> bool:
        try:
            call()
            return True
        # AttributeError: a torch without F.scaled_mm; TypeError: a device without float8 tensors (MPS).
        except (AttributeError, RuntimeError, TypeError, ValueError):
            return False

    if runs(lambda: F.scaled_mm(codes(16, 128), codes(128, 128).t(), ones(16, 1),
                                F.ScalingType.BlockWise1x128, ones(4, 1), F.ScalingType.BlockWise128x128,
                                output_dtype=dtype)):
        return "blockwise"
    if runs(lambda: torch._scaled_mm(codes(16, 128), codes(128, 128).t(), ones(16, 1), ones(1, 128),
                                     out_dtype=dtype)):
        return "rowwise"
    return None


class FP8Linear(nn.Module):
    """A bias-free Linear held as FP8 codes (out, in) and float32 `scale_inv` per block of rows × columns.
    matmul None: the weight is decoded as the numpy loader decodes it (code · scale in float32, one rounding),
    then cast to the compute dtype: the same values the MLX backend multiplies by. "blockwise" / "rowwise"
    (fp8_matmul_kind): the activations are quantized to e4m3 per token and weight column block
    (quantize_fp8) and multiplied code by code, each product scaled, summed in float32."""

    def __init__(self, codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                 dtype: torch.dtype, matmul: str | None = None):
        super().__init__()
        self.block, self.dtype = block, dtype
        self.register_buffer("weight", codes)
        self.register_buffer("scale_inv", scale_inv)
        (n, k), bk = codes.shape, block[1]
        if matmul == "blockwise" and (block != (128, 128) or n % 128 or k % 128
                                      or codes.dtype != torch.float8_e4m3fn):
            matmul = "rowwise"
        # CUDA's kernels take only multiples of 16 (as every released FP8 checkpoint's shapes are); the CPU's
        # take any, short last blocks included. A layer the kernel cannot take decodes its weight instead.
        if matmul == "rowwise" and codes.is_cuda and (n % 16 or k % 16 or bk % 16):
            matmul = None
        self.matmul = matmul
        # The weight scales in the kernel's layout, once, not per call. blockwise: k blocks padded to a
        # multiple of 4 (read transposed: column-major); rowwise: per column block, each output row's scale.
        self.register_buffer("matmul_scales", None if matmul is None else
                             F.pad(scale_inv, (0, -scale_inv.shape[1] % 4)) if matmul == "blockwise" else
                             scale_inv.repeat_interleave(block[0], 0)[:n].t().contiguous())

    def dense(self) -> torch.Tensor:
        (n, k), (bn, bk) = self.weight.shape, self.block
        scale = self.scale_inv.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        return (self.weight.float() * scale).to(self.dtype)

    def forward(self, x):
        if self.matmul is None:
            return F.linear(x, self.dense())
        bk = self.block[1]
        codes, scale = quantize_fp8(x.flatten(0, -2), bk)
        w = self.weight.t()  # (k, n) column-major, as the kernels take the second operand
        if self.matmul == "blockwise":
            # cuBLAS's layouts, both column-major: activation scales (m, k blocks), weight scales (k blocks
            # padded to a multiple of 4, n blocks).
            y = F.scaled_mm(codes, w, scale.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                            self.matmul_scales.t(), F.ScalingType.BlockWise128x128, output_dtype=self.dtype)
        else:  # column block j: each token's scale j times each output row's weight scale in block j
            sx, sw = scale.t().contiguous(), self.matmul_scales
            y = sum(torch._scaled_mm(codes[:, j * bk:(j + 1) * bk], w[j * bk:(j + 1) * bk], sx[j][:, None],
                                     sw[j][None], out_dtype=self.dtype).float()
                    for j in range(len(sx))).to(self.dtype)
        return y.unflatten(0, x.shape[:-1])


E2M1_MAX = 6.0


def swizzle_scales(s: torch.Tensor) -> torch.Tensor:
    """(rows, cols) block scale bytes → cuBLAS's 128 × 4 tiles, shape (roundup(rows, 128), roundup(cols, 4)),
    zero-padded: quant.scaled.swizzle in torch."""
    rows, cols = s.shape
    rb, cb = -(-rows // 128), -(-cols // 4)
    t = F.pad(s, (0, cb * 4 - cols, 0, rb * 128 - rows)).reshape(rb, 128, cb, 4).transpose(1, 2)
    return t.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(rb * 128, cb * 4)


def unswizzle_scales(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of swizzle_scales: quant.scaled.unswizzle in torch."""
    rb, cb = tiles.shape[0] // 128, tiles.shape[1] // 4
    t = tiles.reshape(rb, cb, 32, 4, 4).transpose(2, 3).reshape(rb, cb, 128, 4)
    return t.transpose(1, 2).reshape(rb * 128, cb * 4)[:rows, :cols]


def e2m1_codes(a: torch.Tensor) -> torch.Tensor:
    """float32 in [-6, 6] → E2M1 codes (uint8 0..15), nearest even (ties to the even code) as torchao's
    _f32_to_floatx_unpacked, which comfy-kitchen quantizes with; -0 keeps its sign bit there too."""
    m = a.abs()
    code = ((m > .25).to(torch.uint8) + (m >= .75) + (m > 1.25) + (m >= 1.75) + (m > 2.5) + (m >= 3.5)
            + (m > 5))
    return code | (torch.signbit(a).to(torch.uint8) << 3)


def quantize_nvfp4(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (m, k), k % 16 == 0, under the float32 per-tensor `scale` → (E2M1 codes as bytes (m, k/2), element
    2j in the low nibble as torch's float4_e2m1fn_x2 and cuBLAS read it; E4M3 block scale bytes, one per 16
    values of a row, swizzled), x ≈ E2M1[code] · block · scale. comfy-kitchen's eager quantize_nvfp4 operation
    for operation in float32 (it packs the high nibble first; either order multiplies alike as long as both
    operands share it, but the weights here are held low nibble first)."""
    g = x.float().unflatten(-1, (-1, 16))
    block = (g.abs().amax(-1) / E2M1_MAX / scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    total = scale * block.float()
    zero = total == 0  # an all-zero block: codes 0, not 0 / 0
    d = torch.where(zero[..., None], 0.0, g / torch.where(zero, 1.0, total)[..., None])
    c = e2m1_codes(d.clamp(-E2M1_MAX, E2M1_MAX)).flatten(-2)
    return c[:, 0::2] | (c[:, 1::2] << 4), swizzle_scales(block.view(torch.uint8))


def nvfp4_mm(a: torch.Tensor, a_scales: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
             b_scales: torch.Tensor, b_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ bᵀ on torch's FP4 matmul: NVFP4 codes as bytes (m, k/2) and (n, k/2), low nibble first, their
    swizzled E4M3 block scale bytes and float32 per-tensor scales, the output × a_scale · b_scale."""
    # cuBLAS's NVFP4 recipe, as comfy-kitchen's scaled_mm_nvfp4 passes it: E4M3 scales per 1 × 16 values in
    # 128 × 4 swizzled tiles, then one float32 scale per tensor.
    recipe = [F.ScalingType.BlockWise1x16, F.ScalingType.TensorWise]
    swizzle = [F.SwizzleType.SWIZZLE_32_4_4, F.SwizzleType.NO_SWIZZLE]
    return F.scaled_mm(a.view(torch.float4_e2m1fn_x2), b.view(torch.float4_e2m1fn_x2).t(),
                       [a_scales.view(torch.float8_e4m3fn).flatten(), a_scale.reshape(())], recipe,
                       [b_scales.view(torch.float8_e4m3fn).flatten(), b_scale.reshape(())], recipe,
                       swizzle, swizzle, output_dtype=dtype)


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, w_scales: torch.Tensor, w_scale: torch.Tensor,
                 x_scale: torch.Tensor | None, dtype: torch.dtype, mm=nvfp4_mm) -> torch.Tensor:
    """x @ Wᵀ with W NVFP4 (bytes (n, k/2) low nibble first, swizzled block scales, `w_scale`) and x quantized
    to NVFP4 by `x_scale` (the file's input_scale, as BFL's files mean their FP4 layers to run) or, where it
    has none, by amax / (448 · 6) as comfy-kitchen computes it; `mm` multiplies (nvfp4_mm's arguments)."""
    x2 = x.flatten(0, -2)
    m = x2.shape[0]
    x2 = F.pad(x2, (0, 0, 0, -m % 16))  # whole 16-row tiles, as comfy-kitchen pads its NVFP4 activations
    sx = x_scale if x_scale is not None else x2.abs().amax().float().clamp(min=1e-12) / (E4M3_MAX * E2M1_MAX)
    codes, scales = quantize_nvfp4(x2, sx.float())
    y = mm(codes, scales, sx.float(), weight, w_scales, w_scale, dtype)
    return y[:m].unflatten(0, x.shape[:-1])


@functools.cache
def nvfp4_matmul_kind(device: torch.device, dtype: torch.dtype) -> str:
    """"native" where torch multiplies NVFP4 codes by codes on `device` with `dtype` results (nvfp4_mm: CUDA
    GPUs with FP4 tensor cores, compute capability 10.x / 12.x, and a torch with F.scaled_mm), else "decode"
    (the weight decoded per layer). One tiny call answers, and its value is checked: a GPU without FP4
    kernels (Hopper) must not pass by returning something; the CPU's scaled_mm takes no swizzled scales."""
    if device.type != "cuda":
        return "decode"
    try:
        ones = torch.full((128, 64), 0x22, dtype=torch.uint8, device=device)  # every code 2: the value 1
        scales = torch.full((128, 8), 0x38, dtype=torch.uint8, device=device)  # E4M3 1.0 (tiles of ones)
        one = torch.ones((), device=device)
        y = nvfp4_mm(ones, scales, one, ones, scales, one, dtype)
        return "native" if bool((y == 128).all()) else "decode"
    # AttributeError: a torch without F.scaled_mm or float4_e2m1fn_x2; the others: no FP4 kernel here.
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return "decode"


def nvfp4_runs(q: FPQuant, dtype: torch.dtype) -> bool:
    """Whether an NVFP4 layer (an FPQuant of device tensors) multiplies on FP4 kernels: where
    nvfp4_matmul_kind says "native", the file asks for no full-precision matmul, and the sides are what cuBLAS
    takes (k a multiple of 32: rows of whole 16-byte runs; n of 16). Elsewhere its weight is decoded."""
    n, k = q.weight.shape[0], q.weight.shape[1] * 2
    return (q.mode == "nvfp4" and not q.full_precision and n % 16 == 0 and k % 32 == 0
            and nvfp4_matmul_kind(q.weight.device, dtype) == "native")


class ScaledLinear(nn.Module):
    """A bias-free Linear held as an FP8, MXFP8 or NVFP4 weight (quant/scaled.py), decoded as the numpy
    loader decodes it (float32, the scales multiplied first) into the compute dtype just before its matmul.
    `weight`: float8 codes (n, k) with no `block_scales` (FP8) or E8M0 bytes (n, k/32) (MXFP8), or NVFP4
    codes as bytes (n, k/2), low nibble first, with E4M3 `block_scales` (n, k/16); scales in row order;
    `scale` float32.
    fp8_matmul (FP8 only): multiply on torch's FP8 kernel instead (W8A8, as BFL's FP8 files are meant to
    run): the activations quantized to e4m3 by the file's `input_scale`, or by their largest magnitude / 448
    where it has none, each product scaled by both per-tensor scales.
    nvfp4_matmul (NVFP4 only): multiply on torch's FP4 kernel instead (nvfp4_linear); the block scales are
    then held in cuBLAS's swizzled tiles."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                 block_scales: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                 fp8_matmul: bool = False, nvfp4_matmul: bool = False):
        super().__init__()
        self.dtype, self.fp8_matmul = dtype, fp8_matmul and block_scales is None
        self.nvfp4_matmul = nvfp4_matmul and weight.dtype == torch.uint8
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("block_scales",
                             swizzle_scales(block_scales) if self.nvfp4_matmul else block_scales)
        self.register_buffer("input_scale", input_scale)
        # NVFP4: a byte's two values (low nibble first) in one lookup, no unpacked codes
        lut = torch.tensor(E2M1.tolist(), device=weight.device)
        self.register_buffer("pairs", None if weight.dtype != torch.uint8 else
                             torch.stack([lut.repeat(16), lut.repeat_interleave(16)], -1), persistent=False)

    def dense(self) -> torch.Tensor:
        if self.block_scales is None:
            return (self.weight.float() * self.scale).to(self.dtype)
        if self.weight.dtype == torch.float8_e4m3fn:  # MXFP8: each block times 2^(e - 127), e = 0 giving 0
            e = self.block_scales.to(torch.int32)
            block = torch.where(e == 0, 0, e << 23).view(torch.float32)
            return (self.weight.float().unflatten(-1, (-1, 32)) * block[..., None]).flatten(-2).to(self.dtype)
        (n, half), scales = self.weight.shape, self.block_scales
        scales = unswizzle_scales(scales, n, half // 8) if self.nvfp4_matmul else scales
        block = scales.view(torch.float8_e4m3fn).float() * self.scale
        codes = self.pairs[self.weight.int()].flatten(-2).unflatten(-1, (-1, 16))
        return (codes * block[..., None]).flatten(-2).to(self.dtype)

    def forward(self, x):
        if self.nvfp4_matmul:
            return nvfp4_linear(x, self.weight, self.block_scales, self.scale, self.input_scale, self.dtype)
        if not self.fp8_matmul:
            return F.linear(x, self.dense())
        x2 = x.flatten(0, -2).float()
        sx = self.input_scale if self.input_scale is not None else x2.abs().amax().clamp(min=1e-12) / E4M3_MAX
        codes = (x2 / sx).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # e4m3fn has no infinity
        y = torch._scaled_mm(codes, self.weight.t(), sx.reshape(()).float(), self.scale.reshape(()),
                             out_dtype=self.dtype)
        return y.unflatten(0, x.shape[:-1])


def _scaled_mm_runs(q, dtype: torch.dtype) -> bool:
    """Whether an FP8 layer multiplies on FP8 kernels: on CUDA GPUs that have them (8.9+), where the layer
    does not ask for a full-precision matmul and its sides are multiples of 16 (as cuBLAS needs). Elsewhere
    its weight is decoded, and the activations are not rounded to FP8."""
    n, k = q.codes.shape
    return (q.codes.is_cuda and not q.full_precision and n % 16 == 0 and k % 16 == 0
            and fp8_matmul_kind(q.codes.device, dtype) is not None)


def quantized_layer(old: nn.Module, q, dtype: torch.dtype, fp8_matmul: str | None = None) -> nn.Module:
    """A QuantLinear / QuantEmbedding / FP8Linear / ScaledLinear standing in for `old`, from q: an
    AffineQuant whose weight, scales and biases are already device tensors (weight as uint8 bytes, scales
    and biases in the compute dtype `dtype`), KBlocks of device tensors (a KBlocksLinear / KBlocksEmbedding),
    an FP8Blocks of device tensors (multiplied as FP8Linear's
    `matmul`), or a ScaledFP8 / FPQuant (NVFP4) of device tensors."""
    if isinstance(q, (ScaledFP8, FPQuant)):
        if isinstance(old, nn.Linear) and old.bias is None and isinstance(q, FPQuant):
            return ScaledLinear(q.weight, q.scale, dtype, q.scales, q.input_scale,
                                nvfp4_matmul=nvfp4_runs(q, dtype))
        if isinstance(old, nn.Linear) and old.bias is None:
            return ScaledLinear(q.codes, q.scale, dtype, input_scale=q.input_scale,
                                fp8_matmul=_scaled_mm_runs(q, dtype))
        raise ValueError(f"a quantized tensor cannot stand in for {type(old).__name__}")
    if hasattr(q, "scale_inv"):
        if isinstance(old, nn.Linear) and old.bias is None:
            return FP8Linear(q.codes, q.scale_inv, q.block, dtype, fp8_matmul)
        raise ValueError(f"an FP8 tensor cannot stand in for {type(old).__name__}")
    if isinstance(q, KBlocks) and isinstance(old, nn.Embedding):
        return KBlocksEmbedding(q, dtype)
    if isinstance(q, KBlocks) and isinstance(old, nn.Linear) and old.bias is None:
        return KBlocksLinear(q, dtype)
    if isinstance(q, KBlocks):
        raise ValueError(f"a quantized tensor cannot stand in for {type(old).__name__}")
    if isinstance(old, nn.Embedding):
        return QuantEmbedding(q.weight, q.scales, q.biases, q.bits, q.group_size)
    if isinstance(old, nn.Linear) and old.bias is None:
        return QuantLinear(q.weight, q.scales, q.biases, q.bits, q.group_size)
    raise ValueError(f"a quantized tensor cannot stand in for {type(old).__name__}")


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at a dotted parameter path such as `double_blocks.3.img_attn.qkv`."""
    parent, _, last = path.rpartition(".")
    setattr(root.get_submodule(parent), last, new)
