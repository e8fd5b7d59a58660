"""The MLX backend: the functions every backend exports (tests/test_layering.py checks), nothing else."""

from __future__ import annotations

import gc
import os

import mlx.core as mx
import numpy as np

from ..memory import Activations
from .load import from_numpy as _from_numpy
from .load import load_text_encoder as _load_text_encoder
from .load import load_transformer as _load_transformer
from .load import load_vae as _load_vae

_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


def use_device(name: str | None = None) -> str:
    """Run everything next on `name`: "gpu" (Metal, or MLX's CUDA build) or "cpu"; None: the GPU when
    there is one. Returns the device's name."""
    gpu = mx.is_available(mx.gpu)
    name = name or ("gpu" if gpu else "cpu")
    if name not in ("gpu", "cpu"):
        raise ValueError(f"the mlx backend runs on 'gpu' or 'cpu', not {name!r}")
    if name == "gpu" and not gpu:
        raise ValueError("this MLX build has no GPU here (no Metal, no CUDA); use --device cpu")
    mx.set_default_device(mx.gpu if name == "gpu" else mx.cpu)
    return name


def resolve_dtype(name: str | None):
    """None → bf16 on a GPU (Metal or CUDA), float32 on CPU, where MLX has no fast bf16 matmul."""
    if name is None:
        return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load_transformer(cfg, source, *, dtype, streaming=None, compile=False):
    """streaming: a memory.Streaming (blocks past `resident` read just in time), or None (all resident).
    compile: torch's option; MLX has none to offer here."""
    if compile:
        raise ValueError("compiling the transformer is a torch-backend option; "
                         "use --backend torch or drop --compile")
    return _load_transformer(cfg, source, dtype=dtype, streaming=streaming)


def load_text_encoder(cfg, source, *, dtype, streaming=None, fp8_matmul=False):
    """fp8_matmul: torch's option; MLX decodes FP8 weights on load."""
    if fp8_matmul:
        raise ValueError("FP8 matmuls are a torch-backend option; use --backend torch or drop --fp8-matmul")
    return _load_text_encoder(cfg, source, dtype=dtype, streaming=streaming)


def load_vae(cfg, source, *, dtype):
    return _load_vae(cfg, source, dtype=dtype)


def from_numpy(a: np.ndarray, dtype=None):
    return _from_numpy(a, dtype)


def to_numpy(x) -> np.ndarray:
    return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)


def evaluate(*xs) -> None:
    mx.eval(*xs)


def free(*models) -> None:
    """Drop the caller's references first; this clears MLX's buffer cache so the memory returns."""
    del models
    gc.collect()
    mx.clear_cache()


def peak_memory() -> int:
    """Bytes: the most the backend's allocator has held since the process started."""
    return mx.get_peak_memory()


def device_memory() -> dict:
    """What the memory planner needs: `total` bytes of RAM, `limit` the bytes MLX should stay under
    (Metal's recommended working set; on CPU most of RAM), whether attention is fused (no L² scores), and
    MLX's measured activation coefficients (memory.Activations: its defaults were measured here). FP8
    weights are decoded on load (MLX has no FP8 matmul), so they count in the compute dtype."""
    info = mx.device_info()
    total = info.get("memory_size") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = info.get("max_recommended_working_set_size") or int(0.8 * total)
    return {"total": int(total), "limit": int(limit), "fused_attention": mx.default_device() == mx.gpu,
            "activations": Activations(), "fp8_kept": False}
