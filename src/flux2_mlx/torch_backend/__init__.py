"""The PyTorch backend: the functions every backend exports (the same as mlx_backend's), nothing else.

Everything runs on one device, chosen by `use_device` (by default CUDA, else MPS, else the CPU).
"""

from __future__ import annotations

import gc
import os
import resource
import sys

import numpy as np
import torch

from ..memory import Activations
from .load import from_numpy as _from_numpy
from .load import load_text_encoder as _load_text_encoder
from .load import load_transformer as _load_transformer
from .load import load_vae as _load_vae

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# benchmarks/activations.py on the CPU, the largest of three runs (BENCHMARKS.md, "Memory planner"); `fixed`
# is the constant part of the peaks (workspaces), set where the streamed planner test's measurements centre
# (0.93-1.03x the plan). CUDA uses them too until they are measured on a GPU.
ACTIVATIONS = Activations(transformer_rows=(19.8, 28.8), text_rows=6.6, vae_decode_maps=7.3,
                          vae_encode_maps=5.1, fixed=24 << 20)


def _has_mps() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _available() -> str:
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ["cpu"] + [f"cuda:{i}" for i in range(cuda)] + (["mps"] if _has_mps() else [])
    return ", ".join(names)


def use_device(name: str | None = None) -> str:
    """Select the device everything this backend does next runs on; returns its canonical name.
    None: cuda if there is one, else mps, else cpu. Also "cpu", "cuda", "cuda:N", "mps"."""
    global _device
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if _has_mps() else "cpu"
    kind, _, index = name.partition(":")
    ok = (kind == "cpu" and not index) or (kind == "mps" and not index and _has_mps()) or (
        kind == "cuda" and torch.cuda.is_available() and (not index or (
            index.isdigit() and int(index) < torch.cuda.device_count())))
    if not ok:
        raise ValueError(f"device {name!r} is not available here; available: {_available()}")
    device = torch.device(f"cuda:{index or torch.cuda.current_device()}" if kind == "cuda" else kind)
    _device = device
    return str(device)


_device = torch.device("cpu")
use_device()


def resolve_dtype(name: str | None):
    """None → bf16 on CUDA or MPS, float32 on CPU (same rule as MLX)."""
    if name is None:
        name = "float32" if _device.type == "cpu" else "bfloat16"
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: {', '.join(_DTYPES)}")
    if (name == "bfloat16" and _device.type == "cuda"
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        raise ValueError(f"{torch.cuda.get_device_name(_device)} cannot run bfloat16; "
                         "choose float16 or float32")
    return _DTYPES[name]


def load_transformer(cfg, source, *, dtype, streaming=None, compile=False):
    """streaming: a memory.Streaming (blocks past `resident` read just in time), or None (all resident).
    compile: torch.compile the resident blocks (the first call of each shape compiles)."""
    return _load_transformer(cfg, source, dtype=dtype, device=_device, streaming=streaming, compile=compile)


def load_text_encoder(cfg, source, *, dtype, streaming=None, fp8_matmul=False):
    """fp8_matmul: multiply FP8 weights in FP8, the activations quantized per token and 128 columns (a
    numerics change; refused without FP8 weights or where torch has no FP8 matmul)."""
    return _load_text_encoder(cfg, source, dtype=dtype, device=_device, streaming=streaming,
                              fp8_matmul=fp8_matmul)


def load_vae(cfg, source, *, dtype):
    return _load_vae(cfg, source, dtype=dtype, device=_device)


def from_numpy(a: np.ndarray, dtype=None):
    return _from_numpy(a, dtype, _device)


def to_numpy(x) -> np.ndarray:
    x = x.detach()
    return (x.float() if x.dtype == torch.bfloat16 else x).cpu().numpy()


def evaluate(*xs) -> None:
    """Wait for the queued work: torch runs eagerly, only CUDA queues kernels asynchronously."""
    if _device.type == "cuda":
        torch.cuda.synchronize(_device)


def free(*models) -> None:
    """Drop the caller's references first; this returns CUDA's cached blocks to the driver."""
    del models
    gc.collect()
    if _device.type == "cuda":
        torch.cuda.empty_cache()


def _ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_memory() -> int:
    """Bytes: the most CUDA's allocator has held on the device, or on CPU the process's peak RSS."""
    if _device.type == "cuda":
        return torch.cuda.max_memory_allocated(_device)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:  # macOS: ru_maxrss is in bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def device_memory() -> dict:
    """What the memory planner needs: `total` bytes (the GPU's, or RAM), `limit` the bytes torch should
    stay under (free GPU memory on CUDA; most of RAM otherwise), whether attention is fused (no L² scores:
    SDPA's flash / memory-efficient kernels on a GPU, its flash kernel on the CPU too), the activation
    coefficients (benchmarks/activations.py), and that FP8 weights stay one byte each (FP8Linear)."""
    if _device.type == "cuda":
        free_bytes, total = torch.cuda.mem_get_info(_device)
        return {"total": int(total), "limit": int(free_bytes), "fused_attention": True,
                "activations": ACTIVATIONS, "fp8_kept": True}
    total = _ram()
    limit = int(torch.mps.recommended_max_memory()) if _device.type == "mps" else int(0.8 * total)
    return {"total": total, "limit": limit, "fused_attention": True, "activations": ACTIVATIONS,
            "fp8_kept": True}
