"""Repack raw ggml blocks into the affine triplet both backends run: MLX's quantized layout (packed uint32
codes, scales, biases per group), which MLX multiplies by directly and torch unpacks per layer.

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K map exactly. Q6_K, Q3_K and Q2_K have a scale per 16 values,
which no MLX group holds: they keep their blocks instead (quant/kblocks.py). The per-block work runs in the
compiled kernels of quant/affine_kernels.py; this module keeps the layout and the thread pool over row
chunks.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..weights import bf16_round_bits
from .ggml import GGMLType

__all__ = ["AffineQuant", "affine_format", "pack_codes", "repack", "unpack_codes"]

assert sys.byteorder == "little", "the uint32/uint64 views below assume a little-endian host"

T = GGMLType
# Exact repacks (affine_kernels.exact_blocks): one MLX group per 32-element ggml (sub-)block.
EXACT = {T.Q4_0: (4, 32), T.Q4_1: (4, 32), T.Q5_0: (5, 32), T.Q5_1: (5, 32), T.Q8_0: (8, 32),
         T.Q4_K: (4, 32), T.Q5_K: (5, 32)}


def affine_format(t: GGMLType) -> tuple[int, int] | None:
    """(bits, group size) a ggml type loads as; None for the dense types and those kept as blocks."""
    return EXACT.get(t)


@dataclass(frozen=True)
class AffineQuant:
    """Arguments of mx.dequantize / mx.quantized_matmul (mode "affine"), as numpy arrays."""

    weight: np.ndarray  # uint32 (*lead, in * bits / 32): little-endian bit stream, element 0 in the low bits
    scales: np.ndarray  # (*lead, in / group_size)
    biases: np.ndarray  # same shape and dtype as scales; w = scales * q + biases
    group_size: int
    bits: int
    note: str  # how exact the triplet is


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (< 2**bits) along the last axis → MLX's packed uint32 (last axis * bits / 32)."""
    *lead, n = codes.shape
    c = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:  # the bytes already are the bit stream
        return c.reshape(*lead, n).view(np.uint32)
    if bits == 4:
        pairs = c.reshape(*lead, n // 2, 2)
        packed = np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4))
        return packed.reshape(*lead, n // 2).view(np.uint32)
    # 8 codes of <= 8 bits fill exactly `bits` bytes of a uint64; stacking those bytes is the bit stream.
    c8 = c.reshape(*lead, n // 8, 8)
    v = c8[..., 0].astype(np.uint64)
    for k in range(1, 8):  # a loop of in-place ORs: no (…, 8) uint64 temporary
        v |= c8[..., k].astype(np.uint64) << np.uint64(k * bits)
    byts = v[..., None].view(np.uint8)[..., :bits]
    return np.ascontiguousarray(byts).reshape(*lead, n * bits // 8).view(np.uint32)


def unpack_codes(weight: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_codes: packed uint32 → uint8 codes."""
    *lead, w = weight.shape
    byts = np.ascontiguousarray(weight).view(np.uint8).reshape(*lead, w * 4 // bits, bits)
    v = np.zeros((*byts.shape[:-1], 8), np.uint8)
    v[..., :bits] = byts
    v = v.view(np.uint64)  # (..., n/8, 1)
    q = (v >> (np.arange(8, dtype=np.uint64) * np.uint64(bits))) & np.uint64((1 << bits) - 1)
    return q.astype(np.uint8).reshape(*lead, w * 32 // bits)


def _dtype_name(dtype) -> str:
    """Normalise a scales dtype (numpy dtype, string, or mx dtype) to float32, float16 or bfloat16."""
    name = str(dtype).rsplit(".", 1)[-1] if "bfloat16" in str(dtype) else np.dtype(dtype).name
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"scales_dtype must be float32, float16 or bfloat16, got {dtype}")
    return name


def _round_scales(a: np.ndarray, dtype) -> np.ndarray:
    """Round float32 scales/biases to the storage dtype; bfloat16 stays float32 holding bf16 values."""
    name = _dtype_name(dtype)
    if name == "bfloat16":  # numpy has no bf16: keep float32 holding bf16 values (mx casts it exactly)
        return bf16_round_bits(np.asarray(a, np.float32).view(np.uint32)).view(np.float32)
    return np.asarray(a).astype(name)


def repack(raw: np.ndarray, t: GGMLType | int, shape: tuple[int, ...],
           scales_dtype=np.float32) -> AffineQuant:
    """Raw ggml blocks (rows, row_bytes) of a tensor of `shape` (*lead, in) → AffineQuant.

    Exact (bit for bit vs gguf.quants.dequantize, ±0 aside) with float32 scales for Q4_0, Q4_1, Q5_0, Q5_1,
    Q8_0, Q4_K and Q5_K.
    `scales_dtype` (np.float32, np.float16 or "bfloat16") trades exactness for memory: fp16 is still exact
    for the legacy types but adds ~2e-4 rel-RMS to Q4_K/Q5_K; bf16 adds ~1.7e-3. Rows go through in chunks
    of about 1 MB of blocks, on all cores (the compiled kernels release the GIL).
    """
    t = T(t)
    *lead, n = shape
    rows = int(np.prod(lead, dtype=np.int64)) if lead else 1
    raw = np.asarray(raw).reshape(rows, -1)
    step = max(1, (1 << 20) // max(1, raw.shape[1] * raw.itemsize))
    chunks = [raw[i:i + step] for i in range(0, rows, step)]
    work = lambda c: _repack_rows(c, t, n, scales_dtype)
    if len(chunks) == 1:  # starting a pool's threads costs more than repacking one small tensor
        parts = [work(chunks[0])]
    else:
        with ThreadPoolExecutor(min(len(chunks), os.cpu_count() or 1)) as pool:
            parts = list(pool.map(work, chunks))
    first = parts[0]
    cat = (lambda name: getattr(first, name) if len(parts) == 1
           else np.concatenate([getattr(p, name) for p in parts]))
    return AffineQuant(cat("weight").reshape(*lead, -1), cat("scales").reshape(*lead, -1),
                    cat("biases").reshape(*lead, -1), first.group_size, first.bits, first.note)


def _repack_rows(raw: np.ndarray, t: GGMLType, n: int, scales_dtype) -> AffineQuant:
    """repack() of a 2-D block of rows."""
    from . import affine_kernels  # lazy: compiled with numba, needed only for GGUF files

    if t not in EXACT:
        raise ValueError(f"{t.name} tensors cannot run on MLX quantized kernels; convert the file with "
                         f"flux2 convert")
    bits, group = EXACT[t]
    weight, scales, biases = affine_kernels.exact_blocks(raw, t, n, bits, group)
    name = _dtype_name(scales_dtype)
    note = (f"exact ({bits}-bit g{group})" if name == "float32"
            else f"{bits}-bit g{group}, scales rounded to {name}")
    scales, biases = _round_scales(scales, scales_dtype), _round_scales(biases, scales_dtype)
    return AffineQuant(weight, scales, biases, group, bits, note)


def dequantize_mlx(q: AffineQuant) -> np.ndarray:
    """w = scale * code + bias in float32, as mx.dequantize computes it with float32 scales."""
    codes = unpack_codes(q.weight, q.bits).astype(np.float32)
    *lead, n = codes.shape
    g = codes.reshape(*lead, n // q.group_size, q.group_size)
    s, b = (np.asarray(a, np.float32)[..., None] for a in (q.scales, q.biases))
    return (s * g + b).reshape(*lead, n)
