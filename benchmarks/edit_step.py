"""Editing cost per denoising step: 0, 1 and 3 reference images on the standard path, and the klein KV
path (first step extracts the references' K/V, later steps reuse them), klein-9B widths, random weights.

Prints markdown rows for BENCHMARKS.md. Linux CPU: FLUX2_OPENBLAS=1 preloads OpenBLAS for fast f32 matmul.
"""

from __future__ import annotations  # noqa: I001 -- _common first (preloads OpenBLAS before mlx)

import argparse
import dataclasses

from _common import OPENBLAS, random_entries, run_info, time_forward, write_json  # first: preloads OpenBLAS

import mlx.core as mx

from flux2_mlx.config import MODELS, transformer_shapes
from flux2_mlx.mlx_backend import load_transformer, resolve_dtype
from flux2_mlx.sampling import prc_img, prc_refs, prc_txt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=512, help="output and each reference: size x size px")
    p.add_argument("--double-blocks", type=int, default=None, help="default: the model's full depth")
    p.add_argument("--single-blocks", type=int, default=None, help="default: the model's full depth")
    p.add_argument("--refs", default="0,1,3", help="reference counts to time")
    p.add_argument("--steps", type=int, default=4, help="steps of one generation (klein: 4)")
    p.add_argument("--dtype", default=None, help="default: bf16 on GPU, float32 on CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    full = MODELS["klein-9b-kv"].transformer
    d = full.depth if args.double_blocks is None else args.double_blocks
    s = full.depth_single_blocks if args.single_blocks is None else args.single_blocks
    cfg = dataclasses.replace(full, depth=d, depth_single_blocks=s)
    dtype = resolve_dtype(args.dtype)
    dtype_name = str(dtype).rsplit(".", 1)[-1]
    print(f"OpenBLAS preload: {OPENBLAS}; device {mx.default_device()}; mlx {mx.__version__}")
    mx.random.seed(0)
    model = load_transformer(cfg, random_entries(transformer_shapes(cfg), dtype), dtype=dtype)

    n = args.size // 16
    x = mx.random.normal((1, n * n, cfg.in_channels), dtype=dtype)
    ctx = mx.random.normal((1, 512, cfg.context_in_dim), dtype=dtype)
    x_ids, ctx_ids, t = mx.array(prc_img(n, n)), mx.array(prc_txt(512)), mx.array([0.5], dtype=dtype)
    rows, res = [], {**run_info(), "model": "klein-9b-kv widths", "double_blocks": d, "single_blocks": s,
                     "size": args.size, "dtype": dtype_name, "steps": args.steps, "results": []}

    def timed(fn):
        return time_forward(fn, 1, args.repeats)[0]

    for k in [int(c) for c in args.refs.split(",")]:
        ref = mx.random.normal((1, k * n * n, cfg.in_channels), dtype=dtype) if k else None
        ref_ids = mx.array(prc_refs([(n, n)] * k)) if k else None
        kw = dict(ref=ref, ref_ids=ref_ids) if k else {}
        standard = timed(lambda: model(x, x_ids, t, ctx, ctx_ids, **kw))
        row = {"refs": k, "standard_s": standard, "standard_generation_s": args.steps * standard}
        if k:
            extract = timed(lambda: model(x, x_ids, t, ctx, ctx_ids, kv_cache=[], **kw))
            cache = []
            mx.eval(model(x, x_ids, t, ctx, ctx_ids, kv_cache=cache, **kw), cache)
            cached = timed(lambda: model(x, x_ids, t, ctx, ctx_ids, kv_cache=cache))
            gen = extract + (args.steps - 1) * cached
            row.update(kv_extract_s=extract, kv_cached_s=cached, kv_generation_s=gen,
                       kv_speedup=row["standard_generation_s"] / gen)
        res["results"].append(row)
        kv = (f"{row['kv_extract_s']:.2f} | {row['kv_cached_s']:.2f} | {row['kv_generation_s']:.1f} | "
              f"{row['kv_speedup']:.2f}x" if k else "– | – | – | –")
        rows.append(f"| {res['date']} | {res['machine']} | {d}+{s} | {args.size}² | {k} | {dtype_name} | "
                    f"{standard:.2f} | {row['standard_generation_s']:.1f} | {kv} |")
        print(rows[-1], flush=True)
    write_json(args.json, res)


if __name__ == "__main__":
    main()
