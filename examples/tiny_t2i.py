"""Text-to-image through the Python API on a tiny random FLUX.2 model written in the real BFL layout.

Runs anywhere in seconds with no download: it proves the install end to end (weights on disk →
load_pipeline → generate → PNG). The picture is noise-like, since the weights are random.
Usage: python examples/tiny_t2i.py [OUT.png]
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

from flux2_mlx import load_pipeline
from flux2_mlx.config import tiny_spec, transformer_shapes, vae_shapes
from flux2_mlx.weights import f32_to_bf16, save_safetensors


def random_tensors(shapes: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        a = rng.standard_normal(shape, dtype=np.float32)
        if len(shape) == 1:  # norm scales, biases and BN statistics: near 1, positive variances
            a = 1 + 0.1 * np.abs(a)
        out[name] = f32_to_bf16(a / np.sqrt(np.prod(shape[1:])))
    return out


def main(out: str = "tiny.png") -> None:
    spec = tiny_spec("klein-4b")
    with tempfile.TemporaryDirectory() as d:
        # The same file names as the FLUX.2-klein-4B and FLUX.2-dev repos, bf16 like the releases.
        save_safetensors(Path(d) / spec.transformer_file,
                         random_tensors(transformer_shapes(spec.transformer), 0))
        save_safetensors(Path(d) / spec.vae_file, random_tensors(vae_shapes(spec.vae), 1))
        pipe = load_pipeline(spec, model_path=d)
        embeds = np.random.default_rng(2).standard_normal((1, 512, spec.transformer.context_in_dim),
                                                          np.float32)
        image = pipe.generate(prompt_embeds=embeds, width=128, height=96, seed=7)
    image.save(out)
    print(f"wrote {out} ({image.width}x{image.height}, {pipe.spec.name}, seed {image.info['seed']}, "
          f"{image.info['steps']} steps)")


if __name__ == "__main__":
    main(*sys.argv[1:])
