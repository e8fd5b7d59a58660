"""GPU check of the torch backend's FP8 / NVFP4 / MXFP8 layers: which matmul each format takes, and a step.

For each format, random weights of klein-4b's shapes (the linear layers of one double block and one single
block, quantized on the device) become layers as the loader builds them (quant_layers.quantized_layer). It
prints the device, what fp8_matmul_kind and nvfp4_matmul_kind found there, and per format: the path each
layer takes (`fp8 _scaled_mm` on CUDA 8.9+, `nvfp4 native` on CUDA 10.x / 12.x, else `decode per layer`),
the median time of the ten layers' forwards at --tokens beside the same with bf16 weights, and the output's
relative error against the bf16 matmul of the decoded weight (the activations' rounding where they are
quantized too: some 1e-2 for FP8, 1e-1 for NVFP4; 0 where the weight is decoded). The activation scales are
calibrated as a file's `input_scale` would be (amax / 448, amax / (448 · 6)). MXFP8 holds unit block scales:
its time is the decode's, its values are not a calibrated file's.

Not yet run on a GPU (none was lent while it was written); on a CPU it runs, every layer decoding:
  python benchmarks/torch_scaled_matmul.py                          # CUDA when present
  python benchmarks/torch_scaled_matmul.py --tokens 1024 --repeats 5
  python benchmarks/torch_scaled_matmul.py --shrink 8 --tokens 64   # a quick look on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from flux2_mlx.config import KLEIN_4B, transformer_shapes
from flux2_mlx.quant.scaled import FPQuant, ScaledFP8
from flux2_mlx.torch_backend import quant_layers as ql

FORMATS = ("fp8", "nvfp4", "mxfp8")


def block_shapes(shrink: int) -> list[tuple[int, int]]:
    s = transformer_shapes(KLEIN_4B)
    return [(n // shrink, k // shrink) for name, (n, k) in ((a, b) for a, b in s.items() if len(b) == 2)
            if name.startswith(("double_blocks.0.", "single_blocks.0."))]


def stored(fmt: str, w: torch.Tensor, x_amax: torch.Tensor):
    """The placed form the loader hands quantized_layer for a `fmt` layer of weight w (n, k)."""
    n, k = w.shape
    if fmt == "fp8":
        scale = w.abs().amax().float() / ql.E4M3_MAX
        codes = (w.float() / scale).clamp(-ql.E4M3_MAX, ql.E4M3_MAX).to(torch.float8_e4m3fn)
        return ScaledFP8(codes, scale, input_scale=x_amax / ql.E4M3_MAX)
    if fmt == "nvfp4":
        scale = w.abs().amax().float() / (ql.E4M3_MAX * ql.E2M1_MAX)
        codes, tiles = ql.quantize_nvfp4(w, scale)
        return FPQuant(codes, ql.unswizzle_scales(tiles, n, k // 16), scale, "nvfp4",
                       input_scale=x_amax / (ql.E4M3_MAX * ql.E2M1_MAX))
    unit = torch.full((n, k // 32), 127, dtype=torch.uint8, device=w.device)  # E8M0 2^0
    return FPQuant(w.to(torch.float8_e4m3fn), unit, torch.ones((), device=w.device), "mxfp8")


def path(layer: nn.Module) -> str:
    return ("fp8 _scaled_mm" if layer.fp8_matmul else "nvfp4 native" if layer.nvfp4_matmul
            else "decode per layer")


def median_s(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4608, help="rows of the activations (1024² + 512 text)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--shrink", type=int, default=1, help="divide both sides of every weight by this")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    print(f"{name} (compute capability {cap}), torch {torch.__version__}: fp8_matmul_kind "
          f"{ql.fp8_matmul_kind(dev, dtype)} (the per-tensor FP8 layers use it on CUDA only), "
          f"nvfp4_matmul_kind {ql.nvfp4_matmul_kind(dev, dtype)}")
    g = torch.Generator(dev).manual_seed(0)
    total = {f: 0.0 for f in ("bf16", *FORMATS)}
    for n, k in block_shapes(args.shrink):
        w = (torch.randn(n, k, generator=g, device=dev) / k ** .5).to(dtype)
        x = torch.randn(args.tokens, k, generator=g, device=dev).to(dtype)
        total["bf16"] += median_s(lambda: F.linear(x, w), args.repeats, sync)
        for fmt in FORMATS:
            layer = ql.quantized_layer(nn.Linear(k, n, bias=False, device="meta"),
                                       stored(fmt, w, x.abs().amax()), dtype)
            total[fmt] += median_s(lambda m=layer: m(x), args.repeats, sync)
            decoded = F.linear(x, layer.dense()).float()
            err = (layer(x).float() - decoded).norm() / decoded.norm()
            print(f"  {n:>6} × {k:<6} {fmt:>5}: {path(layer):<17} relative error {float(err):.2e}")
    print(f"one step of the ten layers at {args.tokens} tokens, median of {args.repeats}:")
    for fmt, s in total.items():
        print(f"  {fmt:>5}: {s * 1e3:9.2f} ms ({s / total['bf16']:.2f}× bf16)")


if __name__ == "__main__":
    main()
