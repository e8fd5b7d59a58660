"""The memory planner's activation coefficients (memory.Activations), measured on one backend.

Each measurement runs in its own fresh process: the weights (random, at real widths: klein-4b's
transformer with one double or one single block, three Qwen3-4B text-encoder layers, the real VAE) are
loaded, one warm-up forward runs, then the peak of one more forward is taken above what was held before:
- MLX: mx.get_peak_memory() above mx.get_active_memory();
- torch on CUDA: torch.cuda.max_memory_allocated() above torch.cuda.memory_allocated();
- torch on CPU: the process's peak RSS (VmHWM, reset by writing 5 to /proc/self/clear_refs) above its RSS,
  after malloc_trim, so that no freed heap memory can serve the forward unseen.
Attention scores (heads·L², counted only where the backend says attention is not fused) are taken out
before fitting; a fit that agrees across the token counts confirms that flag. The coefficient printed for
each kind is the one at its largest size, rounded up to 0.1: where a peak has a constant part (torch's CPU
convolutions), real sizes are far larger still and the constant weighs least there.

    python benchmarks/activations.py --backend torch [--device cuda] [--dtype bfloat16]
    FLUX2_OPENBLAS=1 python benchmarks/activations.py --backend mlx   # Linux: MLX with OpenBLAS
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys

import numpy as np

from flux2_mlx.config import MODELS, QWEN3_4B, text_encoder_shapes, transformer_shapes, vae_shapes
from flux2_mlx.entries import Entry
from flux2_mlx.pipeline import DTYPE_BYTES, dtype_name, open_backend
from flux2_mlx.sampling import prc_img, prc_txt

TEXT = 512  # text tokens, as the pipeline pads prompts
# (kind, size): image tokens beside the 512 text tokens (transformer), batch (text encoder), pixels (VAE)
MEASUREMENTS = [("double", 256), ("double", 512), ("single", 64), ("single", 256), ("text", 1), ("text", 2),
                ("decode", 128), ("decode", 256), ("encode", 128), ("encode", 256)]
KLEIN = MODELS["klein-4b"]
# Three layers, every one an output layer; a small vocabulary (the embedding table is weights only).
TEXT_CFG = dataclasses.replace(QWEN3_4B, output_layers=(1, 2, 3), vocab_size=1024)


def random_entries(shapes: dict[str, tuple[int, ...]]) -> dict[str, Entry]:
    """N(0, 1/fan_in) weights, 1-D tensors (norms, biases, BN statistics) 1; each drawn when loaded."""
    rng = np.random.default_rng(0)

    def draw(shape):
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(math.prod(shape[1:]) ** -0.5)

    return {k: Entry(s, lambda s=s: draw(s)) for k, s in shapes.items()}


def meter(backend: str, device: str):
    """(reset, peak): reset() marks the baseline, peak() gives the bytes above it since."""
    base = 0
    if backend == "mlx":
        import mlx.core as mx

        def reset():
            nonlocal base
            base = mx.get_active_memory()
            mx.reset_peak_memory()

        return reset, lambda: mx.get_peak_memory() - base
    if device.startswith("cuda"):
        import torch

        def reset_cuda():
            nonlocal base
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)

        return reset_cuda, lambda: torch.cuda.max_memory_allocated(device) - base
    libc = ctypes.CDLL("libc.so.6")

    def reset_rss():
        nonlocal base
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = vm_hwm()

    return reset_rss, lambda: vm_hwm() - base


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def setup(kind: str, size: int, be, dtype):
    """(forward, bytes of one unit, attention-score bytes without fusion) for one measurement."""
    if kind in ("double", "single"):
        double = kind == "double"
        cfg = dataclasses.replace(KLEIN.transformer, depth=int(double), depth_single_blocks=int(not double))
        model = be.load_transformer(cfg, random_entries(transformer_shapes(cfg)), dtype=dtype)
        h, w = 16, size // 16
        rng = np.random.default_rng(1)
        args = [be.from_numpy(a) for a in (rng.standard_normal((1, h * w, cfg.in_channels), dtype=np.float32),
                                           prc_img(h, w), np.array([0.5], np.float32),
                                           rng.standard_normal((1, TEXT, cfg.context_in_dim),
                                                               dtype=np.float32),
                                           prc_txt(TEXT))]
        tokens = TEXT + size
        return (lambda: model(*args)), tokens * cfg.hidden_size, cfg.num_heads * tokens**2
    if kind == "text":
        cfg = TEXT_CFG
        model = be.load_text_encoder(cfg, random_entries(text_encoder_shapes(cfg)), dtype=dtype)
        ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (size, TEXT))
        args = be.from_numpy(ids), be.from_numpy(np.ones((size, TEXT), np.int32))
        return ((lambda: model(*args)), size * TEXT * (cfg.hidden_size + cfg.intermediate_size),
                size * cfg.num_attention_heads * TEXT**2)
    vae = be.load_vae(KLEIN.vae, random_entries(vae_shapes(KLEIN.vae)), dtype=be.resolve_dtype("float32"))
    rng = np.random.default_rng(1)
    if kind == "decode":
        z = be.from_numpy(rng.standard_normal((1, size // 16, size // 16, 4 * KLEIN.vae.z_channels),
                                              dtype=np.float32))
        forward = lambda: vae.decode(z)  # noqa: E731
    else:
        img = be.from_numpy(rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32))
        forward = lambda: vae.encode(img)  # noqa: E731
    return forward, size * size * 128, 0  # float32 maps of 128 channels; scores: see the VAE's attention


def measure(args) -> dict:
    """One measurement in this process: peak bytes of one forward above what was held before it."""
    if args.backend == "mlx":
        import _common  # noqa: F401  (before MLX loads: FLUX2_OPENBLAS swaps in OpenBLAS)
    be, name, device = open_backend(args.backend, args.device)
    dtype = be.resolve_dtype(args.dtype)
    kind, size = args.one.split(":")
    forward, unit, scores = setup(kind, int(size), be, dtype)
    be.evaluate(forward())  # warm-up: kernels, thread pools and caches that stay are not activations
    reset, peak = meter(name, device)
    reset()
    out = forward()
    be.evaluate(out)
    vae = kind in ("decode", "encode")
    return {"peak": peak(), "unit": unit, "scores": scores,
            "bytes": 4 if vae else DTYPE_BYTES[dtype_name(be, dtype)],
            "fused": be.device_memory()["fused_attention"], "device": device, "dtype": dtype_name(be, dtype)}


def coefficient(r: dict) -> float:
    """Rows (transformer, text) or maps (VAE) per unit, the scores taken out where attention is not fused."""
    scores = 0 if r["fused"] else r["scores"] * r["bytes"]
    return (r["peak"] - scores) / (r["unit"] * r["bytes"])


def versions(backend: str) -> str:
    if backend == "mlx":
        import mlx.core as mx

        return f"mlx {mx.__version__}"
    import torch

    cuda = f", CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"torch {torch.__version__}{cuda}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["mlx", "torch"], required=True)
    p.add_argument("--device", default=None,
                   help="torch: cpu, cuda, cuda:N; mlx: cpu, gpu (default: the best)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 on a GPU)")
    p.add_argument("--only", nargs="*", help="kinds to measure (double single text decode encode)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child process's one measurement, kind:size
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return

    rows = {}
    for kind, size in MEASUREMENTS:
        if args.only and kind not in args.only:
            continue
        cmd = [sys.executable, __file__, "--backend", args.backend, "--one", f"{kind}:{size}"]
        cmd += [a for flag in ("device", "dtype") if getattr(args, flag)
                for a in (f"--{flag}", getattr(args, flag))]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            sys.exit(f"{kind} {size} failed:\n{out.stderr}")
        r = rows[kind, size] = json.loads(out.stdout.split("RESULT ", 1)[1])
        print(f"{kind:6s} {size:4d}: peak {r['peak'] / 1e6:8.1f} MB, "
              f"scores {r['scores'] * r['bytes'] / 1e6:7.1f} MB "
              f"({'fused, not counted' if r['fused'] else 'counted'}), {coefficient(r):.2f} per unit",
              flush=True)

    r = next(iter(rows.values()))
    print(f"{datetime.date.today()} | {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.processor() or '?'} | {versions(args.backend)} | {args.backend} on {r['device']}, "
          f"{r['dtype']}, attention {'fused' if r['fused'] else 'with scores'}")
    fit = {}
    for kind in dict.fromkeys(k for k, _ in rows):
        values = [coefficient(r) for (k, _), r in rows.items() if k == kind]
        fit[kind] = math.ceil(values[-1] * 10 - 1e-6) / 10
        print(f"{kind:6s}: {' / '.join(f'{v:.2f}' for v in values)} → {fit[kind]}")
    if len(fit) == 5:
        print(f"Activations(transformer_rows=({fit['double']}, {fit['single']}), text_rows={fit['text']}, "
              f"vae_decode_maps={fit['decode']}, vae_encode_maps={fit['encode']})")


if __name__ == "__main__":
    main()
