"""Quantization throughput: MB/s of float32 source for our K-quants (flux2_mlx.quant.kquants, numba) on one
thread and on --threads threads (row ranges, as `flux2 convert --jobs` splits them), gguf-py's legacy
quantizers and, with --c-ref, llama.cpp's C reference (`quantize_row_*_ref` compiled by
tests/test_kquants.py, fetched from PyPI once).

Prints a markdown table for BENCHMARKS.md; also the relative RMS error of each type on the data.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
from _common import best_of
from gguf import GGMLQuantizationType as T

from flux2_mlx.quant import kquants

OURS = {"Q2_K": kquants.quantize_q2_k, "Q3_K": kquants.quantize_q3_k, "Q4_K": kquants.quantize_q4_k,
        "Q5_K": kquants.quantize_q5_k, "Q6_K": kquants.quantize_q6_k}
GGUF_PY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
ROOT = Path(__file__).resolve().parents[1]
GGUF_VERSION = importlib.metadata.version("gguf")


def reference_helpers():
    """build_reference / run_reference from the test module (one copy of the C harness)."""
    spec = importlib.util.spec_from_file_location("test_kquants", ROOT / "tests" / "test_kquants.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_reference, mod.run_reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--c-ref", action="store_true",
                    help="also time llama.cpp's C reference (needs gcc, PyPI)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core {platform.machine()} {platform.system()}")
    args = ap.parse_args()

    x = (args.std * np.random.default_rng(0).standard_normal((args.rows, args.cols))).astype(np.float32)
    mb = x.nbytes / 1e6
    exe = None
    if args.c_ref:
        build_reference, run_reference = reference_helpers()
        exe = build_reference(ROOT / ".pytest_cache" / "d" / "kquants-c-reference")

    rows = []
    parts = np.array_split(x, args.threads)
    for name, fn in OURS.items():
        q = fn(x)
        s = best_of(lambda fn=fn: fn(x), args.repeats)
        with ThreadPoolExecutor(args.threads) as pool:
            s_threads = best_of(lambda fn=fn: list(pool.map(fn, parts)), args.repeats)
        c_cell, same = "–", "–"
        if exe:
            c_raw, c_s = run_reference(exe, name, x, repeats=args.repeats)
            c_cell = f"{mb / c_s:.0f}"
            same = "yes" if np.array_equal(c_raw, q) else "NO"
        err = np.sqrt(np.mean((gguf.quants.dequantize(q, T[name]) - x) ** 2) / np.mean(x ** 2))
        rows.append((name, "numba (kquants.py)", s, mb / s, f"{mb / s_threads:.0f}", c_cell, same, err))
    for name in GGUF_PY:
        q = gguf.quants.quantize(x, T[name])
        s = best_of(lambda name=name: gguf.quants.quantize(x, T[name]), args.repeats)
        err = np.sqrt(np.mean((gguf.quants.dequantize(q, T[name]) - x) ** 2) / np.mean(x ** 2))
        rows.append((name, "gguf-py", s, mb / s, "–", "–", "–", err))

    print(f"{datetime.date.today()} | {args.machine} | numpy {np.__version__}, gguf {GGUF_VERSION} | "
          f"{args.rows}x{args.cols} float32 N(0, {args.std}) = {mb:.1f} MB | best of {args.repeats}")
    print()
    print(f"| type | implementation | s | MB/s fp32 in | {args.threads} threads MB/s | C reference MB/s | "
          "bytes = C | relRMS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, impl, s, rate, t_cell, c_cell, same, err in rows:
        print(f"| {name} | {impl} | {s:.2f} | {rate:.0f} | {t_cell} | {c_cell} | {same} | {err:.4f} |")


if __name__ == "__main__":
    main()
