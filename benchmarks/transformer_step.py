"""Time one FLUX.2 transformer forward (one denoising step, no CFG) at real dimensions, random weights, on
the MLX backend, the torch backend and diffusers' Flux2Transformer2DModel side by side in one process.

Prints a markdown row per backend for BENCHMARKS.md. Linux CPU: FLUX2_OPENBLAS=1 preloads OpenBLAS for fast
f32 matmul in MLX; torch and diffusers get the same thread count (--threads).

Exact Q6_K / Q3_K / Q2_K (blocks decoded per layer) against the re-quantized layers they replaced, round-robin
in one process, e.g. on a GPU or a Mac:
    python benchmarks/transformer_step.py --gguf Q6_K --backend mlx --backend mlx-requant
    python benchmarks/transformer_step.py --gguf Q3_K --backend torch --backend torch-requant
"""

from __future__ import annotations  # noqa: I001 -- _common first (preloads OpenBLAS before mlx)

import argparse
import dataclasses
import os
import statistics
import time

# first: preloads OpenBLAS
from _common import OPENBLAS, gguf_entries, numpy_entries, random_entries, run_info, write_json

import mlx.core as mx
import numpy as np

from flux2_mlx.config import MODELS, TransformerConfig, transformer_shapes
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


# How the loaders ran these types before they were decoded exactly: re-quantized to MLX's affine layout
# (bits, group), min/max per group. The speed depends only on the layer kind and shapes.
REQUANT = {"Q6_K": (8, 64), "Q3_K": (4, 32), "Q2_K": (4, 32)}


def _requantized(model, make, replace_module) -> None:
    """Replace every KBlocksLinear of `model` by make(its dense weight, bits, group)."""
    for name, layer in list(model.named_modules()):
        if type(layer).__name__ == "KBlocksLinear":
            replace_module(model, name, make(layer.dense(), *REQUANT[layer.type.name]))


def _mlx_requant_layer(w, bits, group):
    import mlx.nn as nn

    layer = nn.QuantizedLinear(w.shape[1], w.shape[0], bias=False, group_size=group, bits=bits)
    layer.weight, layer.scales, layer.biases = mx.quantize(w, group_size=group, bits=bits)
    mx.eval(layer.parameters())
    return layer


def _torch_requant_layer(w, bits, group):
    import torch

    from flux2_mlx.torch_backend.quant_layers import QuantLinear

    g = w.unflatten(-1, (-1, group))
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / (2**bits - 1)
    codes = torch.round((g - lo[..., None]) / scale.clamp(min=1e-12)[..., None]).clamp(0, 2**bits - 1)
    codes = codes.to(torch.uint8).flatten(-2)
    packed = codes if bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)
    return QuantLinear(packed.contiguous(), scale, lo, bits, group)


def _mlx(cfg, dtype_name, inp, qtype=None, requant=False):
    from flux2_mlx import mlx_backend as be

    dtype = be.resolve_dtype(dtype_name)
    mx.random.seed(0)
    entries = gguf_entries(random_entries(transformer_shapes(cfg), dtype), qtype)
    model = be.load_transformer(cfg, entries, dtype=dtype)
    if requant:
        _requantized(model, _mlx_requant_layer, be.quant_layers.replace_module)
    a = {k: mx.array(v) for k, v in inp.items()}
    x, ctx = a["x"].astype(dtype), a["ctx"].astype(dtype)
    g = a["g"] if cfg.use_guidance_embed else None
    return (lambda: model(x, a["x_ids"], a["t"], ctx, a["ctx_ids"], g)), mx.eval, \
        lambda out: bool(mx.isfinite(out).all()), f"mlx {mx.__version__}"


def _torch_common(threads):
    import torch

    torch.set_num_threads(threads)
    sync = (lambda out: torch.cuda.synchronize()) if torch.cuda.is_available() else (lambda out: None)
    return torch, sync, lambda out: bool(torch.isfinite(out).all())


def _torch(cfg, dtype_name, inp, threads, compile=False, qtype=None, requant=False):
    from flux2_mlx import torch_backend as be

    torch, sync, finite = _torch_common(threads)
    dtype = be.resolve_dtype(dtype_name)
    model = be.load_transformer(cfg, gguf_entries(numpy_entries(transformer_shapes(cfg), dtype_name), qtype),
                                dtype=dtype, compile=compile)
    if requant:
        _requantized(model, _torch_requant_layer, be.quant_layers.replace_module)
    a = {k: be.from_numpy(v) for k, v in inp.items()}
    x, ctx = a["x"].to(dtype), a["ctx"].to(dtype)
    g = a["g"] if cfg.use_guidance_embed else None

    def forward():
        with torch.inference_mode():
            return model(x, a["x_ids"], a["t"], ctx, a["ctx_ids"], g)

    return forward, sync, finite, f"torch {torch.__version__}"


def _diffusers(cfg, dtype_name, inp, threads):
    import diffusers
    from diffusers import Flux2Transformer2DModel

    torch, sync, finite = _torch_common(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    with torch.device(device):
        model = Flux2Transformer2DModel(
            in_channels=cfg.in_channels, num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
            attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.context_in_dim, mlp_ratio=cfg.mlp_ratio,
            axes_dims_rope=tuple(cfg.axes_dim), rope_theta=cfg.theta,
            guidance_embeds=cfg.use_guidance_embed).to(dtype).eval()
    a = {k: torch.from_numpy(v).to(device) for k, v in inp.items()}
    kw = dict(hidden_states=a["x"].to(dtype), encoder_hidden_states=a["ctx"].to(dtype),
              timestep=a["t"].to(dtype), img_ids=a["x_ids"][0].long(), txt_ids=a["ctx_ids"][0].long(),
              guidance=a["g"].to(dtype) if cfg.use_guidance_embed else None, return_dict=False)

    def forward():
        with torch.inference_mode():
            return model(**kw)[0]

    return forward, sync, finite, f"diffusers {diffusers.__version__}, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", action="append",
                   choices=["mlx", "mlx-requant", "torch", "torch-requant", "torch-compile", "diffusers"],
                   help="repeat to run several side by side (default: mlx); torch-compile: the torch backend "
                        "with --compile (its warm-up run compiles); mlx-requant / torch-requant: with --gguf "
                        "Q6_K / Q3_K / Q2_K, the layers re-quantized to 8-bit g64 / 4-bit g32 affine, as the "
                        "loaders ran these types before they were decoded exactly")
    p.add_argument("--model", default="klein-4b", choices=["dev", "klein-4b", "klein-9b"])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--double-blocks", type=int, default=None, help="default: the model's full depth")
    p.add_argument("--single-blocks", type=int, default=None, help="default: the model's full depth")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bf16 on a GPU, float32 on CPU")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and diffusers CPU threads")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gguf", default=None, metavar="TYPE",
                   choices=["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "Q3_K", "Q2_K"],
                   help="mlx and torch: the blocks' weights stored as this ggml type, as in a converted GGUF")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args()
    if args.width % 16 or args.height % 16:
        p.error("--width and --height must be multiples of 16")

    full = MODELS[args.model].transformer
    d = full.depth if args.double_blocks is None else args.double_blocks
    s = full.depth_single_blocks if args.single_blocks is None else args.single_blocks
    cfg = dataclasses.replace(full, depth=d, depth_single_blocks=s)
    h, w, n_txt = args.height // 16, args.width // 16, args.text_tokens
    rng = np.random.default_rng(1)
    inp = dict(x=rng.standard_normal((1, h * w, cfg.in_channels), np.float32),
               ctx=rng.standard_normal((1, n_txt, cfg.context_in_dim), np.float32),
               x_ids=prc_img(h, w), ctx_ids=prc_txt(n_txt), t=np.array([0.5], np.float32),
               g=np.array([4.0], np.float32))
    print(f"OpenBLAS preload: {OPENBLAS}; threads for torch/diffusers: {args.threads}")
    flops, flops_full = forward_flops(cfg, h * w, n_txt), forward_flops(full, h * w, n_txt)
    built = []
    for name in args.backend or ["mlx"]:
        gpu = mx.default_device() == mx.gpu
        dtype_name = args.dtype or ("bfloat16" if gpu and name.startswith("mlx") else "float32")
        if not name.startswith("mlx"):
            import torch

            dtype_name = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
        t0 = time.perf_counter()
        q = args.gguf
        make = {"mlx": lambda: _mlx(cfg, dtype_name, inp, q),
                "mlx-requant": lambda: _mlx(cfg, dtype_name, inp, q, requant=True),
                "torch": lambda: _torch(cfg, dtype_name, inp, args.threads, qtype=q),
                "torch-requant": lambda: _torch(cfg, dtype_name, inp, args.threads, qtype=q, requant=True),
                "torch-compile": lambda: _torch(cfg, dtype_name, inp, args.threads, compile=True, qtype=q),
                "diffusers": lambda: _diffusers(cfg, dtype_name, inp, args.threads)}[name]
        built.append((name, dtype_name, *make()))
        print(f"{name}: built {args.model} {d}+{s} blocks in {dtype_name}: {time.perf_counter() - t0:.1f} s")
    # Round-robin: every round times each backend once, so a machine that drifts (turbo, a neighbour's load)
    # shifts all of them alike and the ratios between them hold.
    timed = {name: [] for name, *_ in built}
    for i in range(args.warmup + args.repeats):
        for name, _, forward, evaluate, _, _ in built:
            start = time.perf_counter()
            evaluate(forward())
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                timed[name].append(elapsed)
            print(f"{name} {'warmup' if i < args.warmup else 'run'} {i + 1}: {elapsed:.2f} s")
    results = []
    for name, dtype_name, forward, evaluate, finite, versions in built:
        sec, times = statistics.median(timed[name]), timed[name]
        results.append({**run_info(), "backend": name, "versions": versions, "model": args.model,
                        "double_blocks": d, "single_blocks": s, "full_double_blocks": full.depth,
                        "full_single_blocks": full.depth_single_blocks, "width": args.width,
                        "height": args.height, "text_tokens": n_txt, "dtype": dtype_name,
                        "threads": args.threads, "gguf": None if name == "diffusers" else args.gguf,
                        "seconds_per_step": sec, "times": times,
                        "tflop": flops / 1e12, "tflops_per_s": flops / sec / 1e12,
                        "extrapolated_full_seconds_per_step": sec * flops_full / flops,
                        "output_finite": finite(forward())})
    del built
    for res in results:
        print(f"| {res['date']} | {res['machine']} | {res['backend']} ({res['versions']}) | {args.model} | "
              f"{d}+{s} of {full.depth}+{full.depth_single_blocks} | {args.width}x{args.height} | "
              f"{res['dtype']}{' + ' + res['gguf'] + ' blocks' if res['gguf'] else ''} | "
              f"{res['seconds_per_step']:.2f} | {res['tflops_per_s']:.3g} | "
              f"{res['extrapolated_full_seconds_per_step']:.1f} |")
    by = {res["backend"]: res for res in results}
    for ours in ("torch", "torch-compile"):
        if ours in by and "diffusers" in by:
            ratios = [a / b for a, b in zip(by[ours]["times"], by["diffusers"]["times"])]
            print(f"{ours} / diffusers: "
                  f"{by[ours]['seconds_per_step'] / by['diffusers']['seconds_per_step']:.3f} "
                  f"(per round: {', '.join(f'{r:.3f}' for r in ratios)})")
    write_json(args.json, results if len(results) > 1 else results[0])


if __name__ == "__main__":
    main()
