"""Q6_K, Q3_K and Q2_K kept as the file stores them, for a decode just in time.

Each 16-value sub-block of these types has its own scale, which MLX's 32/64/128-value affine groups cannot
hold, so they do not go through affine.repack: `split_blocks` cuts each 256-value super-block into its
fields once at load (the same bytes as the file), and each backend decodes one layer's weight into the
compute dtype right before its matmul (KBlocksLinear in mlx_backend/ and torch_backend/quant_layers.py), as
gguf-py's dequantize computes it, bit for bit in float32.

Element e of a super-block, written e = 128 h + 32 s + 16 k + t (h < 2, s < 4, k < 2, t < 16), is in
16-value sub-block j = 8 h + 2 s + k; the decoders reshape the fields to broadcast over (h, s, k, t).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ggml import GGMLType, row_bytes

__all__ = ["FIELDS", "KBlocks", "split_blocks"]

T = GGMLType
# Per type: (field, bytes per super-block, dtype), in the order of a block's bytes (gguf-py's
# dequantize_blocks splits them the same way).
FIELDS = {
    T.Q6_K: (("ql", 128, np.uint8), ("qh", 64, np.uint8), ("scales", 16, np.int8), ("d", 2, np.float16)),
    T.Q3_K: (("hmask", 32, np.uint8), ("qs", 64, np.uint8), ("scales", 12, np.uint8), ("d", 2, np.float16)),
    T.Q2_K: (("scales", 16, np.uint8), ("qs", 64, np.uint8), ("d", 2, np.float16), ("dmin", 2, np.float16)),
}


@dataclass(frozen=True)
class KBlocks:
    """A Q6_K / Q3_K / Q2_K tensor of `shape` (*lead, in) as its block fields: `fields[i]` is FIELDS[type][i],
    shape (rows, in / 256, bytes per block / itemsize); a numpy array here, a backend's array once placed."""

    type: GGMLType
    fields: tuple
    shape: tuple[int, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in FIELDS[self.type])


def split_blocks(raw: np.ndarray, t: GGMLType | int, shape: tuple[int, ...]) -> KBlocks:
    """Raw ggml blocks (rows, row_bytes) of a tensor of `shape` → its fields, each a contiguous copy."""
    t = T(t)
    *lead, n = shape
    rows = int(np.prod(lead, dtype=np.int64)) if lead else 1
    raw = np.asarray(raw, np.uint8)
    if raw.size != rows * row_bytes(t, n):
        raise ValueError(f"{t.name} tensor of shape {tuple(shape)} needs {rows * row_bytes(t, n)} bytes of "
                         f"blocks, got {raw.size}")
    blocks = raw.reshape(rows, n // 256, -1)
    fields, at = [], 0
    for _, size, dtype in FIELDS[t]:
        fields.append(np.ascontiguousarray(blocks[..., at:at + size]).view(dtype))
        at += size
    return KBlocks(t, tuple(fields), tuple(shape))
