"""MLX quantized layers made from raw ggml blocks (each tensor's ggml type picks its layer) and from
per-tensor-scaled FP8 / NVFP4 weights.

GGUF weights are repacked (quant/affine.py) into MLX's affine layout, FP8 and NVFP4 (quant/scaled.py) into
its mxfp8 / nvfp4 layouts; all run on MLX's quantized matmul and are never expanded to a dense copy.
Q6_K, Q3_K and Q2_K, which no affine layout holds exactly, keep their blocks (quant/kblocks.py): each call
decodes the layer's weight into the compute dtype right before its matmul.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from ..quant.affine import AffineQuant
from ..quant.ggml import GGMLType
from ..quant.kblocks import FIELDS, KBlocks


def quantized_layer(old: nn.Module, q: AffineQuant | KBlocks, dtype: mx.Dtype) -> nn.Module:
    """A QuantizedLinear / QuantizedEmbedding (a KBlocksLinear / KBlocksEmbedding for KBlocks) standing in
    for `old`, holding the repacked values `q` (its fields already MLX arrays: load._place).

    Scales and biases take the compute dtype, so a bf16 model stays bf16 (MLX would otherwise promote
    the matmul to float32 on float32 scales).
    """
    if isinstance(q, KBlocks):
        if isinstance(old, nn.Embedding):
            return KBlocksEmbedding(q, dtype)
        if isinstance(old, nn.Linear) and "bias" not in old:
            return KBlocksLinear(q, dtype)
        raise ValueError(f"a quantized tensor cannot stand in for {type(old).__name__}")
    rows, cols = q.weight.shape[0], q.weight.shape[-1] * 32 // q.bits
    if isinstance(old, nn.Embedding):
        layer = nn.QuantizedEmbedding(rows, cols, group_size=q.group_size, bits=q.bits)
    elif isinstance(old, nn.Linear) and "bias" not in old:
        layer = nn.QuantizedLinear(cols, rows, bias=False, group_size=q.group_size, bits=q.bits)
    else:
        raise ValueError(f"a quantized tensor cannot stand in for {type(old).__name__}")
    layer.weight, layer.scales, layer.biases = q.weight, cast(q.scales, dtype), cast(q.biases, dtype)
    mx.eval(layer.parameters())
    return layer


def _shifts(values, shape) -> mx.array:
    return mx.array(values, mx.uint8).reshape(shape)


# gguf-py's dequantize_blocks, on the fields of a block (quant/kblocks.py) broadcast over (h, s, k, t) of
# element 128 h + 32 s + 16 k + t; the same float32 products in the same order, so the same bits. Signed
# levels are formed in uint8 (wrapping) and read as int8: one float32 pass fewer per offset.
def _q6_k(ql, qh, scales, d):
    # s = 2 n + j: nibble n of ql[64 h + 32 j + 16 k + t] | bit pair s of qh[32 h + 16 k + t] << 4
    lead = ql.shape[:-1]
    low = (ql.reshape(*lead, 2, 1, 2, 2, 16) >> _shifts([0, 4], (2, 1, 1, 1))) & 15
    high = (qh.reshape(*lead, 2, 1, 1, 2, 16) >> _shifts([0, 2, 4, 6], (2, 2, 1, 1))) & 3
    q = ((low | (high << 4)) - 32).view(mx.int8)
    sc = scales.astype(mx.float32).reshape(*lead, 2, 2, 2, 2, 1)
    return (d.astype(mx.float32).reshape(*lead, 1, 1, 1, 1, 1) * sc) * q.astype(mx.float32)


def _q3_k(hmask, qs, scales, d):
    lead = qs.shape[:-1]
    low = (qs.reshape(*lead, 2, 1, 2, 16) >> _shifts([0, 2, 4, 6], (4, 1, 1))) & 3
    high = (hmask.reshape(*lead, 1, 1, 2, 16) >> _shifts(list(range(8)), (2, 4, 1, 1))) & 1
    q = (low + (high << 2) - 4).view(mx.int8)  # minus 4 where the bit is clear
    # 6-bit scales: low 4 bits from nibbles of bytes 0-7, high 2 bits from bit pairs of bytes 8-11
    lo = (scales[..., :8].reshape(*lead, 1, 8) >> _shifts([0, 4], (2, 1))) & 15
    hi = (scales[..., 8:].reshape(*lead, 1, 4) >> _shifts([0, 2, 4, 6], (4, 1))) & 3
    sc = (lo.reshape(*lead, 16) | (hi.reshape(*lead, 16) << 4)).astype(mx.float32) - 32
    dl = d.astype(mx.float32).reshape(*lead, 1, 1, 1, 1) * sc.reshape(*lead, 2, 4, 2, 1)
    return dl * q.astype(mx.float32)


def _q2_k(scales, qs, d, dmin):
    lead = qs.shape[:-1]
    q = ((qs.reshape(*lead, 2, 1, 2, 16) >> _shifts([0, 2, 4, 6], (4, 1, 1))) & 3).astype(mx.float32)
    sc = scales.reshape(*lead, 2, 4, 2, 1)
    dl = d.astype(mx.float32).reshape(*lead, 1, 1, 1, 1) * (sc & 15).astype(mx.float32)
    ml = dmin.astype(mx.float32).reshape(*lead, 1, 1, 1, 1) * (sc >> 4).astype(mx.float32)
    return dl * q - ml


_DECODE = {GGMLType.Q6_K: _q6_k, GGMLType.Q3_K: _q3_k, GGMLType.Q2_K: _q2_k}


def _decode(t: GGMLType, dtype: mx.Dtype, *fields) -> mx.array:
    *lead, nb, _ = fields[0].shape
    return _DECODE[t](*fields).astype(dtype).reshape(*lead, nb * 256)


@functools.cache
def _compiled(t: GGMLType, dtype: mx.Dtype):
    return mx.compile(functools.partial(_decode, t, dtype))


def decode_kblocks(t: GGMLType, fields, dtype: mx.Dtype) -> mx.array:
    """Block fields (*lead, blocks, bytes) → weights (*lead, blocks · 256) in `dtype`, as gguf-py decodes
    them (bit for bit in float32). On a GPU the ops are compiled into one pass over the weight; on the CPU
    MLX's own vectorized ops ran Q6_K and Q2_K faster than the compiled broadcasting loop."""
    t = GGMLType(t)
    if mx.default_device() == mx.gpu:
        return _compiled(t, dtype)(*fields)
    return _decode(t, dtype, *fields)


class KBlocksLinear(nn.Module):
    """A bias-free Linear held as Q6_K / Q3_K / Q2_K block fields (quant.kblocks.KBlocks), its weight decoded
    into `dtype` on each call and dropped after the matmul."""

    def __init__(self, q: KBlocks, dtype: mx.Dtype):
        super().__init__()
        self.type, self.dtype = q.type, dtype
        for name, a in zip(q.names, q.fields):
            setattr(self, name, a)

    def fields(self, rows=None) -> list[mx.array]:
        return [self[n] if rows is None else self[n][rows] for n, _, _ in FIELDS[self.type]]

    def dense(self) -> mx.array:
        return decode_kblocks(self.type, self.fields(), self.dtype)

    def __call__(self, x):
        return x @ self.dense().T


class KBlocksEmbedding(KBlocksLinear):
    """An Embedding held as block fields; only the looked-up rows are decoded."""

    def __call__(self, ids):
        return decode_kblocks(self.type, self.fields(ids), self.dtype)


class FPLinear(nn.Module):
    """A bias-free Linear held in MLX's `nvfp4` or `mxfp8` layout (quant.scaled.FPQuant), its float32
    per-tensor scale applied to the matmul's output."""

    def __init__(self, weight: mx.array, scales: mx.array, scale: mx.array, mode: str):
        super().__init__()
        self.weight, self.scales = weight, scales
        self.scale = None if float(scale) == 1 else scale  # MXFP8's: no multiply and cast per call
        self.mode, self.group_size, self.bits = mode, *{"nvfp4": (16, 4), "mxfp8": (32, 8)}[mode]

    def __call__(self, x):
        y = mx.quantized_matmul(x, self.weight, self.scales, transpose=True, group_size=self.group_size,
                                bits=self.bits, mode=self.mode)
        return y if self.scale is None else (y * self.scale).astype(x.dtype)


class LoraLinear(nn.Module):
    """A quantized Linear with its LoRAs as a separate float branch (lora.LoraQuant): y = base_scale ⊙
    base(x) + (x @ downᵀ) @ upᵀ + x @ denseᵀ; the factors absent (None) where the file has no such terms."""

    def __init__(self, base: nn.Module, down, up, dense, base_scale=None):
        super().__init__()
        self.base = base
        for name, a in (("down", down), ("up", up), ("dense", dense), ("base_scale", base_scale)):
            if a is not None:  # absent terms are no attribute: an MLX module's parameters are arrays
                setattr(self, name, a)

    def __call__(self, x):
        y = self.base(x)
        if "base_scale" in self:
            y = y * self.base_scale
        if "down" in self:
            y = y + (x @ self.down.T) @ self.up.T
        if "dense" in self:
            y = y + x @ self.dense.T
        return y


def cast(x: mx.array, dtype: mx.Dtype | None) -> mx.array:
    """x in `dtype` (None: as it is), without a second copy when it already is."""
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at a dotted parameter-tree path such as `double_blocks.3.img_attn.qkv`."""
    *parents, last = path.split(".")
    node = root
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(last)] = new
    else:
        setattr(node, last, new)


def module_at(root: nn.Module, path: str) -> nn.Module:
    node = root
    for p in path.split("."):
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node
