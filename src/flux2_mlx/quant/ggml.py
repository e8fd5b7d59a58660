"""Thin layer over gguf-py: ggml type enum, block sizes and the numpy codecs.

K-quant quantizers (which gguf-py lacks) come from `quant.kquants`, imported on first use (it loads numba).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from gguf import quants as _gq
from gguf.constants import GGML_QUANT_SIZES

__all__ = ["GGMLType", "block_info", "dequantize", "quantize", "row_bytes"]

# Types gguf-py quantizes itself; K-quants go to our own kquants module.
_GGUF_QUANTIZERS = {GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1,
                    GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0}
_KQUANT_FUNCS = {GGMLType.Q2_K: "quantize_q2_k", GGMLType.Q3_K: "quantize_q3_k",
                 GGMLType.Q4_K: "quantize_q4_k", GGMLType.Q5_K: "quantize_q5_k",
                 GGMLType.Q6_K: "quantize_q6_k"}


def block_info(t: GGMLType | int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type."""
    return GGML_QUANT_SIZES[GGMLType(t)]


def row_bytes(t: GGMLType | int, n: int) -> int:
    """Bytes holding one row of `n` elements; raises if `n` is not a whole number of blocks."""
    bs, ts = block_info(t)
    if n % bs:
        raise ValueError(f"{GGMLType(t).name} needs rows that are a multiple of {bs}, got {n}")
    return n // bs * ts


def dequantize(raw: np.ndarray, t: GGMLType | int, shape: tuple[int, ...]) -> np.ndarray:
    """Raw ggml bytes (any leading shape, rows of whole blocks) → float32 array of `shape`."""
    t = GGMLType(t)
    raw = np.ascontiguousarray(raw)
    if t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) and raw.dtype != np.uint8:
        raw = raw.view(np.uint8)  # plain types may arrive as typed views (GGUFReader gives float16/float32)
    n = shape[-1] if shape else 1
    out = _gq.dequantize(raw.reshape(-1, row_bytes(t, n)), t)
    return np.asarray(out, dtype=np.float32).reshape(shape)


def quantize(a: np.ndarray, t: GGMLType | int) -> np.ndarray:
    """float32 array → raw ggml bytes, uint8 of shape (*a.shape[:-1], row_bytes)."""
    t = GGMLType(t)
    a = np.ascontiguousarray(a, dtype=np.float32)
    row_bytes(t, a.shape[-1])  # validates the row length for every type
    if t in _GGUF_QUANTIZERS:
        out = _gq.quantize(a, t)
    elif t in _KQUANT_FUNCS:
        from . import kquants  # lazy: written separately and only needed for K-quants

        out = getattr(kquants, _KQUANT_FUNCS[t])(a)
    else:
        raise ValueError(f"flux2-mlx cannot quantize to {t.name}; choose Q8_0, Q6_K, Q5_K, Q4_K, Q3_K, "
                         f"Q2_K, Q4_0, Q4_1, Q5_0, Q5_1, F16 or BF16")
    return np.ascontiguousarray(out).view(np.uint8).reshape(*a.shape[:-1], -1)
