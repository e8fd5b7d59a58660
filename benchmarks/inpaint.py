"""Inpainting a small region: `--mask-crop` against the whole picture. A `--region`² px mask in a `--size`²
px picture, klein-4B widths at reduced depth, random weights written to a temporary model folder: everything
`generate` runs after the prompt's encoding (mask preparation, VAE encode, the steps with the picture as a
reference, decode, paste back), timed for both and compared.

Prints a markdown row: sizes, depth, steps, whole-picture and cropped seconds, their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from flux2_mlx import load_pipeline
from flux2_mlx.config import MODELS, transformer_shapes, vae_shapes
from flux2_mlx.pipeline import GenerationRequest
from flux2_mlx.weights import save_safetensors


def random_weights(shapes: dict, rng) -> dict[str, np.ndarray]:
    """N(0, 1/fan_in) matrices and convolutions, 1-D tensors (norm scales, batch-norm statistics) 1."""
    return {k: np.ones(s, np.float32) if len(s) == 1 else
            rng.standard_normal(s, np.float32) / np.float32(np.prod(s[1:]) ** 0.5)
            for k, s in shapes.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backend", default="torch", choices=["mlx", "torch"])
    p.add_argument("--size", type=int, default=1024, help="the picture: size x size px")
    p.add_argument("--region", type=int, default=256, help="the masked square: region x region px")
    p.add_argument("--crop", type=int, default=32, help="--mask-crop margin, px")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--double-blocks", type=int, default=1)
    p.add_argument("--single-blocks", type=int, default=1)
    args = p.parse_args()

    spec = MODELS["klein-4b"]
    t = dataclasses.replace(spec.transformer, depth=args.double_blocks,
                            depth_single_blocks=args.single_blocks)
    spec = dataclasses.replace(spec, transformer=t)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), np.uint8))
    mask = np.zeros((args.size, args.size), np.uint8)
    lo = (args.size - args.region) // 2 + 8  # off the 16-px grid, as a drawn mask is
    mask[lo:lo + args.region, lo:lo + args.region] = 255
    embeds = rng.standard_normal((1, 512, t.context_in_dim), np.float32)
    with tempfile.TemporaryDirectory() as folder:
        save_safetensors(Path(folder) / spec.transformer_file, random_weights(transformer_shapes(t), rng))
        save_safetensors(Path(folder) / "ae.safetensors", random_weights(vae_shapes(spec.vae), rng))
        pipe = load_pipeline(spec, model_path=folder, backend=args.backend, dtype="float32",
                             memory="resident")

        def run(**masking) -> tuple[float, tuple[int, int]]:
            start = time.perf_counter()
            inputs = pipe.prepare_inputs(image=picture, mask=mask, **masking)
            request = GenerationRequest(inputs, 0, prompt_embeds=embeds, strength=1.0, steps=args.steps)
            out = pipe.render(pipe.sample(request=request), request)
            assert out.size == picture.size
            return time.perf_counter() - start, (inputs.width, inputs.height)

        run(mask_crop=args.crop)  # warm-up: loads the transformer, first kernels
        whole, whole_size = run()
        cropped, crop_size = run(mask_crop=args.crop)
    where = f"{platform.system()} {platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    print(f"| {datetime.date.today()} | {where}, {args.backend} | {args.size}² picture, {args.region}² mask, "
          f"--mask-crop {args.crop} (generates {crop_size[0]}x{crop_size[1]}) | klein-4B widths "
          f"{t.depth}+{t.depth_single_blocks} | {args.steps} | {whole:.1f} s "
          f"({whole_size[0]}x{whole_size[1]}) | {cropped:.1f} s | {cropped / whole:.3f}x |")


if __name__ == "__main__":
    main()
