"""Time one text-encoder forward (batch 1, 512 tokens) at real dimensions, random weights.

Qwen3-4B (klein 4B), Qwen3-8B (klein 9B) or Mistral-Small-3.2's text stack (dev), cut to `--layers` decoder
layers (default: the deepest output layer FLUX.2 needs, 27 / 27 / 30). Prints a markdown row for
BENCHMARKS.md. Linux CPU: FLUX2_OPENBLAS=1 preloads OpenBLAS for fast f32 matmul.
"""

from __future__ import annotations  # noqa: I001 -- _common first (preloads OpenBLAS before mlx)

import argparse
import dataclasses
import time

from _common import OPENBLAS, random_entries, run_info, time_forward, write_json  # first: preloads OpenBLAS

import mlx.core as mx

from flux2_mlx.config import MISTRAL_SMALL_3_2, QWEN3_4B, QWEN3_8B, TextEncoderConfig, text_encoder_shapes
from flux2_mlx.mlx_backend import load_text_encoder, resolve_dtype

ENCODERS = {"qwen3-4b": QWEN3_4B, "qwen3-8b": QWEN3_8B, "mistral": MISTRAL_SMALL_3_2}


def forward_flops(cfg: TextEncoderConfig, layers: int, L: int) -> float:
    """FLOPs of one batch-1 forward through `layers` decoder layers: 2·M·K·N per Linear (M = L tokens;
    q/o at heads·head_dim, k/v at kv_heads·head_dim), 4·L²·heads·head_dim per attention (QKᵀ and PV,
    counted as if not causal); embedding lookup, norms, RoPE and elementwise ops ignored."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    linears = 2 * L * (D * q + 2 * D * kv + q * D + 3 * D * F)
    attn = 4 * L * L * cfg.num_attention_heads * cfg.head_dim
    return float(layers * (linears + attn))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="qwen3-4b", choices=list(ENCODERS))
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers to build (default: the deepest output layer, 27 Qwen3 / 30 Mistral)")
    p.add_argument("--dtype", default=None,
                   help="bfloat16 | float16 | float32 (default: bf16 on GPU, float32 on CPU)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args()

    full = ENCODERS[args.model]
    needed = max(full.output_layers)
    n = needed if args.layers is None else args.layers
    if not 1 <= n <= full.num_hidden_layers:
        p.error(f"--layers must lie in 1..{full.num_hidden_layers}")
    # Same three output slots (so the output is 3·hidden wide), the deepest at layer n.
    cfg = dataclasses.replace(full, output_layers=tuple(min(k, n) for k in full.output_layers))
    dtype = resolve_dtype(args.dtype)
    dtype_name = str(dtype).rsplit(".", 1)[-1]
    L = args.tokens
    print(f"OpenBLAS preload: {OPENBLAS}; device {mx.default_device()}; mlx {mx.__version__}")

    mx.random.seed(0)
    t0 = time.perf_counter()
    weights = random_entries(text_encoder_shapes(cfg), dtype, embeddings=("embed_tokens.weight",))
    model = load_text_encoder(cfg, weights, dtype=dtype)
    print(f"built {args.model} {n} of {needed} needed layers in {dtype_name}: "
          f"{time.perf_counter() - t0:.1f} s")

    ids = mx.random.randint(0, cfg.vocab_size, (1, L))
    mask = mx.ones((1, L), dtype=mx.int32)  # cost does not depend on padding
    mx.eval(ids, mask)

    sec, times, finite = time_forward(lambda: model(ids, mask), args.warmup, args.repeats)
    flops, flops_needed = forward_flops(full, n, L), forward_flops(full, needed, L)
    res = {
        **run_info(), "model": args.model, "repo_id": full.repo_id, "layers": n,
        "needed_layers": needed, "total_layers": full.num_hidden_layers, "tokens": L, "dtype": dtype_name,
        "seconds_per_forward": sec, "times": times, "tflop": flops / 1e12,
        "tflop_needed": flops_needed / 1e12, "tflops_per_s": flops / sec / 1e12,
        "extrapolated_needed_seconds_per_forward": sec * flops_needed / flops,
        "peak_memory_gb": mx.get_peak_memory() / 1e9, "output_finite": finite,
    }
    print(f"{res['tflop']:.3f} TFLOP per forward at {n} layers, {res['tflop_needed']:.3f} at {needed}; "
          f"peak memory {res['peak_memory_gb']:.1f} GB; output finite: {finite}")
    print(f"| {res['date']} | {res['machine']} | {res['mlx']} | {args.model} | {n} of {needed} | {L} | "
          f"{dtype_name} | {sec:.2f} | {res['tflops_per_s']:.3g} | "
          f"{res['extrapolated_needed_seconds_per_forward']:.1f} |")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
