"""Q6_K, Q3_K and Q2_K blocks -> MLX affine groups in one compiled pass (numba).

Their 16-value sub-blocks do not fit MLX's 32/64/128 groups, so they are re-quantized (mlx_layout.REQUANT).
numpy does that as gguf-py's dequantize followed by mlx_layout.requantize: a dozen passes over
full-size float32 temporaries, about 100 M weights/s. Here each 256-value super-block is decoded into a
small buffer and re-quantized straight away. The float32 operations are the same, in the same order, so the
result equals requantize(dequantize(raw)) bit for bit (tests/test_quant_repack.py checks it).
"""

from __future__ import annotations

import numpy as np

from .ggml import GGMLType as T
from .jit import FP16_VALUE, f32, fp16, inline, kernel

__all__ = ["requantize_blocks"]

_KINDS = {T.Q6_K: (0, 210), T.Q3_K: (1, 110), T.Q2_K: (2, 84)}  # kernel switch, bytes per block
_SCALES = {"float32": 0, "float16": 1, "bfloat16": 2}


@inline
def _f16(blk, k):
    return FP16_VALUE[blk[k] | (np.int64(blk[k + 1]) << 8)]


@inline
def _decode(blk, kind, buf):
    """One super-block -> 256 float32 values, as gguf-py's dequantize_blocks computes them."""
    if kind == 0:  # Q6_K: ql[128] | qh[64] | int8 scales[16] | d; value (d * sc_j) * (q - 32)
        d = _f16(blk, 208)
        for e in range(256):
            a, r = e >> 7, e & 127
            lo = (blk[64 * a + (r & 63)] >> (4 * (r >> 6))) & 15
            hi = (blk[128 + 32 * a + (r & 31)] >> (2 * (r >> 5))) & 3
            sc = np.int64(blk[192 + (e >> 4)])
            buf[e] = (d * f32(sc - 256 if sc > 127 else sc)) * f32((lo | hi << 4) - 32)
    elif kind == 1:  # Q3_K: hmask[32] | qs[64] | 6-bit scales[12] | d; value (d * (sc_j - 32)) * q
        d = _f16(blk, 108)
        for e in range(256):
            j = e >> 4
            sc = ((blk[96 + (j & 7)] >> (4 * (j >> 3))) & 15) | ((blk[104 + (j & 3)] >> (2 * (j >> 2))) & 3) << 4
            a, r = e >> 7, e & 127
            q = (blk[32 + 32 * a + (r & 31)] >> (2 * (r >> 5))) & 3
            high = (blk[e & 31] >> (e >> 5)) & 1
            buf[e] = (d * f32(np.int64(sc) - 32)) * f32(np.int64(q) - 4 * (1 - np.int64(high)))
    else:  # Q2_K: scales[16] | qs[64] | d | dmin; value (d * (sc_j & 15)) * q - dmin * (sc_j >> 4)
        d, dmin = _f16(blk, 80), _f16(blk, 82)
        for e in range(256):
            sc = blk[e >> 4]
            a, r = e >> 7, e & 127
            q = (blk[16 + 32 * a + (r & 31)] >> (2 * (r >> 5))) & 3
            buf[e] = (d * f32(sc & 15)) * f32(q) - dmin * f32(sc >> 4)


@inline
def _round(v, sdt):
    """mlx_layout._round_scales of one value: float32, float16 or bfloat16 (nearest even), as float32."""
    if sdt == 1:
        return fp16(v)[1]
    if sdt == 2:
        u = np.int64(f32(v).view(np.uint32))
        return np.uint32((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).view(np.float32)
    return f32(v)


@kernel
def _requant(blocks, kind, bits, group, sdt, codes, scales, biases):
    """blocks (rows, nb, bytes) -> codes (rows, n) uint8, scales/biases (rows, n / group) float32."""
    buf = np.empty(256, f32)
    top = f32((1 << bits) - 1)
    per = 256 // group
    for r in range(blocks.shape[0]):
        for b in range(blocks.shape[1]):
            _decode(blocks[r, b], kind, buf)
            for g in range(per):
                lo, hi = buf[g * group], buf[g * group]
                for i in range(g * group + 1, (g + 1) * group):
                    lo = min(lo, buf[i])
                    hi = max(hi, buf[i])
                bias = _round(lo, sdt)
                scale = _round((hi - lo) / top, sdt)
                scales[r, b * per + g], biases[r, b * per + g] = scale, bias
                for i in range(g * group, (g + 1) * group):
                    q = f32(0)
                    if scale > 0:  # constant groups have scale 0 and code 0
                        q = min(max(np.rint((buf[i] - bias) / scale), f32(0)), top)
                    codes[r, b * 256 + i] = np.uint8(q)


def requantize_blocks(raw: np.ndarray, t: T, n: int, bits: int, group: int, scales_dtype: str):
    """Raw Q6_K/Q3_K/Q2_K rows (rows, row_bytes) of length n -> (uint8 codes (rows, n), scales, biases)
    with scales and biases in `scales_dtype` ("float32", "float16" or "bfloat16" held in float32)."""
    kind, size = _KINDS[t]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(raw.shape[0], n // 256, size)
    codes = np.empty((raw.shape[0], n), np.uint8)
    scales = np.empty((raw.shape[0], n // group), np.float32)
    biases = np.empty_like(scales)
    _requant(blocks, kind, bits, group, _SCALES[scales_dtype], codes, scales, biases)
    if scales_dtype == "float16":
        scales, biases = scales.astype(np.float16), biases.astype(np.float16)
    return codes, scales, biases
