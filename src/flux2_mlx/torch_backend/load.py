"""Build PyTorch modules from configs and fill them from canonical weight entries, strictly.

The only torch files that touch weights are this one and stream.py. Modules are built on the meta
device (no memory, no random init) and each parameter is put in place as its tensor arrives, one
tensor at a time, so no second full copy of a model is ever held.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import torch
from torch import nn

from ..config import TextEncoderConfig, TransformerConfig, VAEConfig
from ..entries import FP8_BLOCKS, Entry, checked_entries
from ..lora import LoraQuant
from ..quant.affine import AffineQuant, repack
from ..quant.ggml import GGMLType
from ..quant.kblocks import FIELDS, KBlocks, split_blocks
from ..quant.scaled import MXFP8, NVFP4, FPQuant, ScaledFP8, mxfp8_row_order, nvfp4_lsb_first
from ..streaming import Streamer, streamed_entries
from ..weights import BF16, F8_E4M3, F8_E5M2, FP8Blocks, GGMLTensor, WeightSource, to_float32
from .quant_layers import LoraLinear, fp8_matmul_kind, quantized_layer, replace_module
from .stream import StreamedBlock, copy_stream
from .text_encoder import DecoderLayer, TextEncoder
from .transformer import DoubleStreamBlock, Flux2, SingleStreamBlock
from .vae import AutoEncoder

_FP8 = {F8_E4M3: torch.float8_e4m3fn, F8_E5M2: torch.float8_e5m2}


def host_tensor(a: np.ndarray, pin: bool = False) -> torch.Tensor:
    """`a` as a CPU tensor (page-locked with `pin`, so a CUDA copy can run async); weights.BF16 arrives as
    its bits. A memory-mapped file's view is copied; an array that owns its writable memory (a read buffer,
    a decoded tensor) is taken over: copying it would free its buffer, and glibc keeps such freed buffers in
    its heap (loading held ~13 % more than the weights)."""
    bits = a.view(np.int16) if a.dtype == BF16 else a
    if not pin and _owns_memory(bits):
        t = torch.from_numpy(bits)
    else:
        t = torch.empty(bits.shape, dtype=torch.from_numpy(np.empty(0, bits.dtype)).dtype, pin_memory=pin)
        t.numpy()[...] = bits
    return t.view(torch.bfloat16) if a.dtype == BF16 else t


def _owns_memory(a: np.ndarray) -> bool:
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root.base is None and a.flags.writeable and a.flags.c_contiguous


def from_numpy(a: np.ndarray, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """numpy → torch on `device` in `dtype` (None: as it is)."""
    return _device_tensor(host_tensor(a, pin=device.type == "cuda"), device, dtype)


def _device_tensor(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    # Copy first, then cast on the device: a bf16 file crosses the bus at 2 bytes a value.
    return t.to(device, non_blocking=True).to(dtype or t.dtype)


def _host(raw: np.ndarray | GGMLTensor | FP8Blocks | ScaledFP8 | NVFP4 | MXFP8 | LoraQuant, pin: bool):
    """The host half of loading a tensor: a CPU tensor, GGUF blocks repacked to the affine layout with
    the packed codes as bytes (Q6_K / Q3_K / Q2_K split into their fields), FP8 codes as torch's float8 and
    their scales in float32, NVFP4 codes as bytes (low nibble first) and MXFP8 codes as float8, their block
    scales in row order (FPQuant), or a LoraQuant of such forms."""
    if isinstance(raw, LoraQuant):
        factors = (None if a is None else host_tensor(a, pin) for a in raw.factors())
        return LoraQuant(_host(raw.base, pin), *factors)
    if isinstance(raw, FP8Blocks):
        codes = host_tensor(raw.codes.view(np.uint8), pin).view(_FP8[raw.codes.dtype])
        return dataclasses.replace(raw, codes=codes, scale_inv=host_tensor(to_float32(raw.scale_inv), pin))
    if isinstance(raw, ScaledFP8):
        codes = host_tensor(np.ascontiguousarray(raw.codes).view(np.uint8), pin).view(torch.float8_e4m3fn)
        scale, act = (None if s is None else host_tensor(np.asarray(s, np.float32), pin)
                      for s in (raw.scale, raw.input_scale))
        return dataclasses.replace(raw, codes=codes, scale=scale, input_scale=act)
    if isinstance(raw, (NVFP4, MXFP8)):
        q = nvfp4_lsb_first(raw) if isinstance(raw, NVFP4) else mxfp8_row_order(raw)
        weight = host_tensor(q.weight, pin)
        weight = weight.view(torch.float8_e4m3fn) if q.mode == "mxfp8" else weight
        act = None if q.input_scale is None else host_tensor(np.asarray(q.input_scale, np.float32), pin)
        return dataclasses.replace(q, weight=weight,
                                   scales=host_tensor(np.ascontiguousarray(q.scales), pin),
                                   scale=host_tensor(np.asarray(q.scale, np.float32), pin), input_scale=act)
    if isinstance(raw, GGMLTensor) and GGMLType[raw.ggml_type] in FIELDS:
        q = split_blocks(raw.data, GGMLType[raw.ggml_type], raw.shape)
        return dataclasses.replace(q, fields=tuple(host_tensor(a, pin) for a in q.fields))
    if isinstance(raw, GGMLTensor):
        q = repack(raw.data, GGMLType[raw.ggml_type], raw.shape)
        return dataclasses.replace(q, weight=host_tensor(q.weight.view(np.uint8), pin),
                                   scales=host_tensor(q.scales, pin), biases=host_tensor(q.biases, pin))
    return host_tensor(raw, pin)


def _place(host: torch.Tensor | AffineQuant | KBlocks | FP8Blocks | LoraQuant, device: torch.device,
           dtype: torch.dtype):
    """The host form on the device, dense tensors and affine scales in `dtype` (codes stay bytes, FP8 scales
    float32, block fields as stored; LoRA factors in `dtype`, as a dense weight would be). Idempotent."""
    if isinstance(host, KBlocks):
        return dataclasses.replace(host, fields=tuple(_device_tensor(a, device, None) for a in host.fields))
    if isinstance(host, LoraQuant):
        factors = (None if a is None else _device_tensor(a, device, dtype) for a in host.factors())
        return LoraQuant(_place(host.base, device, dtype), *factors)
    if isinstance(host, FP8Blocks):
        return dataclasses.replace(host, codes=_device_tensor(host.codes, device, None),
                                   scale_inv=_device_tensor(host.scale_inv, device, None))
    if isinstance(host, ScaledFP8):
        act = None if host.input_scale is None else _device_tensor(host.input_scale, device, None)
        return dataclasses.replace(host, codes=_device_tensor(host.codes, device, None),
                                   scale=_device_tensor(host.scale, device, None), input_scale=act)
    if isinstance(host, FPQuant):
        act = None if host.input_scale is None else _device_tensor(host.input_scale, device, None)
        return dataclasses.replace(host, weight=_device_tensor(host.weight, device, None),
                                   scales=_device_tensor(host.scales, device, None),
                                   scale=_device_tensor(host.scale, device, None), input_scale=act)
    if isinstance(host, AffineQuant):
        return dataclasses.replace(host, weight=_device_tensor(host.weight, device, None),
                                   scales=_device_tensor(host.scales, device, dtype),
                                   biases=_device_tensor(host.biases, device, dtype))
    return _device_tensor(host, device, dtype)


def _empty(make):
    """make() built on the meta device: shapes only, no memory, no random initialisation."""
    with torch.device("meta"):
        return make()


def _fill(module: nn.Module, tensors, place, dtype: torch.dtype, fp8_matmul: str | None = None) -> nn.Module:
    """Put (name, host or placed form) pairs into `module`, one tensor at a time (FP8 weights multiplied as
    FP8Linear's `fp8_matmul`)."""
    for name, t in tensors:
        path, _, leaf = name.rpartition(".")
        t = place(t)
        if isinstance(t, LoraQuant):
            base = quantized_layer(module.get_submodule(path), t.base, dtype, fp8_matmul)
            replace_module(module, path, LoraLinear(base, *t.factors()))
            continue
        if isinstance(t, (AffineQuant, KBlocks, FP8Blocks, ScaledFP8, FPQuant)):  # the layer follows its type
            replace_module(module, path, quantized_layer(module.get_submodule(path), t, dtype, fp8_matmul))
            continue
        owner = module.get_submodule(path)
        if leaf in owner._buffers:
            owner._buffers[leaf] = t
        else:
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    return module.eval()


def _assign(module, entries: dict[str, Entry], dtype: torch.dtype, device: torch.device, streaming=None,
            groups=(), where="weights", fp8_matmul: str | None = None):
    """Fill `module`. With `streaming` (a memory.Streaming), the blocks of `groups` ((block list attribute,
    block factory), in execution order) past the first `streaming.resident` become StreamedBlocks."""
    host, place = partial(_host, pin=device.type == "cuda"), partial(_place, device=device, dtype=dtype)
    streamed: dict[tuple[str, int], dict[str, Entry]] = {}
    if streaming is not None:
        lists = [(attr, len(module.get_submodule(attr))) for attr, _ in groups]
        streamed = streamed_entries(entries, lists, streaming.resident)
    if streamed:
        make = dict(groups)
        blocks = [(f"{attr}.{i}", partial(_empty, make[attr]), block)
                  for (attr, i), block in streamed.items()]
        place_async, fill = copy_stream(place, lambda m, t: _fill(m, t, place, dtype, fp8_matmul), device)
        streamer = Streamer(blocks, fill, host, place_async, streaming.keep_host, where)
        for k, (attr, i) in enumerate(streamed):
            module.get_submodule(attr)[i] = StreamedBlock(streamer, k)
    skip = {f"{attr}.{i}.{rest}" for (attr, i), block in streamed.items() for rest in block}
    tensors = ((n, host(e.load())) for n, e in entries.items() if n not in skip)
    return _fill(module, tensors, place, dtype, fp8_matmul)


def load_transformer(cfg: TransformerConfig, source: WeightSource | dict, *, dtype: torch.dtype,
                     device: torch.device, streaming=None, compile: bool = False):
    entries, where = checked_entries("transformer", source, cfg)
    groups = (("double_blocks", lambda: DoubleStreamBlock(cfg)),
              ("single_blocks", lambda: SingleStreamBlock(cfg)))
    model = _assign(_empty(lambda: Flux2(cfg, dtype)), entries, dtype, device, streaming, groups, where)
    if compile:
        # Every block of a kind shares one compiled graph (torch treats module parameters as inputs); a
        # streamed block is rebuilt on each call, so it stays eager: its time is the weight copy anyway.
        for block in [*model.double_blocks, *model.single_blocks]:
            if not isinstance(block, StreamedBlock):
                block.compile()
    return model


def load_vae(cfg: VAEConfig, source: WeightSource | dict, *, dtype: torch.dtype, device: torch.device,
             channels_last: bool | None = None):
    """channels_last: convolutions in NHWC memory. None: on CUDA (cuDNN's fastest convolutions are NHWC) and
    on the CPU (oneDNN's: decode 10 % faster, benchmarks/vae_layout.py); MPS keeps NCHW, unmeasured."""
    entries, _ = checked_entries("vae", source, cfg)
    vae = _assign(_empty(lambda: AutoEncoder(cfg)), entries, dtype, device)
    if device.type in ("cuda", "cpu") if channels_last is None else channels_last:
        vae.to(memory_format=torch.channels_last)
    return vae


def load_text_encoder(cfg: TextEncoderConfig, source: WeightSource | dict, *, dtype: torch.dtype,
                      device: torch.device, streaming=None, fp8_matmul: bool = False):
    """fp8_matmul: multiply FP8 weights on FP8 matmul kernels, the activations quantized to e4m3 (FP8Linear);
    refused where torch has no such kernel and for weights with no FP8 tensor, before anything is read."""
    entries, where = checked_entries("text_encoder", source, cfg)
    kind = None
    if fp8_matmul:
        if not any(e.stored in FP8_BLOCKS for e in entries.values()):
            raise ValueError(f"{where}: --fp8-matmul found no FP8 weights to multiply; drop it, or use an "
                             f"FP8 checkpoint such as Qwen/Qwen3-4B-FP8")
        kind = fp8_matmul_kind(device, dtype)
        if kind is None:
            raise ValueError(f"--fp8-matmul: torch has no FP8 matmul with {str(dtype)[6:]} results on "
                             f"{device} (it needs CUDA compute capability 8.9+, or the CPU); drop it to "
                             f"decode FP8 weights per layer")
    groups = (("model.layers", lambda: DecoderLayer(cfg)),)
    return _assign(_empty(lambda: TextEncoder(cfg)), entries, dtype, device, streaming, groups, where, kind)
