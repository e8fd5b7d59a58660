"""Time one FLUX.2 transformer forward (one denoising step, no CFG) at real dimensions, random weights.

Prints a markdown row for BENCHMARKS.md. Linux CPU: FLUX2_OPENBLAS=1 preloads OpenBLAS for fast f32 matmul.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from _common import OPENBLAS, random_entries, run_info, time_forward, write_json  # first: preloads OpenBLAS

import mlx.core as mx

from flux2_mlx.config import MODELS, TransformerConfig, transformer_shapes
from flux2_mlx.mlx_backend import load_transformer, resolve_dtype
from flux2_mlx.sampling import prc_img, prc_txt


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
    model = load_transformer(cfg, random_entries(transformer_shapes(cfg), dtype), dtype=dtype)
    print(f"built {args.model} {d}+{s} blocks in {dtype_name}: {time.perf_counter() - t0:.1f} s")

    x = mx.random.normal((1, h * w, cfg.in_channels), dtype=dtype)
    ctx = mx.random.normal((1, n_txt, cfg.context_in_dim), dtype=dtype)
    x_ids, ctx_ids = mx.array(prc_img(h, w)), mx.array(prc_txt(n_txt))
    t = mx.array([0.5], dtype=dtype)
    guidance = mx.array([4.0], dtype=dtype) if cfg.use_guidance_embed else None
    mx.eval(x, ctx, x_ids, ctx_ids, t)

    sec, times, finite = time_forward(lambda: model(x, x_ids, t, ctx, ctx_ids, guidance), args.warmup, args.repeats)
    flops, flops_full = forward_flops(cfg, h * w, n_txt), forward_flops(full, h * w, n_txt)
    res = {
        **run_info(), "model": args.model, "double_blocks": d, "single_blocks": s,
        "full_double_blocks": full.depth, "full_single_blocks": full.depth_single_blocks,
        "width": args.width, "height": args.height, "image_tokens": h * w, "text_tokens": n_txt,
        "dtype": dtype_name, "seconds_per_step": sec, "times": times, "tflop": flops / 1e12,
        "tflop_full": flops_full / 1e12, "tflops_per_s": flops / sec / 1e12,
        "extrapolated_full_seconds_per_step": sec * flops_full / flops,
        "peak_memory_gb": mx.get_peak_memory() / 1e9, "output_finite": finite,
    }
    print(f"{res['tflop']:.2f} TFLOP per step at {d}+{s} blocks, {res['tflop_full']:.2f} at full depth; "
          f"peak memory {res['peak_memory_gb']:.1f} GB; output finite: {finite}")
    print(f"| {res['date']} | {res['machine']} | {res['mlx']} | {args.model} | "
          f"{d}+{s} of {full.depth}+{full.depth_single_blocks} | {args.width}x{args.height} | {dtype_name} | "
          f"{sec:.2f} | {res['tflops_per_s']:.3g} | {res['extrapolated_full_seconds_per_step']:.1f} |")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
