"""MLX quantized layers made from raw ggml blocks (each tensor's ggml type picks its layer) and from
per-tensor-scaled FP8 / NVFP4 weights.

GGUF weights are repacked (quant/affine.py) into MLX's affine layout, FP8 and NVFP4 (quant/scaled.py) into
its mxfp8 / nvfp4 layouts; all run on MLX's quantized matmul and are never expanded to a dense copy.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..quant.affine import AffineQuant


def quantized_layer(old: nn.Module, q: AffineQuant, dtype: mx.Dtype) -> nn.Module:
    """A QuantizedLinear / QuantizedEmbedding standing in for `old`, holding the repacked values `q`
    (its fields already MLX arrays: load._place).

    Scales and biases take the compute dtype, so a bf16 model stays bf16 (MLX would otherwise promote
    the matmul to float32 on float32 scales).
    """
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
