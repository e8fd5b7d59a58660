"""ggml blocks -> MLX affine groups (packed codes, scales, biases), one compiled pass per block (numba).

Two kinds of kernel, both checked bit for bit against numpy and gguf-py in tests/test_quant_repack.py:
- exact repacks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q3_K as 8-bit codes): the codes are the file's
  codes; the scales and biases are exact float32 products of its fp16 fields;
- re-quantization of Q6_K, Q3_K and Q2_K, whose 16-value sub-blocks do not fit MLX's groups: each 256-value
  super-block is decoded as gguf-py's dequantize computes it, then quantized as affine.requantize does,
  with the same float32 operations in the same order.
numpy needs a dozen passes over full-size temporaries for either; these kernels read each block once.
"""

from __future__ import annotations

import numpy as np

from .ggml import GGMLType as T
from .jit import FP16_VALUE, bf16_round_bits, f32, fp16, inline, kernel

__all__ = ["EXACT_KINDS", "exact_blocks", "requantize_blocks"]

# kernel switch and bytes per block
EXACT_KINDS = {T.Q4_0: (0, 18), T.Q4_1: (1, 20), T.Q5_0: (2, 22), T.Q5_1: (3, 24), T.Q8_0: (4, 34),
               T.Q4_K: (5, 144), T.Q5_K: (6, 176), T.Q3_K: (7, 110)}
_LOSSY_KINDS = {T.Q6_K: (0, 210), T.Q3_K: (1, 110), T.Q2_K: (2, 84)}
_SCALES = {"float32": 0, "float16": 1, "bfloat16": 2}


@inline
def _f16(blk, k):
    return FP16_VALUE[blk[k] | (np.int64(blk[k + 1]) << 8)]


@inline
def _pack(c, n, bits, out, o):
    """n codes -> MLX's little-endian bit stream at out[o:], element 0 in the low bits (n*bits/8 bytes)."""
    if bits == 8:
        for i in range(n):
            out[o + i] = c[i]
    elif bits == 4:
        for i in range(n // 2):
            out[o + i] = c[2 * i] | (c[2 * i + 1] << 4)
    else:  # 5 bits: 8 codes fill 5 bytes
        for i in range(n // 8):
            v = np.int64(0)
            for k in range(8):
                v |= np.int64(c[8 * i + k]) << (5 * k)
            for k in range(5):
                out[o + 5 * i + k] = (v >> (8 * k)) & 0xFF


@inline
def _q3_k_sub(blk, j):
    """Q3_K's 6-bit scale code of sub-block j, minus 32."""
    low, high = (blk[96 + (j & 7)] >> (4 * (j >> 3))) & 15, (blk[104 + (j & 3)] >> (2 * (j >> 2))) & 3
    return np.int64(low | high << 4) - 32


@inline
def _q3_k_level(blk, e):
    """Q3_K's signed level of element e: 2 low bits from qs, minus 4 where the hmask bit is clear."""
    a, r = e >> 7, e & 127
    q = (blk[32 + 32 * a + (r & 31)] >> (2 * (r >> 5))) & 3
    return np.int64(q) - 4 * (1 - np.int64((blk[e & 31] >> (e >> 5)) & 1))


@kernel
def _exact(blocks, kind, bits, codes, scales, biases):
    """blocks (rows, nb, bytes) -> packed codes (rows, n*bits/8) uint8, scales/biases (rows, groups) float32.
    One group per 32-value (sub-)block; Q3_K: 128-value groups of 8-bit codes 128 - sc*q (scale -d,
    bias 128 d)."""
    per = 256 if kind >= 5 else 32  # values per block
    c = np.empty(per, np.uint8)
    for r in range(blocks.shape[0]):
        for b in range(blocks.shape[1]):
            blk = blocks[r, b]
            d = _f16(blk, 0) if kind != 7 else _f16(blk, 108)
            # Q4_0, Q4_1, Q5_0, Q5_1: d | (m) | (qh u32) | qs[16], q[j] = nibble j // 16 of qs[j % 16]
            if kind <= 3:
                off = 2 + 2 * (kind & 1)
                qs = off + 4 * (kind >> 1)
                for j in range(32):
                    q = (blk[qs + (j & 15)] >> (4 * (j >> 4))) & 15
                    if kind >= 2:
                        q |= ((blk[off + (j >> 3)] >> (j & 7)) & 1) << 4
                    c[j] = q
                scales[r, b] = d
                biases[r, b] = _f16(blk, 2) if kind & 1 else f32(-(8 << (kind >> 1))) * d
            elif kind == 4:  # Q8_0: d | int8[32]; int8 + 128 = byte ^ 0x80
                for j in range(32):
                    c[j] = blk[2 + j] ^ 0x80
                scales[r, b] = d
                biases[r, b] = f32(-128) * d
            elif kind <= 6:  # Q4_K, Q5_K: d | dmin | 12 bytes of 6-bit (scale, min) | (qh[32]) | qs[128]
                dmin = _f16(blk, 2)
                for j in range(8):
                    if j < 4:
                        sc, m = blk[4 + j] & 63, blk[8 + j] & 63
                    else:
                        sc = (blk[12 + j - 4] & 15) | ((blk[4 + j - 4] >> 6) << 4)
                        m = (blk[12 + j - 4] >> 4) | ((blk[8 + j - 4] >> 6) << 4)
                    scales[r, 8 * b + j] = d * f32(sc)
                    biases[r, 8 * b + j] = -(dmin * f32(m))
                qs = 16 if kind == 5 else 48
                # element 64c + 32h + t: nibble h of qs[32c + t]; Q5_K bit 2c + h of qh[t]
                for e in range(256):
                    cc, h, t = e >> 6, (e >> 5) & 1, e & 31
                    q = (blk[qs + 32 * cc + t] >> (4 * h)) & 15
                    if kind == 6:
                        q |= ((blk[16 + t] >> (2 * cc + h)) & 1) << 4
                    c[e] = q
            else:  # Q3_K: sc*q is an integer in [-124, 128], exact as code 128 - sc*q
                for j in range(16):
                    sub = _q3_k_sub(blk, j)
                    for e in range(16 * j, 16 * j + 16):
                        c[e] = 128 - sub * _q3_k_level(blk, e)
                scales[r, 2 * b] = scales[r, 2 * b + 1] = -d
                biases[r, 2 * b] = biases[r, 2 * b + 1] = f32(128) * d
            _pack(c, per, bits, codes[r], b * per * bits // 8)


def exact_blocks(raw: np.ndarray, t: T, n: int, bits: int, group: int):
    """Raw rows (rows, row_bytes) of length n -> (packed uint32 codes, float32 scales, float32 biases)."""
    kind, size = EXACT_KINDS[t]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(raw.shape[0], -1, size)
    codes = np.empty((raw.shape[0], n * bits // 8), np.uint8)
    scales = np.empty((raw.shape[0], n // group), np.float32)
    biases = np.empty_like(scales)
    _exact(blocks, kind, bits, codes, scales, biases)
    return codes.view(np.uint32), scales, biases


@inline
def _decode(blk, kind, buf):
    """One Q6_K/Q3_K/Q2_K super-block -> 256 float32 values, as gguf-py's dequantize_blocks computes them."""
    if kind == 0:  # Q6_K: ql[128] | qh[64] | int8 scales[16] | d; value (d * sc_j) * (q - 32)
        d = _f16(blk, 208)
        for j in range(16):
            sc = np.int64(blk[192 + j])
            dl = d * f32(sc - 256 if sc > 127 else sc)
            for e in range(16 * j, 16 * j + 16):
                a, r = e >> 7, e & 127
                lo = (blk[64 * a + (r & 63)] >> (4 * (r >> 6))) & 15
                hi = (blk[128 + 32 * a + (r & 31)] >> (2 * (r >> 5))) & 3
                buf[e] = dl * f32((lo | hi << 4) - 32)
    elif kind == 1:  # Q3_K: hmask[32] | qs[64] | 6-bit scales[12] | d; value (d * (sc_j - 32)) * q
        d = _f16(blk, 108)
        for j in range(16):
            dl = d * f32(_q3_k_sub(blk, j))
            for e in range(16 * j, 16 * j + 16):
                buf[e] = dl * f32(_q3_k_level(blk, e))
    else:  # Q2_K: scales[16] | qs[64] | d | dmin; value (d * (sc_j & 15)) * q - dmin * (sc_j >> 4)
        d, dmin = _f16(blk, 80), _f16(blk, 82)
        for j in range(16):
            dl, ml = d * f32(blk[j] & 15), dmin * f32(blk[j] >> 4)
            for e in range(16 * j, 16 * j + 16):
                a, r = e >> 7, e & 127
                buf[e] = dl * f32((blk[16 + 32 * a + (r & 31)] >> (2 * (r >> 5))) & 3) - ml


@inline
def _round(v, sdt):
    """affine._round_scales of one value: float32, float16 or bfloat16 (nearest even), as float32."""
    if sdt == 1:
        return fp16(v)[1]
    if sdt == 2:
        return np.uint32(bf16_round_bits(np.int64(f32(v).view(np.uint32)))).view(np.float32)
    return f32(v)


@kernel
def _requant(blocks, kind, bits, group, sdt, codes, scales, biases):
    """blocks (rows, nb, bytes) -> packed codes (rows, n*bits/8) uint8, scales/biases (rows, n/group)
    float32."""
    buf = np.empty(256, f32)
    c = np.empty(256, np.uint8)
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
                    c[i] = np.uint8(q)
            _pack(c, 256, bits, codes[r], b * 256 * bits // 8)


def requantize_blocks(raw: np.ndarray, t: T, n: int, bits: int, group: int, scales_dtype: str):
    """Raw Q6_K/Q3_K/Q2_K rows (rows, row_bytes) of length n -> (packed uint32 codes, scales, biases), the
    scales and biases in `scales_dtype` ("float32", "float16", or "bfloat16" values held in float32)."""
    kind, size = _LOSSY_KINDS[t]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(raw.shape[0], n // 256, size)
    codes = np.empty((raw.shape[0], n * bits // 8), np.uint8)
    scales = np.empty((raw.shape[0], n // group), np.float32)
    biases = np.empty_like(scales)
    _requant(blocks, kind, bits, group, _SCALES[scales_dtype], codes, scales, biases)
    if scales_dtype == "float16":
        scales, biases = scales.astype(np.float16), biases.astype(np.float16)
    return codes.view(np.uint32), scales, biases
