"""`flux2 convert --type fp8 / nvfp4 / mxfp8` (ComfyUI safetensors) end to end: seconds and MB/s of float32
source for a klein-4b-sized transformer cut to 1 double + 2 single blocks (the real tensor shapes), with
1 and --threads jobs, and the time extrapolated to the whole klein-4b tensor set by source bytes. The
output is checked to be byte-identical for every jobs value. --source bfloat16 writes the source in bf16,
as BFL's checkpoints are, --source nvfp4 converts it to NVFP4 first (an already-quantized source, decoded
exactly; MB/s still counts 4 bytes a value).

Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import filecmp
import math
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from flux2_mlx.config import get_spec, transformer_shapes
from flux2_mlx.convert import convert
from flux2_mlx.weights import f32_to_bf16, save_safetensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--types", default="fp8,nvfp4,mxfp8")
    ap.add_argument("--source", default="float32", choices=["float32", "bfloat16", "nvfp4"])
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core {platform.machine()} {platform.system()}")
    args = ap.parse_args()

    full = get_spec("klein-4b").transformer
    cfg = dataclasses.replace(full, depth=1, depth_single_blocks=2)
    shapes = transformer_shapes(cfg)
    rng = np.random.default_rng(0)
    tensors = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    mb = sum(a.nbytes for a in tensors.values()) / 1e6
    full_mb = sum(4 * math.prod(s) for s in transformer_shapes(full).values()) / 1e6
    print(f"{datetime.date.today()}, {args.machine}, numpy {np.__version__}; klein-4b shapes, 1 double + 2 "
          f"single blocks: {mb:.0f} MB float32 (the whole klein-4b: {full_mb:.0f} MB), source in "
          f"{args.source}\n")
    print("| type | jobs | s | MB/s fp32 in | output MB | whole klein-4b, s (extrapolated) |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src.safetensors"
        save_safetensors(src, {k: f32_to_bf16(a) for k, a in tensors.items()} if args.source == "bfloat16"
                         else tensors)
        del tensors
        if args.source == "nvfp4":
            src = convert(src, Path(d) / "nvfp4-src.safetensors", "nvfp4", progress=False)
            warnings.simplefilter("ignore")  # the re-quantization warning, once per conversion
        for t in args.types.split(","):
            outs = []
            for jobs in sorted({1, args.threads}):
                out = Path(d) / f"{t}-{jobs}.safetensors"
                start = time.perf_counter()
                convert(src, out, t, progress=False, jobs=jobs)
                s = time.perf_counter() - start
                outs.append(out)
                print(f"| {t} | {jobs} | {s:.2f} | {mb / s:.0f} | {out.stat().st_size / 1e6:.0f} | "
                      f"{s * full_mb / mb:.0f} |")
            assert all(filecmp.cmp(outs[0], o, shallow=False) for o in outs[1:]), "jobs changed the bytes"
            for o in outs:
                o.unlink()


if __name__ == "__main__":
    main()
