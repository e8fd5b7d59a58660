"""Time one FLUX.2 transformer forward (one denoising step, no CFG) at real dimensions, random weights.

Prints a markdown row for BENCHMARKS.md. Linux CPU: FLUX2_OPENBLAS=1 preloads OpenBLAS for fast f32 matmul.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time


def _preload_openblas() -> str:
    """Must run before the first `import mlx.core` (gguf-and-quantization.md §8.3)."""
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

from flux2_mlx.config import MODELS, TransformerConfig, transformer_shapes  # noqa: E402
from flux2_mlx.keymap import Entry  # noqa: E402
from flux2_mlx.mlx_backend import load_transformer, resolve_dtype  # noqa: E402
from flux2_mlx.sampling import prc_img, prc_txt  # noqa: E402
from flux2_mlx.weights import BF16  # noqa: E402


def forward_flops(cfg: TransformerConfig, n_img: int, n_txt: int) -> float:
    """FLOPs of one batch-1 forward: 2·M·K·N per Linear (M = rows), 4·L²·H per joint attention
    (QKᵀ and PV, heads·head_dim = H, L = text + image tokens); elementwise ops ignored."""
    H, M, C, L = cfg.hidden_size, cfg.mlp_hidden, cfg.in_channels, n_img + n_txt
    embed = 2 * n_img * C * H + 2 * n_txt * cfg.context_in_dim * H  # img_in, txt_in
    vec = (2 if cfg.use_guidance_embed else 1) * 2 * (256 * H + H * H)  # time_in (+ guidance_in)
    vec += 2 * (6 * H * H) * 2 + 2 * 3 * H * H + 2 * H * 2 * H  # modulations, final adaLN (1 row)
    final = 2 * n_img * H * C
    attn = 4 * L * L * H
    double = 2 * L * (H * 3 * H + H * H + H * 2 * M + M * H) + attn  # both streams together
    single = 2 * L * (H * (3 * H + 2 * M) + (H + M) * H) + attn
    return float(embed + vec + final + cfg.depth * double + cfg.depth_single_blocks * single)


def random_entries(cfg: TransformerConfig, dtype) -> dict[str, Entry]:
    """Each tensor drawn directly in `dtype`, N(0, 1/fan_in) (norm scales = 1), one at a time."""

    def loader(shape):
        def load() -> np.ndarray:
            if len(shape) == 1:
                return np.ones(shape, np.float32)
            a = mx.random.normal(shape, dtype=dtype, scale=shape[-1] ** -0.5)
            # numpy has no bf16: hand the raw bits over as the project's BF16 dtype (no f32 copy).
            return np.array(a.view(mx.uint16)).view(BF16) if dtype == mx.bfloat16 else np.array(a)
        return load

    return {name: Entry(shape, loader(shape)) for name, shape in transformer_shapes(cfg).items()}


def machine() -> str:
    info = mx.device_info() if hasattr(mx, "device_info") else (
        mx.metal.device_info() if mx.metal.is_available() else {})
    name = info.get("device_name") or platform.processor() or platform.machine()
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {name}, {mx.default_device()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="klein-4b", choices=["dev", "klein-4b", "klein-9b"])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--double-blocks", type=int, default=None, help="default: the model's full depth")
    p.add_argument("--single-blocks", type=int, default=None, help="default: the model's full depth")
    p.add_argument("--dtype", default=None,
                   help="bfloat16 | float16 | float32 (default: bf16 on GPU, float32 on CPU)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args()
    if args.width % 16 or args.height % 16:
        p.error("--width and --height must be multiples of 16")

    full = MODELS[args.model].transformer
    d = full.depth if args.double_blocks is None else args.double_blocks
    s = full.depth_single_blocks if args.single_blocks is None else args.single_blocks
    cfg = dataclasses.replace(full, depth=d, depth_single_blocks=s)
    dtype = resolve_dtype(args.dtype)
    dtype_name = str(dtype).rsplit(".", 1)[-1]
    h, w, n_txt = args.height // 16, args.width // 16, args.text_tokens
    print(f"OpenBLAS preload: {OPENBLAS}; device {mx.default_device()}; mlx {mx.__version__}")

    mx.random.seed(0)
    t0 = time.perf_counter()
    model = load_transformer(cfg, random_entries(cfg, dtype), dtype=dtype)
    print(f"built {args.model} {d}+{s} blocks in {dtype_name}: {time.perf_counter() - t0:.1f} s")

    x = mx.random.normal((1, h * w, cfg.in_channels), dtype=dtype)
    ctx = mx.random.normal((1, n_txt, cfg.context_in_dim), dtype=dtype)
    x_ids, ctx_ids = mx.array(prc_img(h, w)), mx.array(prc_txt(n_txt))
    t = mx.array([0.5], dtype=dtype)
    guidance = mx.array([4.0], dtype=dtype) if cfg.use_guidance_embed else None
    mx.eval(x, ctx, x_ids, ctx_ids, t)

    def step() -> float:
        start = time.perf_counter()
        out = model(x, x_ids, t, ctx, ctx_ids, guidance)
        mx.eval(out)
        step.finite = bool(mx.isfinite(out).all())
        return time.perf_counter() - start

    for i in range(args.warmup):
        print(f"warmup {i + 1}/{args.warmup}: {step():.2f} s")
    times = []
    for i in range(args.repeats):
        times.append(step())
        print(f"run {i + 1}/{args.repeats}: {times[-1]:.2f} s")

    sec = statistics.median(times)
    flops, flops_full = forward_flops(cfg, h * w, n_txt), forward_flops(full, h * w, n_txt)
    res = {
        "date": datetime.date.today().isoformat(), "machine": machine(), "mlx": mx.__version__,
        "openblas": OPENBLAS, "model": args.model, "double_blocks": d, "single_blocks": s,
        "full_double_blocks": full.depth, "full_single_blocks": full.depth_single_blocks,
        "width": args.width, "height": args.height, "image_tokens": h * w, "text_tokens": n_txt,
        "dtype": dtype_name, "seconds_per_step": sec, "times": times, "tflop": flops / 1e12,
        "tflop_full": flops_full / 1e12, "tflops_per_s": flops / sec / 1e12,
        "extrapolated_full_seconds_per_step": sec * flops_full / flops,
        "peak_memory_gb": mx.get_peak_memory() / 1e9, "output_finite": step.finite,
    }
    print(f"{res['tflop']:.2f} TFLOP per step at {d}+{s} blocks, {res['tflop_full']:.2f} at full depth; "
          f"peak memory {res['peak_memory_gb']:.1f} GB; output finite: {step.finite}")
    print(f"| {res['date']} | {res['machine']} | {res['mlx']} | {args.model} | "
          f"{d}+{s} of {full.depth}+{full.depth_single_blocks} | {args.width}x{args.height} | {dtype_name} | "
          f"{sec:.2f} | {res['tflops_per_s']:.3g} | {res['extrapolated_full_seconds_per_step']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
