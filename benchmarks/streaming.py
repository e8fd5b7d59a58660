"""Per-step time and peak memory of a transformer forward: resident vs streamed from RAM vs from disk.

Builds a float32 (or --dtype) transformer at real klein-4b layer widths with --double/--single blocks,
saves it as safetensors, and times one forward (= one denoising step) each way in the same process,
with the plan's resident block count for --budget-fraction of the weights. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import resource
import tempfile
from pathlib import Path

from _common import run_info, time_forward  # first: preloads OpenBLAS

import mlx.core as mx
import numpy as np

from flux2_mlx import memory
from flux2_mlx.config import MODELS, transformer_shapes
from flux2_mlx.keymap import transformer_entries
from flux2_mlx.mlx_backend import load_transformer, resolve_dtype
from flux2_mlx.sampling import prc_img, prc_txt
from flux2_mlx.weights import WeightSource, save_safetensors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="klein-4b", choices=["dev", "klein-4b", "klein-9b"])
    p.add_argument("--double", type=int, default=1)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--budget-fraction", type=float, default=0.5, help="budget as a fraction of the weights")
    p.add_argument("--dtype", default=None)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    cfg = dataclasses.replace(MODELS[args.model].transformer, depth=args.double, depth_single_blocks=args.single)
    dtype = resolve_dtype(args.dtype)
    folder = Path(tempfile.mkdtemp())
    path = folder / "t.safetensors"
    rng = np.random.default_rng(0)
    save_safetensors(path, {n: (np.ones(s, np.float32) if len(s) == 1 else
                                rng.standard_normal(s, dtype=np.float32) * np.float32(s[-1] ** -0.5))
                            for n, s in transformer_shapes(cfg).items()})
    h = args.size // 16
    x = mx.random.normal((1, h * h, cfg.in_channels), dtype=dtype)
    ctx = mx.random.normal((1, 512, cfg.context_in_dim), dtype=dtype)
    inputs = (x, mx.array(prc_img(h, h)), mx.array([0.5]), ctx, mx.array(prc_txt(512)))
    mx.eval(inputs)

    w = memory.component_weights("transformer", transformer_entries(WeightSource(path)),
                                 ("double_blocks", "single_blocks"), dtype.size)
    acts = memory.transformer_activations(cfg.hidden_size, cfg.num_heads, 512 + h * h, dtype.size,
                                          mx.default_device() == mx.gpu)
    phase = memory._fit("denoise", w, acts, 0, int(args.budget_fraction * w.total))

    def measure(streaming) -> tuple[float, int]:
        """(median s/step, MLX peak bytes); the model is freed on return."""
        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        model = load_transformer(cfg, WeightSource(path, pread=streaming is not None), dtype=dtype,
                                 streaming=streaming)
        # one warm-up: from RAM, it is also the one read of every block
        sec, _, _ = time_forward(lambda: model(*inputs), 1, args.repeats)
        return sec, mx.get_peak_memory() - base

    modes = (("resident", None), ("streamed, RAM", memory.Streaming(phase.resident_blocks, True)),
             ("streamed, disk", memory.Streaming(phase.resident_blocks, False)))
    rows = [(label, *measure(streaming)) for label, streaming in modes]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    info = run_info()
    print(f"{info['date']} | {info['machine']} | mlx {info['mlx']} | OpenBLAS {info['openblas']} | "
          f"{args.model} widths, {args.double}+{args.single} blocks, {args.size}px, {dtype}")
    print(f"weights {w.total / 1e6:.0f} MB, budget {args.budget_fraction:.0%} = "
          f"{args.budget_fraction * w.total / 1e6:.0f} MB, "
          f"plan: {phase.resident_blocks} of {phase.blocks} blocks resident, predicted device peak "
          f"{phase.device_peak / 1e6:.0f} MB; process max RSS {rss:.0f} MB")
    print("| mode | s/step | × resident | MLX peak MB |\n| --- | --- | --- | --- |")
    for label, sec, peak in rows:
        print(f"| {label} | {sec:.2f} | {sec / rows[0][1]:.2f} | {peak / 1e6:.0f} |")


if __name__ == "__main__":
    main()
