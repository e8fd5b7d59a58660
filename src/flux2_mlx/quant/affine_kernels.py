"""ggml blocks -> MLX affine groups (packed codes, scales, biases), one compiled pass per block (numba).

Exact repacks of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K, checked bit for bit against numpy and gguf-py
in tests/test_quant_repack.py: the codes are the file's codes; the scales and biases are exact float32
products of its fp16 fields. numpy needs a dozen passes over full-size temporaries; this kernel reads each
block once.
"""

from __future__ import annotations

import numpy as np

from .ggml import GGMLType as T
from .jit import FP16_VALUE, f32, inline, kernel

__all__ = ["EXACT_KINDS", "exact_blocks"]

# kernel switch and bytes per block
EXACT_KINDS = {T.Q4_0: (0, 18), T.Q4_1: (1, 20), T.Q5_0: (2, 22), T.Q5_1: (3, 24), T.Q8_0: (4, 34),
               T.Q4_K: (5, 144), T.Q5_K: (6, 176)}


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


@kernel
def _exact(blocks, kind, bits, codes, scales, biases):
    """blocks (rows, nb, bytes) -> packed codes (rows, n*bits/8) uint8, scales/biases (rows, groups) float32.
    One group per 32-value (sub-)block."""
    per = 256 if kind >= 5 else 32  # values per block
    c = np.empty(per, np.uint8)
    for r in range(blocks.shape[0]):
        for b in range(blocks.shape[1]):
            blk = blocks[r, b]
            d = _f16(blk, 0)
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
            else:  # Q4_K, Q5_K: d | dmin | 12 bytes of 6-bit (scale, min) | (qh[32]) | qs[128]
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
