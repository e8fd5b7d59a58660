"""The FLUX.2 pipeline: find weights, load them on a backend chosen by name, sample, decode.

Imports only the numpy core; the backend comes through importlib, so torch never loads on the MLX
path and MLX never loads for `flux2 --help`.
"""

from __future__ import annotations

import importlib
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from . import sampling
from .config import ModelSpec, get_spec
from .weights import WeightsError, WeightSource

MAX_PIXELS = 2048 * 2048
BACKENDS = ("mlx",)


def check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        near = lambda v: f"{max(16, v // 16 * 16)}"  # noqa: E731
        raise ValueError(f"width and height must be positive multiples of 16, got {width}x{height} "
                         f"(try {near(width)}x{near(height)})")
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width}x{height} is {width * height / 2**20:.1f} MP; the limit is 4 MP "
                         f"(e.g. 2048x2048)")


def find_transformer(spec: ModelSpec, weights: str | Path) -> Path:
    """A BFL single file, a diffusers `transformer/` folder, or a repo root holding either."""
    p = Path(weights)
    if p.is_dir():
        for candidate in (p / "transformer", p / spec.transformer_file):
            if candidate.exists():
                return candidate
    if p.exists():
        return p
    raise WeightsError(f"{p}: no such file or folder; pass the transformer .safetensors file or the "
                       f"downloaded {spec.repo_id} folder")


def find_vae(spec: ModelSpec, weights: str | Path, vae: str | Path | None) -> Path:
    if vae is not None:
        if not Path(vae).exists():
            raise WeightsError(f"{vae}: no such file or folder")
        return Path(vae)
    p = Path(weights)
    root = p if p.is_dir() else p.parent
    for candidate in (root / "vae", root / spec.vae_file, root.parent / "vae"):
        if candidate.exists():
            return candidate
    raise WeightsError(f"no autoencoder found next to {p}; pass vae= the {spec.vae_file} of "
                       f"{spec.vae_repo_id} or a diffusers vae/ folder")


class Pipeline:
    """One loaded FLUX.2 model. Use `load_pipeline` to make one."""

    def __init__(self, spec: ModelSpec, backend, transformer, vae, dtype):
        self.spec, self.backend, self.transformer, self.vae, self.dtype = spec, backend, transformer, vae, dtype

    def _settings(self, steps, guidance):
        spec = self.spec
        steps = spec.default_steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return steps, float(spec.default_guidance if guidance is None else guidance)

    def _embeds(self, embeds, what: str) -> np.ndarray:
        a = np.asarray(embeds, dtype=np.float32)
        a = a[None] if a.ndim == 2 else a
        want = self.spec.transformer.context_in_dim
        if a.ndim != 3 or a.shape[0] != 1 or a.shape[-1] != want:
            raise ValueError(f"{what} must have shape (1, L, {want}) for {self.spec.name}, "
                             f"got {tuple(np.shape(embeds))}")
        return a

    def _denoise(self, prompt_embeds, negative_prompt_embeds, width, height, steps, guidance,
                 seed) -> Iterator:
        be, spec = self.backend, self.spec
        check_size(width, height)
        if spec.guidance_mode == "none" and guidance not in (None, 1.0):
            warnings.warn(f"{spec.name} is guidance-distilled without a guidance input; "
                          f"guidance={guidance} is ignored", stacklevel=4)
        steps, guidance = self._settings(steps, guidance)
        h, w = height // 16, width // 16
        ctx = self._embeds(prompt_embeds, "prompt_embeds")
        ctx_ids = be.from_numpy(sampling.prc_txt(ctx.shape[1]))
        x_ids = be.from_numpy(sampling.prc_img(h, w))
        g = be.from_numpy(np.full((1,), guidance, np.float32)) if spec.guidance_mode == "embedded" else None

        def velocity_for(context):
            context = be.from_numpy(context, self.dtype)

            def velocity(x, t):
                return self.transformer(x, x_ids, be.from_numpy(np.full((1,), t, np.float32)),
                                        context, ctx_ids, g)

            return velocity

        velocity = velocity_for(ctx)
        if spec.guidance_mode == "cfg" and guidance > 1.0:
            if negative_prompt_embeds is None:
                raise ValueError(f"{spec.name} uses classifier-free guidance: pass "
                                 f"negative_prompt_embeds (the empty prompt's embedding), or guidance=1")
            neg = self._embeds(negative_prompt_embeds, "negative_prompt_embeds")
            velocity = sampling.cfg_velocity(velocity, velocity_for(neg), guidance)
        # Latents stay float32 whatever the model dtype: the Euler sum loses detail in bf16.
        x = be.from_numpy(sampling.make_noise(seed, h, w, spec.latent_channels))
        for x in sampling.denoise(velocity, x, sampling.get_schedule(steps, h * w)):
            be.evaluate(x)
            yield x

    def iter_steps(self, *, prompt_embeds, negative_prompt_embeds=None, width=1024, height=1024,
                   steps=None, guidance=None, seed: int) -> Iterator[np.ndarray]:
        """Latent tokens (1, N, C) after each step, for previews or custom decoding."""
        for x in self._denoise(prompt_embeds, negative_prompt_embeds, width, height, steps, guidance, seed):
            yield self.backend.to_numpy(x)

    def sample(self, *, prompt_embeds, negative_prompt_embeds=None, width=1024, height=1024,
               steps=None, guidance=None, seed: int) -> np.ndarray:
        """Final latent tokens (1, (H/16)·(W/16), C), float32."""
        x = None
        for x in self._denoise(prompt_embeds, negative_prompt_embeds, width, height, steps, guidance, seed):
            pass
        return self.backend.to_numpy(x)

    def decode(self, latents: np.ndarray, width: int, height: int) -> Image.Image:
        """Latent tokens → RGB image; uint8 by rounding (diffusers), not truncation (BFL)."""
        be = self.backend
        z = be.from_numpy(np.asarray(latents, np.float32).reshape(1, height // 16, width // 16, -1))
        img = be.to_numpy(self.vae.decode(z))[0]
        if not np.isfinite(img).all():
            warnings.warn("the decoded image has NaN or infinite values (an overflow in the model); "
                          "try dtype='float32'", stacklevel=2)
            img = np.nan_to_num(img)
        return Image.fromarray(np.round((np.clip(img, -1, 1) + 1) * 127.5).astype(np.uint8))

    def generate(self, *, prompt_embeds, negative_prompt_embeds=None, width=1024, height=1024,
                 steps=None, guidance=None, seed=None) -> Image.Image:
        """Text-to-image from precomputed prompt embeddings (1, L, context_in_dim).

        `seed=None` draws one; it is returned in `image.info["seed"]` with the other settings.
        """
        seed = secrets.randbelow(2**31) if seed is None else int(seed)
        latents = self.sample(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                              width=width, height=height, steps=steps, guidance=guidance, seed=seed)
        image = self.decode(latents, width, height)
        steps, guidance = self._settings(steps, guidance)
        image.info.update(model=self.spec.name, seed=seed, steps=steps, guidance=guidance)
        return image


def load_pipeline(model: str | ModelSpec = "klein-4b", *, weights: str | Path,
                  vae: str | Path | None = None, backend: str = "mlx",
                  dtype: str | None = None) -> Pipeline:
    """Load a FLUX.2 model from local files.

    weights: a BFL single file (`flux-2-klein-4b.safetensors`), a diffusers `transformer/` folder,
    or a folder holding either. vae: `ae.safetensors` or a diffusers `vae/` folder; found next to
    the weights when omitted. dtype: "bfloat16" | "float16" | "float32"; default bf16 on a GPU,
    float32 on CPU. The VAE always runs in float32.
    """
    spec = get_spec(model)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    be = importlib.import_module(f"flux2_mlx.{backend}_backend")
    dt = be.resolve_dtype(dtype)
    transformer_path, vae_path = find_transformer(spec, weights), find_vae(spec, weights, vae)
    vae_model = be.load_vae(spec.vae, WeightSource(vae_path), dtype=be.resolve_dtype("float32"))
    transformer = be.load_transformer(spec.transformer, WeightSource(transformer_path), dtype=dt)
    return Pipeline(spec, be, transformer, vae_model, dt)
