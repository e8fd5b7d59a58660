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

from dataclasses import dataclass

import numpy as np

from ..weights import fp8_e4m3_to_f32

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
    """An NVFP4 weight as stored (see the module doc); `block_scales` are the raw E4M3 bytes, swizzled."""

    packed: np.ndarray  # uint8 (n, k/2)
    block_scales: np.ndarray  # uint8 scale_grid(n, k)
    scale: np.float32
    full_precision: bool = False

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
    `scales` one uint8 a group (E4M3 for nvfp4, E8M0 for mxfp8), times `scale` on the matmul's output."""

    weight: object
    scales: object
    scale: np.float32
    mode: str  # "nvfp4" (16 per group, 4 bits) or "mxfp8" (32 per group, 8 bits)


# The stored forms, for the callers that decode them (LoRA merges, conversion).
SCALED = (ScaledFP8, NVFP4, MXFP8)


def nvfp4_lsb_first(t: NVFP4) -> FPQuant:
    """NVFP4 in MLX's `nvfp4` layout with the codes as bytes (element 2j in the low nibble, as MLX and the
    torch backend's unpack read them) and the block scales in row order."""
    p = t.packed.view(np.uint8)
    return FPQuant(((p << 4) | (p >> 4)).astype(np.uint8), np.ascontiguousarray(t.scales()), t.scale, "nvfp4")


def mlx_layout(t: ScaledFP8 | NVFP4 | MXFP8) -> FPQuant | np.ndarray:
    """The same values for MLX's quantized matmul, bit for bit; float32 decoded where the file asks for a
    full-precision matmul or, for FP8, the rows are not whole 32-value groups."""
    n, k = t.shape
    if t.full_precision or (isinstance(t, ScaledFP8) and k % 32):
        return t.dequantize()
    if isinstance(t, NVFP4):
        q = nvfp4_lsb_first(t)
        return FPQuant(q.weight.view("<u4"), q.scales, q.scale, q.mode)
    if isinstance(t, MXFP8):  # MLX's own mode; its scale byte 0 means 2^-127, with all-zero codes still 0
        codes = np.ascontiguousarray(t.codes).view(np.uint8).view("<u4")
        return FPQuant(codes, np.ascontiguousarray(t.scales()), np.float32(1), "mxfp8")
    # mxfp8 multiplies each E4M3 code by 2^(e - 127): with e = 127 the codes as they are.
    codes = np.ascontiguousarray(t.codes).view(np.uint8).view("<u4")
    return FPQuant(codes, np.full((n, k // 32), 127, np.uint8), t.scale, "mxfp8")
