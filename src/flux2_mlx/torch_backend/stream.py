"""Layer streaming on PyTorch: the stand-in block and CUDA's copy stream (the reading schedule is the
core's `streaming.Streamer`).

The model files stay as they are. A streamed block is a stand-in in the model's block list: when called
it takes its weights (read, for GGUF repacked, and copied to the device by the prefetch thread while the
previous block computed), builds the real block, runs it, and lets the weights go.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

import torch
from torch import nn

from ..lora import LoraQuant
from ..quant.affine import AffineQuant
from ..quant.kblocks import KBlocks
from ..quant.scaled import FPQuant, ScaledFP8
from ..streaming import Streamer
from ..weights import FP8Blocks


class StreamedBlock(nn.Module):
    """Stands where a block module stood: same call, weights present only while it runs."""

    def __init__(self, streamer: Streamer, index: int):
        super().__init__()
        self.streamer, self.index = streamer, index

    def forward(self, *args, **kwargs):
        return self.streamer.take(self.index)(*args, **kwargs)


def _parts(t) -> tuple[torch.Tensor, ...]:
    """The device tensors of a placed form: dense, affine-quantized, ggml block fields, block- or
    tensor-scaled FP8, NVFP4 / MXFP8, or a quantized one with LoRAs."""
    if isinstance(t, LoraQuant):
        return (*_parts(t.base), *(a for a in t.factors() if a is not None))
    if isinstance(t, KBlocks):
        return t.fields
    if isinstance(t, FP8Blocks):
        return t.codes, t.scale_inv
    if isinstance(t, ScaledFP8):
        return tuple(a for a in (t.codes, t.scale, t.input_scale) if a is not None)
    if isinstance(t, FPQuant):
        return tuple(a for a in (t.weight, t.scales, t.scale, t.input_scale) if a is not None)
    return (t.weight, t.scales, t.biases) if isinstance(t, AffineQuant) else (t,)


def copy_stream(place: Callable, fill: Callable, device: torch.device) -> tuple[Callable, Callable]:
    """(place, fill) for a Streamer. On CUDA the prefetch thread's copies (from page-locked memory) run on
    a side stream, and the compute stream waits for them only when the block is built; elsewhere both
    stay as they are."""
    if device.type == "cpu" and sys.platform == "linux":
        return place, _trimmed(fill)
    if device.type != "cuda":
        return place, fill
    copies, ran = torch.cuda.Stream(device), []

    def place_async(t):
        with torch.cuda.stream(copies):
            return place(t)

    def fill_after_copies(module, tensors):
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copies)  # holds only this block's copies: the next read starts after fill
        for _, t in tensors:  # allocated on the copy stream: not reused before the compute stream is done
            for part in _parts(t):
                part.record_stream(compute)
        # The host queues kernels ahead of the GPU and every queued block holds its weights: wait for the
        # block before the last one, so at most three blocks' weights are on the device.
        if len(ran) > 1:
            ran.pop(0).synchronize()
        ran.append(compute.record_event())
        return fill(module, tensors)

    return place_async, fill_after_copies


def _trimmed(fill: Callable) -> Callable:
    """CPU: glibc keeps the freed weights of the block that just ran in its heaps (RSS up to 20 % above the
    plan); hand them back to the system before the next block is built."""
    trim = ctypes.CDLL(None).malloc_trim

    def fill_after_trim(module, tensors):
        trim(0)
        return fill(module, tensors)

    return fill_after_trim
