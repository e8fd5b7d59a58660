"""GGUF → MLX load throughput and peak memory, and `flux2 convert` throughput by worker count.

Builds a float32 FLUX.2 transformer at real klein-4b layer dimensions (hidden 3072, MLP 9216, context 7680)
with fewer blocks (default 1 double + 2 single), converts it with `flux2_mlx.convert.convert` to each
target, and times `load_transformer(cfg, WeightSource(gguf), dtype=...)` (parse + repack + mx.eval).
MB/s counts GGUF file bytes; peak is `mx.get_peak_memory()` during the load, beside the loaded model's
MLX bytes (the issue's budget: the quantized model plus at most one layer being repacked).
Conversion MB/s counts the float32 source bytes. Prints markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import tempfile
import time
from pathlib import Path

from _common import write_transformer

from flux2_mlx.config import KLEIN_4B
from flux2_mlx.convert import convert
from flux2_mlx.weights import WeightSource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q6_K", "Q4_K_S", "BF16"])
    ap.add_argument("--convert-jobs", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                    help="thread counts to time Q4_K_S conversion with")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core {platform.machine()} {platform.system()}")
    args = ap.parse_args()

    import mlx.core as mx

    from flux2_mlx.mlx_backend.load import load_transformer

    cfg = dataclasses.replace(KLEIN_4B, depth=args.double, depth_single_blocks=args.single)
    dtype = getattr(mx, args.dtype)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        d = Path(d)
        src = d / "src.safetensors"
        src_bytes = write_transformer(src, cfg)
        conv_rows = []
        for jobs in args.convert_jobs:
            dst = d / f"conv-{jobs}.gguf"
            t0 = time.perf_counter()
            convert(src, dst, "Q4_K_S", progress=False, jobs=jobs)
            s = time.perf_counter() - t0
            conv_rows.append((jobs, s, src_bytes / 1e6 / s))
        same = len({(d / f"conv-{j}.gguf").read_bytes() for j in args.convert_jobs}) == 1
        for j in args.convert_jobs:
            (d / f"conv-{j}.gguf").unlink()

        load_rows = []
        for target in args.types:
            g = d / f"{target}.gguf"
            convert(src, g, target, progress=False, jobs=args.convert_jobs[-1])
            size = g.stat().st_size
            gc.collect()
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            t0 = time.perf_counter()
            model = load_transformer(cfg, WeightSource(g), dtype=dtype)
            s = time.perf_counter() - t0
            peak = mx.get_peak_memory() - base
            held = mx.get_active_memory() - base
            load_rows.append((target, size, s, size / 1e6 / s, held, peak))
            del model
            gc.collect()
            mx.clear_cache()
            g.unlink()

    blocks = f"klein-4b dims, {args.double} double + {args.single} single blocks"
    print(f"{datetime.date.today()} | {args.machine} | MLX {mx.__version__} {mx.default_device()} | "
          f"{blocks} | float32 source {src_bytes / 1e6:.0f} MB")
    print()
    print(f"Conversion to Q4_K_S (bytes identical across jobs: {'yes' if same else 'NO'})")
    print()
    print("| jobs | s | MB/s fp32 in | speed-up |")
    print("| --- | --- | --- | --- |")
    for jobs, s, rate in conv_rows:
        print(f"| {jobs} | {s:.1f} | {rate:.0f} | {conv_rows[0][1] / s:.2f}x |")
    print()
    print(f"Load (dtype {args.dtype})")
    print()
    print("| target | GGUF MB | load s | MB/s | MLX model MB | peak MLX MB | peak − model MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for target, size, s, rate, held, peak in load_rows:
        print(f"| {target} | {size / 1e6:.0f} | {s:.2f} | {rate:.0f} | {held / 1e6:.0f} | {peak / 1e6:.0f} | "
              f"{(peak - held) / 1e6:.0f} |")


if __name__ == "__main__":
    main()
