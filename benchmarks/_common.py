"""Shared by the step benchmarks: OpenBLAS preload, random weights, the timing loop, machine and JSON.

Import this before anything imports mlx: the preload only works ahead of the first `import mlx.core`.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import statistics
import time


def _preload_openblas() -> str:
    """Linux CPU: MLX's wheel links netlib BLAS; FLUX2_OPENBLAS=1 (or a path) swaps in OpenBLAS
    (BENCHMARKS.md says why and when it works)."""
    path = os.environ.get("FLUX2_OPENBLAS")
    if not path:
        return "not requested"
    path = "libopenblas.so.0" if path == "1" else path
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        return f"loaded {path}"
    except OSError as e:
        return f"FAILED ({e})"


OPENBLAS = _preload_openblas()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from flux2_mlx.entries import Entry  # noqa: E402
from flux2_mlx.weights import BF16, f32_to_bf16  # noqa: E402


def random_entries(shapes: dict[str, tuple[int, ...]], dtype,
                   embeddings: tuple[str, ...] = ()) -> dict[str, Entry]:
    """Each tensor drawn directly in `dtype`, one at a time: N(0, 1/fan_in), N(0, 1) for names ending in
    one of `embeddings`, 1-D tensors (norm weights) 1."""

    def loader(name, shape):
        def load() -> np.ndarray:
            if len(shape) == 1:
                return np.ones(shape, np.float32)
            scale = 1.0 if name.endswith(embeddings) else shape[-1] ** -0.5
            a = mx.random.normal(shape, dtype=dtype, scale=scale)
            # numpy has no bf16: hand the raw bits over as the project's BF16 dtype (no f32 copy).
            return np.array(a.view(mx.uint16)).view(BF16) if dtype == mx.bfloat16 else np.array(a)
        return load

    return {name: Entry(shape, loader(name, shape)) for name, shape in shapes.items()}


def machine() -> str:
    info = mx.device_info() if hasattr(mx, "device_info") else (
        mx.metal.device_info() if mx.metal.is_available() else {})
    name = info.get("device_name") or platform.processor() or platform.machine()
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {name}, {mx.default_device()}"


def run_info() -> dict:
    """The fields every result starts with: when, where, which MLX, which BLAS."""
    return {"date": datetime.date.today().isoformat(), "machine": machine(), "mlx": mx.__version__,
            "openblas": OPENBLAS}


def time_forward(forward, warmup: int, repeats: int, evaluate=mx.eval,
                 is_finite=lambda out: bool(mx.isfinite(out).all())) -> tuple[float, list[float], bool]:
    """Median seconds of `repeats` calls of forward() (each evaluated: `evaluate`, MLX's by default), after
    `warmup` untimed ones; also every time and whether the last output was finite."""
    finite = True

    def step() -> float:
        nonlocal finite
        start = time.perf_counter()
        out = forward()
        evaluate(out)
        elapsed = time.perf_counter() - start
        finite = is_finite(out)
        return elapsed

    for i in range(warmup):
        print(f"warmup {i + 1}/{warmup}: {step():.2f} s")
    times = []
    for i in range(repeats):
        times.append(step())
        print(f"run {i + 1}/{repeats}: {times[-1]:.2f} s")
    return statistics.median(times), times, finite


def best_of(fn, repeats: int) -> float:
    """The fastest of `repeats` calls of fn(), in seconds (for short host-side work; no MLX eval)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def write_json(path: str | None, res: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)


def gguf_entries(entries: dict[str, Entry], qtype: str | None) -> dict[str, Entry]:
    """The blocks' Linear weights stored as ggml `qtype`, as in a GGUF that `flux2 convert` wrote (the
    embedders and the final layer stay in the compute dtype). Speed does not depend on the values, so each
    distinct shape is quantized once and shared by every block."""
    if qtype is None:
        return entries
    from flux2_mlx.quant import GGMLType, quantize
    from flux2_mlx.weights import GGMLTensor, to_float32

    cache: dict[tuple, np.ndarray] = {}

    def loader(entry):
        def load():
            if entry.shape not in cache:
                cache[entry.shape] = quantize(to_float32(np.asarray(entry.load())), GGMLType[qtype])
            return GGMLTensor(cache[entry.shape], qtype, entry.shape)
        return load

    blocks = set(block_linears({k: e.shape for k, e in entries.items()}))
    return {k: Entry(e.shape, loader(e), qtype) if k in blocks else e for k, e in entries.items()}


def block_linears(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The transformer blocks' Linear weights: what convert quantizes and what LoRAs mostly target."""
    blocks = ("double_blocks.", "single_blocks.")
    return [k for k, s in shapes.items() if k.startswith(blocks) and len(s) == 2]


def write_transformer(path, cfg, bf16: bool = False) -> int:
    """A safetensors transformer of `cfg`'s shapes at `path` (float32, or bf16): N(0, 1/fan_in) weights,
    norm scales 1 + 0.2·N(0, 1); returns its float32 bytes."""
    from flux2_mlx.config import transformer_shapes
    from flux2_mlx.weights import save_safetensors

    rng = np.random.default_rng(0)
    w = {}
    for name, shape in transformer_shapes(cfg).items():
        if name.endswith(".scale"):
            a = 1.0 + 0.2 * rng.standard_normal(shape, dtype=np.float32)
        else:
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(shape[1]))
        w[name] = f32_to_bf16(a) if bf16 else a
    save_safetensors(path, w)
    return sum(4 * a.size for a in w.values())


def numpy_entries(shapes: dict, dtype_name: str) -> dict[str, Entry]:
    """N(0, 1/fan_in) weights (norm scales 1) drawn one tensor at a time, bf16 as the project's BF16 bits."""
    rng = np.random.default_rng(0)

    def loader(shape):
        def load():
            a = np.ones(shape, np.float32) if len(shape) == 1 else (
                rng.standard_normal(shape, np.float32) * np.float32(shape[-1] ** -0.5))
            return f32_to_bf16(a) if dtype_name == "bfloat16" else a.astype(dtype_name)
        return load

    return {name: Entry(shape, loader(shape)) for name, shape in shapes.items()}
