"""numba pieces shared by the compiled quantization kernels (kquants.py, affine_kernels.py): the compile
settings, llama.cpp's nearest_int and fp32 -> fp16 rounding written out (numba has no float16 scalar)."""

from __future__ import annotations

import numpy as np
from numba import njit

f32 = np.float32
# cache: compiled once per install; nogil: threads run kernels in parallel; error_model "numpy": x/0 gives
# inf or nan as in C, without a Python exception check on every division
kernel = njit(cache=True, nogil=True, error_model="numpy")
inline = njit(inline="always", error_model="numpy")
_MAGIC = f32(12582912.0)  # 1.5 * 2^23
FP16_VALUE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(f32)


@inline
def nint(v):
    # ggml-quants.c nearest_int: round half to even for |v| < 2^22, C's own garbage beyond
    return (np.int64(f32(v + _MAGIC).view(np.int32)) & 0x7FFFFF) - 0x400000


@inline
def fp16(v):
    """GGML_FP32_TO_FP16 (round to nearest even, subnormals, overflow to inf) as (bits, value)."""
    b = np.int64(f32(v).view(np.uint32))
    a = b & 0x7FFFFFFF
    if a > 0x7F800000:
        h = 0x7E00  # NaN
    elif a >= 0x477FF000:  # 65520 and above round to inf
        h = 0x7C00
    elif a >= 0x38800000:  # fp16 normal: rebias the exponent, round the 13 dropped bits to even
        h = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13
    else:  # fp16 subnormal: |v| * 2^24 is exact, its rint is the mantissa
        h = nint(f32(abs(v)) * f32(16777216.0))
    h |= (b >> 16) & 0x8000
    return h, FP16_VALUE[h]
