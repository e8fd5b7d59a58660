"""FP8 / NVFP4 / MXFP8 transformer files beside bf16: load time, memory and one transformer step.

Builds a klein-4b-sized transformer (hidden 3072, MLP 9216, context 7680) cut to 1 double + 2 single
blocks, writes it as a bf16 safetensors and converts it with `flux2 convert --type fp8 / nvfp4 / mxfp8`
(ComfyUI layout: the blocks' Linears quantized, the rest bf16). Then, interleaving the formats each round
so that a drifting machine shifts them alike (medians reported):
- load: `load_transformer(cfg, WeightSource(file), dtype=bfloat16)` (page cache warm), MB/s of file bytes,
  MLX active memory after it and the peak during it, beside the memory planner's count of the same file;
- step: one transformer forward (no CFG) of each file's model in the compute dtype at --width x --height
  and --text-tokens, the native path (MLX's nvfp4 / mxfp8 quantized matmul) against the dense bf16 weights;
  --torch then does the same on the torch backend (each scaled layer decoded just before its matmul, or
  FP8 kernels on a CUDA GPU).
The last columns scale the load to the whole klein-4b (file bytes at the measured MB/s, memory by the
planner): an extrapolation.

On a Mac or a GPU machine the same command measures the numbers that matter (CPUs have no FP8 / FP4 matmul):
  python benchmarks/scaled_load.py                  # Apple silicon: MLX on Metal, bf16 compute
  python benchmarks/scaled_load.py --torch          # + the torch backend (CUDA when present)
  python benchmarks/scaled_load.py --width 1024 --height 1024 --text-tokens 512   # a real step size
"""

from __future__ import annotations  # noqa: I001 -- _common first (preloads OpenBLAS before mlx)

import argparse
import dataclasses
import gc
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import run_info, write_json, write_transformer

import mlx.core as mx
import numpy as np

from flux2_mlx import memory
from flux2_mlx.config import KLEIN_4B, transformer_shapes
from flux2_mlx.convert import convert
from flux2_mlx.dit_names import transformer_entries
from flux2_mlx.entries import Entry
from flux2_mlx.quant.recipes import scaled_format
from flux2_mlx.sampling import prc_img, prc_txt
from flux2_mlx.weights import WeightSource

BLOCKS = ("double_blocks", "single_blocks")
STORED = {"float8_e4m3fn": "FP8", "nvfp4": "NVFP4", "mxfp8": "MXFP8", None: "BF16"}


def planned(entries: dict[str, Entry], compute_bytes: int, fp8_kept: bool = False) -> int:
    return memory.component_weights("transformer", entries, BLOCKS, compute_bytes, fp8_kept).total


def whole_model(target: str) -> dict[str, Entry]:
    """The whole klein-4b as `flux2 convert --type target` would store it: shapes and stored types only."""
    return {k: Entry(s, lambda: None, "BF16" if target == "bf16" else STORED[scaled_format(k, s, target)])
            for k, s in transformer_shapes(KLEIN_4B).items()}


def load_avg() -> str:
    out = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    return out.split("load average:")[-1].strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="bf16,fp8,nvfp4,mxfp8", help="comma-separated; bf16 is the baseline")
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="compute dtype (default: bfloat16 on a GPU, float32 on CPU)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of loads")
    ap.add_argument("--step-repeats", type=int, default=3, help="timed rounds of steps (after one warm-up)")
    ap.add_argument("--torch", action="store_true", help="also time the torch backend's step")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args()

    from flux2_mlx import mlx_backend as be

    types = args.types.split(",")
    cfg = dataclasses.replace(KLEIN_4B, depth=args.double, depth_single_blocks=args.single)
    gpu = mx.default_device() == mx.gpu
    dtype_name = args.dtype or ("bfloat16" if gpu else "float32")
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        src = Path(d) / "f32.safetensors"
        write_transformer(src, cfg)
        files = {}
        for t in types:
            files[t] = Path(d) / f"{t}.safetensors"
            if t == "bf16":
                write_transformer(files[t], cfg, bf16=True)
            else:
                convert(src, files[t], t, progress=False)
        src.unlink()
        loads: dict[str, list] = {t: [] for t in types}
        load_avgs = [load_avg()]
        for r in range(args.repeats):
            for t in types:
                gc.collect()
                mx.clear_cache()
                mx.reset_peak_memory()
                base = mx.get_active_memory()
                t0 = time.perf_counter()
                model = be.load_transformer(cfg, WeightSource(files[t]), dtype=mx.bfloat16)
                s = time.perf_counter() - t0
                loads[t].append((s, mx.get_active_memory() - base, mx.get_peak_memory() - base))
                del model
                print(f"load {t} round {r + 1}: {s:.2f} s")
        size = {t: f.stat().st_size for t, f in files.items()}
        plan = {t: planned(transformer_entries(WeightSource(f)), 2) for t, f in files.items()}

        h, w, n_txt = args.height // 16, args.width // 16, args.text_tokens
        rng = np.random.default_rng(1)
        x = rng.standard_normal((1, h * w, cfg.in_channels), np.float32)
        ctx = rng.standard_normal((1, n_txt, cfg.context_in_dim), np.float32)
        inp = dict(x=x, ctx=ctx, x_ids=prc_img(h, w), ctx_ids=prc_txt(n_txt), t=np.array([0.5], np.float32))
        load_avgs.append(load_avg())
        timed: dict[tuple, list[float]] = {}
        for backend in ("mlx", "torch") if args.torch else ("mlx",):
            make = _mlx_step if backend == "mlx" else _torch_step
            steps = {t: make(cfg, files[t], inp, dtype_name) for t in types}
            for r in range(1 + args.step_repeats):  # round 0 warms up
                for t, step in steps.items():
                    t0 = time.perf_counter()
                    step()
                    s = time.perf_counter() - t0
                    if r:
                        timed.setdefault((t, backend), []).append(s)
                    print(f"step {backend} {t} {'warm-up' if r == 0 else f'round {r}'}: {s:.2f} s")
            del steps
            gc.collect()
            mx.clear_cache()
        load_avgs.append(load_avg())

    info = run_info()
    print(f"\n{info['date']} | {info['machine']} | MLX {info['mlx']} | klein-4b dims, {args.double} double + "
          f"{args.single} single blocks | loads in bfloat16, steps in {dtype_name} | load average "
          f"(1, 5, 15 min) at start, before steps, end: {' / '.join(load_avgs)}\n")
    print("| file | file MB | load s | MB/s | MLX model MB | peak MLX MB | planner MB | whole klein-4b: file "
          "MB / load s / MLX MB (extrapolated) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for t in types:
        s, held, peak = (statistics.median(v) for v in zip(*loads[t]))
        whole = whole_model(t)
        file_whole = planned(whole, 2, fp8_kept=True)  # the bytes as stored (bf16 for the rest)
        rows.append({"type": t, "file_bytes": size[t], "load_s": s, "load_s_all": [v[0] for v in loads[t]],
                     "mlx_bytes": held, "peak_bytes": peak, "planner_bytes": plan[t],
                     "whole_file_bytes": file_whole, "whole_load_s": s * file_whole / size[t],
                     "whole_mlx_bytes": planned(whole, 2)})
        row = rows[-1]
        print(f"| {t} | {size[t] / 1e6:.0f} | {s:.2f} | {size[t] / 1e6 / s:.0f} | {held / 1e6:.0f} | "
              f"{peak / 1e6:.0f} | {plan[t] / 1e6:.0f} | {file_whole / 1e6:.0f} / "
              f"{row['whole_load_s']:.1f} / {row['whole_mlx_bytes'] / 1e6:.0f} |")
    print(f"\nStep: {args.width}x{args.height} ({h * w} image tokens) + {n_txt} text tokens, one forward in "
          f"{dtype_name}, median of {args.step_repeats}\n")
    print("| backend | file | s / step | vs bf16 |")
    print("| --- | --- | --- | --- |")
    for (t, backend), v in timed.items():
        med, ref = statistics.median(v), timed.get(("bf16", backend))
        rel = f"{med / statistics.median(ref):.2f}x" if ref else "–"
        print(f"| {backend} | {t} | {med:.2f} | {rel} |")
        rows.append({"type": t, "backend": backend, "step_s": med, "step_s_all": v})
    write_json(args.json, {**info, "dtype": dtype_name, "load_average": load_avgs, "rows": rows,
                           "image_tokens": h * w, "text_tokens": n_txt, "cpus": os.cpu_count()})


def _mlx_step(cfg, path: Path, inp: dict, dtype_name: str):
    from flux2_mlx import mlx_backend as be

    dtype = be.resolve_dtype(dtype_name)
    model = be.load_transformer(cfg, WeightSource(path), dtype=dtype)
    a = {k: mx.array(v) for k, v in inp.items()}
    x, ctx = a["x"].astype(dtype), a["ctx"].astype(dtype)
    return lambda: mx.eval(model(x, a["x_ids"], a["t"], ctx, a["ctx_ids"], None))


def _torch_step(cfg, path: Path, inp: dict, dtype_name: str):
    import torch

    from flux2_mlx import torch_backend as be

    dtype = be.resolve_dtype(dtype_name)
    model = be.load_transformer(cfg, WeightSource(path), dtype=dtype)
    a = {k: be.from_numpy(v) for k, v in inp.items()}
    x, ctx = a["x"].to(dtype), a["ctx"].to(dtype)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def step():
        with torch.inference_mode():
            model(x, a["x_ids"], a["t"], ctx, a["ctx_ids"], None)
        sync()

    return step


if __name__ == "__main__":
    main()
