"""Per-step time and peak memory of a transformer forward: resident vs streamed from RAM vs from disk.

Builds a float32 (or --dtype) transformer at real klein-4b layer widths with --double/--single blocks and
saves it as safetensors; then each mode runs in its own fresh process (so its max RSS is its own), loads
the file as the pipeline would for --budget-fraction of the weights (the plan's resident block count),
and times one forward (= one denoising step). Prints a markdown table.
"""

from __future__ import annotations  # noqa: I001 -- _common first (preloads OpenBLAS before mlx)

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import run_info, time_forward  # first: preloads OpenBLAS

import mlx.core as mx
import numpy as np

import flux2_mlx.mlx_backend as backend
from flux2_mlx import memory
from flux2_mlx.config import MODELS, transformer_shapes
from flux2_mlx.dit_names import transformer_entries
from flux2_mlx.entries import block_key
from flux2_mlx.sampling import prc_img, prc_txt
from flux2_mlx.weights import WeightSource, save_safetensors

# mode: (keep host copies, evict the file from the page cache before every step)
MODES = {"resident": (None, False), "streamed, RAM": (True, False),
         "streamed, disk (page cache)": (False, False), "streamed, disk (cold)": (False, True)}


def phases(args, cfg, path, dtype) -> tuple[memory.Weights, memory.Phase]:
    """(weights, the phase at the budget), as the planner makes them."""
    h = args.size // 16
    w = memory.component_weights("transformer", transformer_entries(WeightSource(path)),
                                 ("double_blocks", "single_blocks"), dtype.size)
    acts = memory.transformer_activations(cfg.hidden_size, cfg.num_heads, 512 + h * h, dtype.size,
                                          mx.default_device() == mx.gpu)
    return w, memory._fit("denoise", w, acts, 0, memory.usable(int(args.budget_fraction * w.total)))


def run_mode(args, cfg, path, dtype) -> dict:
    """One mode in this process: load, time, and report s/step, MLX peak and this process's max RSS."""
    _, phase = phases(args, cfg, path, dtype)
    keep, cold = MODES[args.mode]
    streaming = None if keep is None else memory.Streaming(phase.resident_blocks, keep)
    h = args.size // 16
    x = mx.random.normal((1, h * h, cfg.in_channels), dtype=dtype)
    ctx = mx.random.normal((1, 512, cfg.context_in_dim), dtype=dtype)
    inputs = (x, mx.array(prc_img(h, h)), mx.array([0.5]), ctx, mx.array(prc_txt(512)))
    mx.eval(inputs)
    model = backend.load_transformer(cfg, WeightSource(path, pread=streaming is not None), dtype=dtype,
                                     streaming=streaming)

    def forward():
        if cold:  # every streamed block then comes from the storage device (clean pages: no root needed)
            evict(path)
        return model(*inputs)

    # one warm-up: from RAM, it is also the one read of every block
    sec, times, _ = time_forward(forward, 1, args.repeats)
    return {"sec": sec, "times": times, "mlx_peak": mx.get_peak_memory(), "rss": vm_hwm(),
            "read_block_s": read_block(path, dtype, cold) if keep is False else None}


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def read_block(path: Path, dtype, cold: bool) -> float:
    """Seconds to read the last single block from the file and place it in MLX memory, as the prefetch
    thread does when streaming from disk."""
    entries = transformer_entries(WeightSource(path, pread=True))
    last = max(i for i in (block_key(k, ("double_blocks", "single_blocks")) for k in entries) if i)[:2]
    if cold:
        evict(path)
    t0 = time.perf_counter()
    mx.eval([backend.from_numpy(e.load(), dtype) for k, e in entries.items()
             if (block_key(k, ("double_blocks", "single_blocks")) or ())[:2] == last])
    return time.perf_counter() - t0


def vm_hwm() -> int:
    """This process's peak RSS in bytes (Linux). Not ru_maxrss: after fork and exec it can report the
    parent's RSS at the fork."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="klein-4b", choices=["dev", "klein-4b", "klein-9b"])
    p.add_argument("--double", type=int, default=1)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--budget-fraction", type=float, default=0.5, help="budget as a fraction of the weights")
    p.add_argument("--dtype", default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # a child process's one mode
    p.add_argument("--file", help=argparse.SUPPRESS)
    args = p.parse_args()

    cfg = dataclasses.replace(MODELS[args.model].transformer, depth=args.double,
                              depth_single_blocks=args.single)
    dtype = backend.resolve_dtype(args.dtype)
    if args.mode:
        print("RESULT " + json.dumps(run_mode(args, cfg, Path(args.file), dtype)), flush=True)
        return

    folder = Path(tempfile.mkdtemp())
    path = folder / "t.safetensors"
    rng = np.random.default_rng(0)
    save_safetensors(path, {n: (np.ones(s, np.float32) if len(s) == 1 else
                                rng.standard_normal(s, dtype=np.float32) * np.float32(s[-1] ** -0.5))
                            for n, s in transformer_shapes(cfg).items()})
    w, phase = phases(args, cfg, path, dtype)
    rows = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--file", str(path)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            sys.exit(f"{mode} failed:\n{out.stderr}")
        rows[mode] = json.loads(out.stdout.split("RESULT ", 1)[1])
    path.unlink()

    info = run_info()
    print(f"{info['date']} | {info['machine']} | mlx {info['mlx']} | OpenBLAS {info['openblas']} | "
          f"{args.model} widths, {args.double}+{args.single} blocks, {args.size}px, {dtype}")
    print(f"weights {w.total / 1e6:.0f} MB, budget {args.budget_fraction:.0%} = "
          f"{args.budget_fraction * w.total / 1e6:.0f} MB, plan: {phase.resident_blocks} of {phase.blocks} "
          f"blocks resident, predicted peak {phase.peak / 1e6:.0f} MB")
    print(json.dumps(rows))
    base = rows["resident"]["sec"]
    print(f"compute per block (resident step / blocks): {base / phase.blocks:.2f} s")
    print("| mode | s/step | × resident | MLX peak MB | process peak RSS MB | read + place one block s |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for mode, r in rows.items():
        read = "–" if r["read_block_s"] is None else f"{r['read_block_s']:.2f}"
        print(f"| {mode} | {r['sec']:.2f} | {r['sec'] / base:.2f} | {r['mlx_peak'] / 1e6:.0f} | "
              f"{r['rss'] / 1e6:.0f} | {read} |")


if __name__ == "__main__":
    main()
