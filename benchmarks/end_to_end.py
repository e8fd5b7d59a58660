"""Time one whole image on a backend at real dimensions, random weights: the prompt's encoding (512 tokens),
`--steps` transformer steps (no CFG) and the VAE decode, each timed, as `flux2 generate` runs them resident.

No files are read: each component is built from random weights on the device, so the numbers are the
compute alone (load time is measured by benchmarks/gguf_load.py). Meant for a GPU: `--backend torch` on
CUDA (bf16), or `--backend mlx` on Metal; on a CPU use `--double-blocks/--single-blocks/--layers` to cut
the depth. Prints a markdown row for BENCHMARKS.md.
"""

from __future__ import annotations  # noqa: I001 -- _common first (preloads OpenBLAS before mlx)

import argparse
import dataclasses
import importlib
import time

from _common import run_info, write_json
from transformer_step import _numpy_entries

import numpy as np

from flux2_mlx import sampling
from flux2_mlx.config import MODELS, text_encoder_shapes, transformer_shapes, vae_shapes
from flux2_mlx.entries import Entry
from flux2_mlx.weights import F8_E4M3, FP8Blocks


def _fp8_entries(entries: dict[str, Entry]) -> dict[str, Entry]:
    """The decoder layers' matrices as Qwen/Qwen3-*-FP8 stores them: e4m3 codes (random bytes, NaN left
    out) and one float32 scale per 128 × 128 block."""
    rng = np.random.default_rng(1)

    def fp8(shape):
        sign = rng.integers(0, 2, shape, np.uint8) << 7
        codes = (rng.integers(0, 0x7F, shape, np.uint8) | sign).view(F8_E4M3)
        blocks = (-(-shape[0] // 128), -(-shape[1] // 128))
        return FP8Blocks(codes, np.full(blocks, shape[1] ** -0.5 / 64, np.float32), (128, 128))

    return {k: Entry(e.shape, lambda s=e.shape: fp8(s), "F8_E4M3") if ".layers." in k and len(e.shape) == 2
            else e for k, e in entries.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backend", default="torch", choices=["mlx", "torch"])
    p.add_argument("--device", default=None)
    p.add_argument("--model", default="klein-4b", choices=list(MODELS))
    p.add_argument("--size", type=int, default=1024, help="square image side in pixels (a multiple of 16)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--double-blocks", type=int, default=None)
    p.add_argument("--single-blocks", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="text-encoder layers (default: the deepest used)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true",
                   help="torch: compile the transformer blocks (the untimed warm-up image compiles)")
    p.add_argument("--fp8-encoder", action="store_true",
                   help="text-encoder Linears stored as FP8 in 128 x 128 blocks (decoded per layer on torch)")
    p.add_argument("--fp8-matmul", action="store_true",
                   help="torch: ... and multiplied in FP8, activations quantized too (implies --fp8-encoder)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    be = importlib.import_module(f"flux2_mlx.{args.backend}_backend")
    device = be.use_device(args.device)
    dtype = be.resolve_dtype(args.dtype)
    name = next(n for n in ("bfloat16", "float16", "float32") if be.resolve_dtype(n) == dtype)
    spec = MODELS[args.model]
    t = dataclasses.replace(spec.transformer, depth=args.double_blocks or spec.transformer.depth,
                            depth_single_blocks=args.single_blocks or spec.transformer.depth_single_blocks)
    layers = args.layers or max(spec.text_encoder.output_layers)
    te = dataclasses.replace(spec.text_encoder, output_layers=tuple(min(k, layers) for k in
                                                                       spec.text_encoder.output_layers))
    t0 = time.perf_counter()
    transformer = be.load_transformer(t, _numpy_entries(transformer_shapes(t), name), dtype=dtype,
                                      compile=args.compile)
    encoder_entries = _numpy_entries(text_encoder_shapes(te), name)
    fp8 = args.fp8_encoder or args.fp8_matmul
    encoder_entries = _fp8_entries(encoder_entries) if fp8 else encoder_entries
    encoder = be.load_text_encoder(te, encoder_entries, dtype=dtype, fp8_matmul=args.fp8_matmul)
    vae = be.load_vae(spec.vae, _numpy_entries(vae_shapes(spec.vae), "float32"),
                      dtype=be.resolve_dtype("float32"))
    print(f"{args.backend} on {device}: built {args.model} ({t.depth}+{t.depth_single_blocks} blocks, "
          f"{layers} encoder layers) in {name}: {time.perf_counter() - t0:.1f} s")

    h = w = args.size // 16
    ids = np.zeros((1, 512), np.int32)
    ids[0, :32] = np.arange(1, 33)
    mask = (ids > 0).astype(np.int32)
    g = be.from_numpy(np.full((1,), spec.default_guidance, np.float32)) if t.use_guidance_embed else None
    schedule = sampling.get_schedule(args.steps, h * w)

    def run() -> dict:
        times = {}
        start = time.perf_counter()
        ctx = encoder(be.from_numpy(ids), be.from_numpy(mask))
        be.evaluate(ctx)
        times["encode"] = time.perf_counter() - start
        ctx = ctx.astype(dtype) if args.backend == "mlx" else ctx.to(dtype)
        ctx_ids, x_ids = be.from_numpy(sampling.prc_txt(512)), be.from_numpy(sampling.prc_img(h, w))
        x = be.from_numpy(sampling.make_noise(0, h, w, t.in_channels))
        step = time.perf_counter()
        for t_now, t_next in zip(schedule[:-1], schedule[1:]):
            v = transformer(x, x_ids, be.from_numpy(np.full((1,), t_now, np.float32)), ctx, ctx_ids, g)
            x = x + (t_next - t_now) * v
            be.evaluate(x)
        times["denoise"] = time.perf_counter() - step
        step = time.perf_counter()
        image = vae.decode(be.from_numpy(be.to_numpy(x).reshape(1, h, w, -1)))
        be.evaluate(image)
        times["decode"] = time.perf_counter() - step
        times["total"] = time.perf_counter() - start
        return times

    run()  # warm-up: kernels, allocator, caches
    runs = [run() for _ in range(args.repeats)]
    best = {k: min(r[k] for r in runs) for k in runs[0]}
    res = {**run_info(), "backend": args.backend, "device": device, "model": args.model, "size": args.size,
           "steps": args.steps, "dtype": name, "blocks": [t.depth, t.depth_single_blocks],
           "encoder_layers": layers, "fp8_encoder": fp8, "fp8_matmul": args.fp8_matmul, "best": best,
           "runs": runs, "peak_memory_gb": be.peak_memory() / 1e9}
    print(" ".join(f"{k} {v:.3f} s" for k, v in best.items()) + f"; peak {res['peak_memory_gb']:.1f} GB")
    kind = f"{args.model} {t.depth}+{t.depth_single_blocks}"
    kind += ", FP8 encoder" + (" in FP8 matmuls" if args.fp8_matmul else "") if fp8 else ""
    print(f"| {res['date']} | {device} | {args.backend} | {kind} | "
          f"{args.size}² | {args.steps} | {name} | {best['encode']:.3f} | "
          f"{best['denoise'] / args.steps:.3f} | {best['decode']:.3f} | {best['total']:.3f} |")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
