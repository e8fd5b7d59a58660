"""FP8, MXFP8 and NVFP4 weights, as BFL's and Comfy-Org's quantized FLUX.2 files store them
(ComfyUI's mixed-precision layers, written by comfy-kitchen), their exact decoding, and the repack into
MLX's `nvfp4` / `mxfp8` layouts. Numpy only.

- FP8: codes F8_E4M3 (n, k) and `weight_scale`, one float32 per tensor: w = float(code) · weight_scale.
- MXFP8: codes F8_E4M3 (n, k) and `weight_scale` E8M0, one per 32 values of a row, in the same 128 × 4
  tiles, shape (roundup(n, 128), roundup(k/32, 4)): w = float(code) · 2^(scale - 127), a scale byte 0
  (an all-zero block) giving 0.
- NVFP4: uint8 (n, k/2), two E2M1 codes a byte, element 2j in the HIGH nibble; `weight_scale` E4M3, one per
  16 values of a row, in cuBLAS's 128 × 4 tiled layout of shape (roundup(n, 128), roundup(k/16, 4));
  `weight_scale_2` one float32: w = E2M1[code] · (float(block scale) · weight_scale_2), the two scales
  multiplied first (comfy-kitchen's dequantize_nvfp4, in float32).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..weights import F8_E4M3, fp8_e4m3_to_f32

# Entry.stored of these layers (the file's own dtypes, F8_E4M3 / U8, say nothing of the scales).
SCALED_TYPES = ("FP8", "NVFP4", "MXFP8")
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


@dataclass(frozen=True, eq=False)
class ScaledFP8:
    """An FP8 weight with one float32 scale. full_precision: the file asks for its matmul in the compute
    dtype (the marker's `full_precision_matrix_mult`). input_scale: the file's activation scale, for FP8
    matmuls that quantize the activations too (W8A8), None when it has none."""

    codes: np.ndarray  # F8_E4M3 bits (n, k)
    scale: np.float32
    full_precision: bool = False
    input_scale: np.float32 | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        """float32, one rounding per value (comfy-kitchen's dequantize_per_tensor_fp8 in float32)."""
        return fp8_e4m3_to_f32(self.codes) * self.scale


def scale_grid(n: int, k: int, group: int = 16) -> tuple[int, int]:
    """Shape of the swizzled block scales of an (n, k) weight with a scale per `group` values of a row:
    whole 128-row × 4-block tiles."""
    return -(-n // 128) * 128, -(-(k // group) // 4) * 4


def unswizzle(tiles: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """cuBLAS's 128 × 4 scale tiles → (rows, cols) in row order. Each tile of 128 rows × 4 columns is 512
    bytes, tiles row-major over the grid; in a tile, row 32·i + j, column c sits at byte 16·j + 4·i + c."""
    rb, cb = -(-rows // 128), -(-cols // 4)
    t = tiles.reshape(rb, cb, 32, 4, 4).transpose(0, 1, 3, 2, 4).reshape(rb, cb, 128, 4)
    return t.transpose(0, 2, 1, 3).reshape(rb * 128, cb * 4)[:rows, :cols]


@dataclass(frozen=True, eq=False)
class NVFP4:
    """An NVFP4 weight as stored (see the module doc); `block_scales` are the raw E4M3 bytes, swizzled.
    input_scale: the file's per-tensor activation scale, for torch's FP4 matmuls (None when it has none)."""

    packed: np.ndarray  # uint8 (n, k/2)
    block_scales: np.ndarray  # uint8 scale_grid(n, k)
    scale: np.float32
    full_precision: bool = False
    input_scale: np.float32 | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def codes(self) -> np.ndarray:
        """uint8 E2M1 codes (n, k), in element order."""
        p = self.packed.view(np.uint8)
        return np.stack([p >> 4, p & 15], axis=-1).reshape(self.shape)

    def scales(self) -> np.ndarray:
        """The E4M3 block scale bytes (n, k/16), in element order."""
        n, k = self.shape
        return unswizzle(self.block_scales.view(np.uint8), n, k // 16)

    def dequantize(self) -> np.ndarray:
        n, k = self.shape
        block = fp8_e4m3_to_f32(self.scales()) * self.scale  # rounded once, as comfy-kitchen does
        return (E2M1[self.codes()].reshape(n, k // 16, 16) * block[..., None]).reshape(n, k)


@dataclass(frozen=True, eq=False)
class MXFP8:
    """An MXFP8 weight as stored (see the module doc); `block_scales` the raw E8M0 bytes, swizzled."""

    codes: np.ndarray  # F8_E4M3 bits (n, k)
    block_scales: np.ndarray  # uint8 scale_grid(n, k, 32)
    full_precision: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def scales(self) -> np.ndarray:
        """The E8M0 block scale bytes (n, k/32), in element order."""
        n, k = self.shape
        return unswizzle(self.block_scales.view(np.uint8), n, k // 32)

    def dequantize(self) -> np.ndarray:
        n, k = self.shape
        e = self.scales().astype(np.uint32)
        block = np.where(e == 0, 0, e << 23).astype(np.uint32).view(np.float32)  # 2^(e - 127), exact
        return (fp8_e4m3_to_f32(self.codes).reshape(n, k // 32, 32) * block[..., None]).reshape(n, k)


@dataclass(frozen=True, eq=False)
class FPQuant:
    """A weight in MLX's `nvfp4` or `mxfp8` layout: `weight` uint32 codes packed LSB first along each row,
    `scales` one uint8 a group (E4M3 for nvfp4, E8M0 for mxfp8), times `scale` on the matmul's output.
    full_precision and input_scale: the stored NVFP4's, for the torch backend's choice of matmul."""

    weight: object
    scales: object
    scale: np.float32
    mode: str  # "nvfp4" (16 per group, 4 bits) or "mxfp8" (32 per group, 8 bits)
    full_precision: bool = False
    input_scale: object = None


# The stored forms, for the callers that decode them (LoRA merges, conversion).
SCALED = (ScaledFP8, NVFP4, MXFP8)


def nvfp4_lsb_first(t: NVFP4) -> FPQuant:
    """NVFP4 in MLX's `nvfp4` layout with the codes as bytes (element 2j in the low nibble, as MLX and the
    torch backend's unpack read them) and the block scales in row order."""
    p = t.packed.view(np.uint8)
    return FPQuant(((p << 4) | (p >> 4)).astype(np.uint8), np.ascontiguousarray(t.scales()), t.scale, "nvfp4",
                   t.full_precision, t.input_scale)


def mxfp8_row_order(t: MXFP8) -> FPQuant:
    """MXFP8 in MLX's `mxfp8` layout (its own mode: a scale byte 0 means 2^-127 there, and an all-zero block's
    codes still give 0) with the codes as bytes and the block scales in row order."""
    codes = np.ascontiguousarray(t.codes).view(np.uint8)
    return FPQuant(codes, np.ascontiguousarray(t.scales()), np.float32(1), "mxfp8")


def mlx_decodes(shape: tuple[int, ...], full_precision: bool, fp8: bool) -> bool:
    """Whether MLX holds a scaled layer decoded rather than quantized: where the file asks for a
    full-precision matmul or, for per-tensor-scaled FP8, the rows are not whole 32-value groups."""
    return full_precision or (fp8 and shape[-1] % 32 != 0)


def mlx_layout(t: ScaledFP8 | NVFP4 | MXFP8) -> FPQuant | np.ndarray:
    """The same values for MLX's quantized matmul, bit for bit; float32 decoded where `mlx_decodes`."""
    n, k = t.shape
    if mlx_decodes(t.shape, t.full_precision, isinstance(t, ScaledFP8)):
        return t.dequantize()
    if isinstance(t, (NVFP4, MXFP8)):
        q = nvfp4_lsb_first(t) if isinstance(t, NVFP4) else mxfp8_row_order(t)
        return FPQuant(q.weight.view("<u4"), q.scales, q.scale, q.mode)
    # mxfp8 multiplies each E4M3 code by 2^(e - 127): with e = 127 the codes as they are.
    codes = np.ascontiguousarray(t.codes).view(np.uint8).view("<u4")
    return FPQuant(codes, np.full((n, k // 32), 127, np.uint8), t.scale, "mxfp8")


# ---- Quantizers, for `flux2 convert --type fp8 / nvfp4 / mxfp8`: comfy-kitchen's quantize_per_tensor_fp8,
# quantize_nvfp4 and quantize_mxfp8 (its eager backend, float32 input) operation for operation, so a file
# written here holds the bytes comfy-kitchen would write for the same float32 weights. ----

E4M3_MAX, E2M1_MAX = np.float32(448), np.float32(6)


def f32_to_e4m3(a: np.ndarray) -> np.ndarray:
    """float32 → E4M3 bytes, rounded to nearest even (torch's `.to(float8_e4m3fn)`) for |a| ≤ 448."""
    a = np.asarray(a, np.float32)
    bits = a.view(np.uint32)
    sign = (bits >> 24).astype(np.uint8) & np.uint8(0x80)
    mag = bits & np.uint32(0x7FFFFFFF)
    # the mantissa rounded to 3 bits (carrying into the exponent), rebased from float32's exponent bias
    code = ((mag + np.uint32(0x7FFFF) + ((mag >> 20) & np.uint32(1))) >> 20) - np.uint32((127 - 7) << 3)
    sub = mag < 0x3C800000  # below 2^-6, E4M3's smallest normal: subnormal steps of 2^-9
    code[sub] = np.rint(np.abs(a[sub]) * np.float32(512)).astype(np.uint32)
    return (code.astype(np.uint8) | sign).view(F8_E4M3)


def e2m1_codes(a: np.ndarray) -> np.ndarray:
    """float32 in [-6, 6] → E2M1 codes (uint8 0..15), nearest even as torchao's _f32_to_floatx_unpacked."""
    m = np.abs(a)
    code = ((m > .25).astype(np.uint8) + (m >= .75) + (m > 1.25) + (m >= 1.75) + (m > 2.5) + (m >= 3.5)
            + (m > 5))
    return code | (np.signbit(a).astype(np.uint8) << 3)


def swizzle(scales: np.ndarray) -> np.ndarray:
    """(rows, cols) block scales → cuBLAS's 128 × 4 tiles, shape (roundup(rows, 128), roundup(cols, 4)),
    zero-padded (the inverse of `unswizzle`; comfy-kitchen's to_blocked)."""
    rows, cols = scales.shape
    rb, cb = -(-rows // 128), -(-cols // 4)
    padded = np.zeros((rb * 128, cb * 4), scales.dtype)
    padded[:rows, :cols] = scales
    t = padded.reshape(rb, 128, cb, 4).transpose(0, 2, 1, 3).reshape(-1, 4, 32, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(t).reshape(rb * 128, cb * 4)


def fp8_tensor_scale(amax) -> np.float32:
    """comfy-kitchen's per-tensor FP8 scale amax / 448 (1 for an all-zero tensor, where it would divide
    0 by 0)."""
    s = np.float32(amax) / E4M3_MAX
    return s if s > 0 else np.float32(1)


def nvfp4_tensor_scale(amax) -> np.float32:
    """weight_scale_2 = amax / (448 · 6) (1 for an all-zero tensor)."""
    s = np.float32(amax) / np.float32(448 * 6)
    return s if s > 0 else np.float32(1)


def quantize_fp8_rows(a: np.ndarray, scale: np.float32) -> np.ndarray:
    """E4M3 codes of float32 rows under the per-tensor `scale`: x · (1 / scale), clamped to ±448."""
    return f32_to_e4m3(np.clip(a * (np.float32(1) / scale), -E4M3_MAX, E4M3_MAX))


def quantize_nvfp4_rows(a: np.ndarray, scale: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 (n, k/2), E4M3 block scale bytes (n, k/16) in row order) of float32 rows, k % 16 == 0."""
    n, k = a.shape
    x = a.reshape(n, k // 16, 16)
    block = np.minimum(np.abs(x).max(axis=-1) / E2M1_MAX / scale, E4M3_MAX)
    sbytes = f32_to_e4m3(block)
    total = scale * fp8_e4m3_to_f32(sbytes)
    zero = total == 0
    d = x / np.where(zero, np.float32(1), total)[..., None]
    d = np.clip(np.where(zero[..., None], np.float32(0), d), -E2M1_MAX, E2M1_MAX)
    c = e2m1_codes(d).reshape(n, k)
    return (c[:, 0::2] << 4) | c[:, 1::2], sbytes.view(np.uint8)


def quantize_mxfp8_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E4M3 codes (n, k), E8M0 block scale bytes (n, k/32) in row order) of float32 rows, k % 32 == 0."""
    n, k = a.shape
    x = a.reshape(n, k // 32, 32)
    amax = np.abs(x).max(axis=-1)
    need = np.maximum(amax / E4M3_MAX, np.float32(2.0 ** -127))
    e = np.clip(np.ceil(np.log2(need)).astype(np.int32) + 127, 0, 254)
    block = np.where(e == 0, 0, e.astype(np.uint32) << 23).astype(np.uint32).view(np.float32)
    zero = amax == 0
    d = x / np.where(zero, np.float32(1), block)[..., None]
    d = np.clip(np.where(zero[..., None], np.float32(0), d), -E4M3_MAX, E4M3_MAX)
    return f32_to_e4m3(d).reshape(n, k), np.where(zero, 0, e).astype(np.uint8)


def quantize_fp8(a: np.ndarray) -> ScaledFP8:
    scale = fp8_tensor_scale(np.abs(a).max())
    return ScaledFP8(quantize_fp8_rows(a, scale), scale)


def quantize_nvfp4(a: np.ndarray) -> NVFP4:
    scale = nvfp4_tensor_scale(np.abs(a).max())
    packed, s = quantize_nvfp4_rows(a, scale)
    return NVFP4(packed, swizzle(s), scale)


def quantize_mxfp8(a: np.ndarray) -> MXFP8:
    codes, s = quantize_mxfp8_rows(a)
    return MXFP8(codes, swizzle(s))


def comfy_marker(fmt: str) -> np.ndarray:
    return np.frombuffer(json.dumps({"format": fmt}).encode(), np.uint8).copy()
