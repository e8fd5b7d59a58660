"""Build MLX modules from configs and fill them from canonical weight entries, strictly.

The only MLX files that touch weights are this one and stream.py. Tensors are converted one at a
time, so no second full copy of a model is ever held in RAM.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from ..config import TextEncoderConfig, TransformerConfig, VAEConfig
from ..entries import Entry, checked_entries
from ..lora import LoraQuant
from ..quant.affine import AffineQuant, repack
from ..quant.ggml import GGMLType
from ..quant.kblocks import FIELDS, KBlocks, split_blocks
from ..quant.scaled import MXFP8, NVFP4, FPQuant, ScaledFP8, mlx_layout
from ..streaming import Streamer, streamed_entries
from ..weights import BF16, FP8Blocks, GGMLTensor, WeightSource
from .quant_layers import FPLinear, LoraLinear, cast, module_at, quantized_layer, replace_module
from .stream import StreamedBlock
from .text_encoder import DecoderLayer, TextEncoder
from .transformer import DoubleStreamBlock, Flux2, SingleStreamBlock
from .vae import AutoEncoder


def from_numpy(a: np.ndarray, dtype: mx.Dtype | None = None) -> mx.array:
    """numpy → MLX in `dtype` (weights.BF16 arrives as its bits); no second copy when it already is."""
    x = mx.array(a.view(np.uint16)).view(mx.bfloat16) if a.dtype == BF16 else mx.array(a)
    return cast(x, dtype)


def _host(raw: np.ndarray | GGMLTensor | FP8Blocks | ScaledFP8 | NVFP4 | MXFP8 | LoraQuant
          ) -> np.ndarray | AffineQuant | KBlocks | FPQuant | LoraQuant:
    """The numpy half of loading a tensor (GGUF blocks repacked to MLX's layout, Q6_K / Q3_K / Q2_K split
    into their fields; block-scaled FP8 decoded: MLX has no such matmul; per-tensor-scaled FP8, MXFP8 and
    NVFP4 repacked for its mxfp8 / nvfp4 modes)."""
    if isinstance(raw, LoraQuant):  # a base MLX holds decoded takes its LoRAs merged
        base = _host(raw.base)
        return raw.merged(base) if isinstance(base, np.ndarray) else dataclasses.replace(raw, base=base)
    if isinstance(raw, FP8Blocks):
        return raw.dequantize()
    if isinstance(raw, (ScaledFP8, NVFP4, MXFP8)):
        return mlx_layout(raw)
    if isinstance(raw, GGMLTensor):
        t = GGMLType[raw.ggml_type]
        return (split_blocks if t in FIELDS else repack)(raw.data, t, raw.shape)
    return raw


def _place(host: np.ndarray | AffineQuant | KBlocks | LoraQuant):
    """The same bits copied into MLX memory: the costly part of loading (allocation, page faults, copy)
    with no lazy op, so the prefetch thread may run it (a lazy array cannot cross threads). bf16 travels
    as uint16: no model weight is uint16. An AffineQuant or KBlocks keeps its fields, as MLX arrays.
    Idempotent."""
    if isinstance(host, KBlocks):
        return dataclasses.replace(host, fields=tuple(_place(a) for a in host.fields))
    if isinstance(host, AffineQuant):
        return dataclasses.replace(host, weight=_place(host.weight), scales=_place(host.scales),
                                   biases=_place(host.biases))
    if isinstance(host, FPQuant):
        return dataclasses.replace(host, weight=_place(host.weight), scales=_place(host.scales),
                                   scale=_place(np.asarray(host.scale, np.float32)))
    if isinstance(host, LoraQuant):
        return LoraQuant(_place(host.base), *(None if a is None else _place(a) for a in host.factors()))
    if isinstance(host, mx.array):
        return host
    return mx.array(host.view(np.uint16) if host.dtype == BF16 else host)


def _quantized_layer(old, q: AffineQuant | KBlocks | FPQuant, dtype: mx.Dtype):
    if isinstance(q, FPQuant):
        return FPLinear(q.weight, q.scales, q.scale, q.mode)
    return quantized_layer(old, q, dtype)


def _fill(module, tensors, dtype: mx.Dtype):
    """Put (name, host or placed form) pairs into `module`, one tensor at a time."""
    params = []
    for name, t in tensors:
        if isinstance(t, (AffineQuant, KBlocks, FPQuant, LoraQuant)):  # quantized: the layer follows its type
            path, t = name.removesuffix(".weight"), _place(t)
            old = module_at(module, path)
            if isinstance(t, LoraQuant):  # the LoRA factors in the compute dtype, as a dense weight would be
                factors = (None if a is None else cast(a, dtype) for a in t.factors())
                layer = LoraLinear(_quantized_layer(old, t.base, dtype), *factors)
                mx.eval(layer.parameters())
            else:
                layer = _quantized_layer(old, t, dtype)
            replace_module(module, path, layer)
            continue
        a = _place(t)
        a = cast(a.view(mx.bfloat16) if a.dtype == mx.uint16 else a, dtype)  # placed bf16 (see _place)
        if a.ndim == 4:  # PyTorch conv [O, I, kh, kw] → MLX channels-last [O, kh, kw, I]
            a = a.transpose(0, 2, 3, 1)
        mx.eval(a)
        params.append((name, a))
    module.update(tree_unflatten(params))
    mx.eval(module.parameters())
    return module


def _assign(module, entries: dict[str, Entry], dtype: mx.Dtype, streaming=None, groups=(), where="weights"):
    """Fill `module`. With `streaming` (a memory.Streaming), the blocks of `groups` ((block list attribute,
    block factory), in execution order) past the first `streaming.resident` become StreamedBlocks."""
    streamed: dict[tuple[str, int], dict[str, Entry]] = {}
    if streaming is not None:
        lists = [(attr, len(module_at(module, attr))) for attr, _ in groups]
        streamed = streamed_entries(entries, lists, streaming.resident)
    if streamed:
        make = dict(groups)
        blocks = [(f"{attr}.{i}", make[attr], block) for (attr, i), block in streamed.items()]
        fill = lambda m, t: _fill(m, t, dtype)
        streamer = Streamer(blocks, fill, _host, _place, streaming.keep_host, where)
        for k, (attr, i) in enumerate(streamed):
            module_at(module, attr)[i] = StreamedBlock(streamer, k)
    skip = {f"{attr}.{i}.{rest}" for (attr, i), block in streamed.items() for rest in block}
    return _fill(module, ((n, _host(e.load())) for n, e in entries.items() if n not in skip), dtype)


def load_transformer(cfg: TransformerConfig, source: WeightSource | dict, *, dtype: mx.Dtype, streaming=None):
    entries, where = checked_entries("transformer", source, cfg)
    groups = (("double_blocks", lambda: DoubleStreamBlock(cfg)),
              ("single_blocks", lambda: SingleStreamBlock(cfg)))
    return _assign(Flux2(cfg, dtype), entries, dtype, streaming, groups, where)


def load_vae(cfg: VAEConfig, source: WeightSource | dict, *, dtype: mx.Dtype = mx.float32):
    entries, _ = checked_entries("vae", source, cfg)
    return _assign(AutoEncoder(cfg), entries, dtype)


def load_text_encoder(cfg: TextEncoderConfig, source: WeightSource | dict, *, dtype: mx.Dtype,
                      streaming=None):
    entries, where = checked_entries("text_encoder", source, cfg)
    groups = (("model.layers", lambda: DecoderLayer(cfg)),)
    return _assign(TextEncoder(cfg), entries, dtype, streaming, groups, where)
