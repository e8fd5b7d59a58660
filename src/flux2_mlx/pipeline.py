"""The FLUX.2 pipeline: find weights, load them on a backend chosen by name, sample, decode.

Imports only the numpy core; the backend comes through importlib, so torch never loads on the MLX
path and MLX never loads for `flux2 --help`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import numbers
import os
import platform
import secrets
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from . import hub, masks, sampling, variants
from . import images as edit_images
from . import memory as memory_plan
from .config import (
    DEFAULT_STRENGTH,
    MODELS,
    ModelSpec,
    TextEncoderConfig,
    TransformerConfig,
    default_strength,
    get_spec,
    text_encoder_config_from,
    text_encoder_shapes,
    transformer_shapes,
    vae_config_from,
    vae_shapes,
)
from .dit_names import transformer_entries
from .encoder_names import gguf_encoder_config, text_encoder_entries
from .entries import Entry, check_transformer, transformer_config
from .lora import Lora, merged_entries, read_lora, sha256_prefix
from .tokenizer import PromptTokenizer, tokenizer_from_gguf
from .vae_names import vae_entries
from .weights import WeightsError, WeightSource

MAX_PIXELS = 2048 * 2048
BACKENDS = ("mlx", "torch")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_FRAMEWORKS = {"mlx": ("MLX", "pip install mlx (macOS) or 'mlx[cpu]' (Linux)"),
               "torch": ("PyTorch", "pip install 'flux2-mlx[torch]'")}


def check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        near = lambda v: f"{max(16, v // 16 * 16)}"  # noqa: E731
        raise ValueError(f"width and height must be positive multiples of 16, got {width}x{height} "
                         f"(try {near(width)}x{near(height)})")
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width}x{height} is {width * height / 2**20:.1f} MP; the limit is 4 MP "
                         f"(e.g. 2048x2048)")


def _config_json(path: Path) -> dict | None:
    """A diffusers/HF component folder's config.json, if it has one."""
    f = path / "config.json"
    if not (path.is_dir() and f.exists()):
        return None
    try:
        conf = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        raise WeightsError(f"{f}: not valid JSON; download it again") from None
    if not isinstance(conf, dict):
        raise WeightsError(f"{f}: a JSON {type(conf).__name__}, not an object; download it again")
    return conf


def component_config(make, path: Path, base):
    """vae_config_from / text_encoder_config_from on a folder's config.json, its errors naming the file."""
    try:
        return make(_config_json(path), base)
    except ValueError as e:
        raise WeightsError(f"{path / 'config.json'}: {e}") from None


def encoder_config(source: WeightSource, base: TextEncoderConfig) -> TextEncoderConfig:
    """The encoder's hyper-parameters from its config.json, or from a llama.cpp GGUF's metadata (read from
    the already opened file: parsing a GGUF's tokenizer metadata takes seconds)."""
    if source.path.suffix != ".gguf":
        return component_config(text_encoder_config_from, source.path, base)
    values = gguf_encoder_config(source.files[0])
    try:
        return text_encoder_config_from(values, base)
    except ValueError as e:
        raise WeightsError(f"{source.path}: metadata {e}") from None


def _transformer_config(spec: ModelSpec, entries, where) -> TransformerConfig:
    """The config the file's shapes describe; another registered variant's shapes are an error."""
    cfg = transformer_config(entries, where, fallback=spec.transformer)
    others = [n for n, s in MODELS.items() if s.transformer == cfg]
    if cfg != spec.transformer and others:
        raise WeightsError(f"{where}: these transformer weights have the shapes of {' / '.join(others)}, not "
                           f"{spec.name}: choose --model {' or '.join(others)}")
    return cfg


def uses_cfg(spec: ModelSpec, guidance: float | None) -> bool:
    """True CFG (a negative pass) runs for the klein base variants with guidance above 1."""
    return spec.guidance_mode == "cfg" and (spec.default_guidance if guidance is None else guidance) > 1.0


def _shape_entries(shapes: dict) -> dict[str, Entry]:
    """Stand-ins for a component not downloaded yet: its shapes, stored in the compute dtype."""
    return {k: Entry(v, lambda: None) for k, v in shapes.items()}


def memory_plan_from_files(spec: ModelSpec, files: dict, backend, dtype_bytes: int, width: int, height: int,
                           *, budget_gb: float | None = None, stream_from: str | None = None,
                           cfg: bool = False, ref_tokens: int = 0, image_size: tuple[int, int] | None = None,
                           loras: list[tuple[Lora, float]] = ()) -> memory_plan.MemoryPlan:
    """The memory plan for one run, from the files' headers (shapes and stored types; nothing is loaded).
    ref_tokens and image_size: see memory_plan.plan_phases. loras: what beside quantized weights they add.

    budget_gb None: the backend's limit (Metal's recommended working set, or 80 % of RAM). stream_from
    None: "ram" when the host has room for a copy of what is streamed beside the budget, else "disk".
    """
    dev = backend.device_memory()
    budget = int(budget_gb * memory_plan.GB) if budget_gb is not None else dev["limit"]
    if budget <= 0:
        raise ValueError(f"the memory budget must be positive, got {budget_gb} GB")

    tpath, vpath = files.get("transformer"), files.get("vae")
    t_entries = (transformer_entries(WeightSource(tpath)) if tpath is not None
                 else _shape_entries(transformer_shapes(spec.transformer)))
    tcfg = _transformer_config(spec, t_entries, tpath) if tpath is not None else spec.transformer
    t_entries = merged_entries(t_entries, list(loras)) if loras else t_entries
    t = memory_plan.component_weights("transformer", t_entries, ("double_blocks", "single_blocks"),
                                      dtype_bytes, fp8_kept=dev["fp8_kept"])
    vae_cfg = component_config(vae_config_from, Path(vpath), spec.vae) if vpath is not None else spec.vae
    v = memory_plan.component_weights("vae", vae_entries(WeightSource(vpath)) if vpath is not None
                                      else _shape_entries(vae_shapes(vae_cfg)), (), 4)
    te_cfg, te_path = spec.text_encoder, files.get("text_encoder")
    if te_path is not None:
        te_source = WeightSource(te_path, partial=True)
        te_cfg = encoder_config(te_source, te_cfg)
        te_entries = text_encoder_entries(te_source, te_cfg)
    else:
        te_entries = _shape_entries(text_encoder_shapes(te_cfg))
    te = memory_plan.component_weights("text encoder", te_entries, ("model.layers",), dtype_bytes,
                                       fp8_kept=dev["fp8_kept"])
    streamed = max(t.total, te.total)
    source = stream_from or ("ram" if streamed + budget <= 0.9 * dev["total"] else "disk")
    if source not in ("ram", "disk"):
        raise ValueError(f"stream_from must be ram or disk, got {stream_from!r}")
    return memory_plan.plan_phases(budget, transformer=t, vae=v, text_encoder=te, hidden=tcfg.hidden_size,
                                   heads=tcfg.num_heads, te_hidden=te_cfg.hidden_size,
                                   te_mlp=te_cfg.intermediate_size, te_heads=te_cfg.num_attention_heads,
                                   width=width, height=height, compute_bytes=dtype_bytes,
                                   fused_attention=dev["fused_attention"], activations=dev["activations"],
                                   cfg_batch=2 if cfg else 1, source=source, vae_ch=vae_cfg.ch,
                                   ref_tokens=ref_tokens, image_size=image_size,
                                   text_tokens=spec.text_encoder.max_length)


def run_tiled(fn, x: np.ndarray, tile: int, inner: int, outer: int) -> np.ndarray:
    """fn maps (1, a·inner, b·inner, C) → (a·outer, b·outer, C') over a grid of 16-px cells (decode: a latent
    cell in, 16 px out; encode: 16 px in, a latent cell out); run whole (tile 0), or in tiles of `tile` px.

    Each tile gets memory_plan.TILE_OVERLAP px of context on every inner side and is cross-faded linearly
    over the band it shares with its neighbour, so no seam shows.
    """
    h, w = x.shape[1] // inner, x.shape[2] // inner
    t, o = tile // 16, memory_plan.TILE_OVERLAP // 16
    if tile == 0 or (h <= t and w <= t):
        return fn(x)
    out = weight = None

    def ramp(lo, hi, n):  # 1 inside, falling to 0 across the 2·o cells of an inner edge
        r = np.ones(outer * (hi - lo), np.float32)
        edge = np.linspace(0, 1, 2 * o * outer + 2, dtype=np.float32)[1:-1][: r.size]  # short last tile: cut
        if lo > 0:
            r[: edge.size] = np.minimum(r[: edge.size], edge)
        if hi < n:
            r[r.size - edge.size:] = np.minimum(r[r.size - edge.size:], edge[::-1])
        return r

    for y in range(0, h, t):
        for x0 in range(0, w, t):
            y0, y1, xa, xb = max(0, y - o), min(h, y + t + o), max(0, x0 - o), min(w, x0 + t + o)
            part = fn(x[:, inner * y0:inner * y1, inner * xa:inner * xb])
            if out is None:
                out = np.zeros((outer * h, outer * w, part.shape[-1]), np.float32)
                weight = np.zeros((outer * h, outer * w, 1), np.float32)
            wgt = ramp(y0, y1, h)[:, None, None] * ramp(xa, xb, w)[None, :, None]
            out[outer * y0:outer * y1, outer * xa:outer * xb] += part * wgt
            weight[outer * y0:outer * y1, outer * xa:outer * xb] += wgt
    return out / weight


def decode_tiled(decode, z: np.ndarray, tile: int) -> np.ndarray:
    """decode((1, h, w, C) latent tokens) → (16h, 16w, 3) image, whole (tile 0) or in tiles of `tile` px."""
    return run_tiled(decode, z, tile, 1, 16)


def encode_tiled(encode, image: np.ndarray, tile: int) -> np.ndarray:
    """encode((1, H, W, 3) image) → (H/16, W/16, C) latents, whole (tile 0) or in tiles of `tile` px."""
    return run_tiled(encode, image, tile, 16, 1)


class EncodedImages(NamedTuple):
    """An edit's images as latent tokens: the references side by side (1, R, C) with their position ids,
    and the img2img start image (1, N, C); None where there is none."""

    ref_latents: np.ndarray | None = None
    ref_ids: np.ndarray | None = None
    init_latents: np.ndarray | None = None


@dataclasses.dataclass
class Inputs:
    """What one edit starts from (`Pipeline.prepare_inputs`): the generated size, the prepared reference
    images and img2img start image as (H, W, 3) arrays in [-1, 1], for inpainting the mask and what the
    result is composed on (masks.Masked), and, once encoded, their latent tokens. Reuse one for several
    seeds of one pipeline and the images are encoded once."""

    width: int
    height: int
    refs: list[np.ndarray] = dataclasses.field(default_factory=list)
    init: np.ndarray | None = None
    encoded: EncodedImages | None = None
    masked: masks.Masked | None = None

    @property
    def ref_tokens(self) -> int:
        # an inpainting's start image is also its first reference
        conditions = self.refs + ([self.init] if self.masked is not None else [])
        return sum(r.shape[0] * r.shape[1] for r in conditions) // 256

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(width, height) of the largest image to encode, or None."""
        images = self.refs + ([self.init] if self.init is not None else [])
        return max(((a.shape[1], a.shape[0]) for a in images), key=lambda s: s[0] * s[1], default=None)


def prepare_inputs(model: str, width: int | None = None, height: int | None = None, images=None,
                   image=None, mask=None, *, mask_crop: int | None = None, mask_blur: float = 0.0,
                   expand=None) -> Inputs:
    """Read and prepare reference images (paths or PIL images, at most 10), an img2img start image and
    an inpainting mask or outpainting borders for `model` (its name picks the recommended reference
    count). Loads no model.

    The output size defaults to the start image's size, else the first reference's processed size,
    else 1024×1024; a width or height given alone keeps the other from that image. mask, mask_crop,
    mask_blur, expand: see masks.prepare_masked.
    """
    inpaint = mask is not None or expand is not None
    if not inpaint and (mask_crop is not None or mask_blur):
        raise ValueError("mask_crop and mask_blur work only with a mask (or expand)")
    if inpaint and image is None:
        raise ValueError("a mask needs the picture it covers: pass image= (--image PICTURE)")
    if mask_crop is not None and mask_crop < 0 or mask_blur < 0:
        raise ValueError(f"mask_crop and mask_blur must be ≥ 0 px, got {mask_crop} and {mask_blur}")
    refs = edit_images.prepare_references(images, model) if images else []
    masked = None
    if inpaint:
        masked = masks.prepare_masked(image, mask, width, height, mask_crop, mask_blur, expand)
        check_size(*masked.source.size)
        init = masked.init
        width, height = init.shape[1], init.shape[0]
    else:
        init = edit_images.prepare_init(image, width, height) if image is not None else None
    source = init if init is not None else (refs[0] if refs else None)
    if source is not None:
        width, height = width or source.shape[1], height or source.shape[0]
    width, height = width or 1024, height or 1024
    check_size(width, height)
    return Inputs(width, height, refs, init, masked=masked)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One generation's settings: what `generate`, `sample` and `iter_steps` make of their keywords (see
    `generate`), and what the CLI builds. `inputs` from `prepare_inputs`; a prompt string or its embeddings;
    steps and guidance None: the model's defaults."""

    inputs: Inputs
    seed: int
    prompt: str | None = None
    prompt_embeds: np.ndarray | None = None
    negative_prompt: str | None = None
    negative_prompt_embeds: np.ndarray | None = None
    strength: float = DEFAULT_STRENGTH
    steps: int | None = None
    guidance: float | None = None
    keep_unmasked: bool = True  # inpainting: pixels outside the (feathered) mask keep the source's bytes


class Component:
    """The transformer or the text encoder while a pipeline holds it, with the streaming setup it was loaded
    with: the one place either is loaded and freed."""

    def __init__(self, backend):
        self.backend = backend
        self.model = self.streaming = None  # streaming outlives a free: Pipeline.transformer reloads with it

    def get(self, streaming, load):
        """The model set up for `streaming`: the held one when its setup matches, else load(streaming)."""
        if self.model is None or self.streaming != streaming:
            self.free()  # before loading, so the old copy and the backend's cached buffers are gone
            self.model, self.streaming = load(streaming), streaming
        return self.model

    def free(self) -> None:
        self.model = None  # the reference first: backend.free() returns only memory nothing refers to
        self.backend.free()


class Pipeline:
    """One FLUX.2 model on one backend. Use `load_pipeline` to make one.

    Memory "phase" (default) follows the memory plan (`plan()`): both text encoder and transformer stay
    loaded between generations when they fit the budget together (`MemoryPlan.keeps_both`); else at most
    one is in memory: the encoder is freed after encoding, the transformer before the next encoding. Each
    phase streams blocks when its component does not fit the budget and decodes in tiles when the image
    does not. "resident" keeps both loaded and plans nothing.
    """

    def __init__(self, spec: ModelSpec, backend, files: dict, dtype, memory: str = "phase",
                 budget_gb: float | None = None, stream_from: str | None = None, compile: bool = False,
                 fp8_matmul: bool = False):
        (self.backend, self.files, self.dtype, self.memory,
         self.compile, self.fp8_matmul) = backend, files, dtype, memory, compile, fp8_matmul
        self.dtype_name = dtype_name(backend, dtype)
        self.backend_name = self.device = None  # set by load_pipeline
        self.budget_gb, self.stream_from = budget_gb, stream_from
        self._memory_plans: dict[tuple, memory_plan.MemoryPlan] = {}
        self._prompts: dict[str, np.ndarray] = {}  # prompt → embeddings: several seeds encode once
        # The architecture comes from the files (tensor shapes, config.json); the name gives defaults.
        # Shapes are read from headers now, so a wrong file fails before minutes of prompt encoding.
        entries = transformer_entries(WeightSource(self._path("transformer", spec)))
        cfg = _transformer_config(spec, entries, self.files["transformer"])
        check_transformer(entries, cfg, self.files["transformer"])
        vae = component_config(vae_config_from, self._path("vae", spec), spec.vae)
        if cfg.in_channels != 4 * vae.z_channels:  # latents are 2×2 patches of the VAE's channels
            raise WeightsError(f"{self.files['transformer']}: the transformer takes {cfg.in_channels} "
                               f"latent channels but the autoencoder {self.files['vae']} gives "
                               f"{4 * vae.z_channels}; use FLUX.2's own ae.safetensors")
        self.spec = dataclasses.replace(spec, transformer=cfg, vae=vae)
        self.vae = backend.load_vae(vae, WeightSource(self.files["vae"]),
                                    dtype=backend.resolve_dtype("float32"))
        self._transformer, self._text_encoder, self._tokenizer = Component(backend), Component(backend), None
        self._loras: list[tuple[Lora, float]] = []
        self._lora_info: list[dict] = []  # image.info["loras"]: file name, sha256 prefix, scale

    def _path(self, component: str, spec: ModelSpec | None = None) -> Path:
        if self.files.get(component) is None:
            self.files.update(hub.fetch(spec or self.spec, {component: None}))
        return self.files[component]

    def plan(self, width: int = 1024, height: int = 1024, guidance=None,
             inputs: Inputs | None = None, budget_gb: float | None = None) -> memory_plan.MemoryPlan:
        """The memory plan for an image of this size, with the reference tokens and input images of
        `inputs` (memory_plan.MemoryPlanError if it cannot fit); budget_gb: another budget than the
        pipeline's, to ask what it would do."""
        cfg = uses_cfg(self.spec, guidance)
        refs, size = (inputs.ref_tokens, inputs.image_size) if inputs is not None else (0, None)
        budget_gb = self.budget_gb if budget_gb is None else budget_gb
        key = (width, height, cfg, refs, size, budget_gb)
        if key not in self._memory_plans:
            self._memory_plans[key] = memory_plan_from_files(
                self.spec, self.files, self.backend, DTYPE_BYTES[self.dtype_name], width, height,
                budget_gb=budget_gb, stream_from=self.stream_from, cfg=cfg, ref_tokens=refs, image_size=size,
                loras=self._loras)
        return self._memory_plans[key]

    def prepare_inputs(self, width: int | None = None, height: int | None = None, images=None,
                       image=None, mask=None, **masking) -> Inputs:
        """See the module function `prepare_inputs`."""
        return prepare_inputs(self.spec.name, width, height, images, image, mask, **masking)

    def _encode_images(self, inputs: Inputs, plan) -> EncodedImages:
        """The images of `inputs`, encoded once per Inputs: each image alone at its own size, as the VAE
        encoder's mean (BFL does not sample)."""
        if not inputs.refs and inputs.init is None:
            return EncodedImages()
        if inputs.encoded is None:
            phase = plan.phase("images") if plan is not None else None
            # The VAE encoder runs beside a loaded transformer (and a kept text encoder) only if they fit.
            kept = plan.phase("encode").weights if phase and self._text_encoder.model is not None else 0
            if phase and self._text_encoder.model is not None and phase.peak + kept > plan.usable:
                self._text_encoder.free()
                kept = 0
            if (phase and self._transformer.model is not None
                    and phase.peak + plan.phase("denoise").held + kept > plan.usable):
                self._transformer.free()
            be = self.backend
            tile = phase.tile if phase else 0

            def encode(a):
                return encode_tiled(lambda part: be.to_numpy(self.vae.encode(be.from_numpy(part)))[0],
                                    a[None], tile)

            refs = [encode(r) for r in inputs.refs]
            init = encode(inputs.init) if inputs.init is not None else None
            # Inpainting also shows the model its start image, as the first reference (t = 10), as
            # diffusers' Flux2KleinInpaintPipeline does.
            refs = [init] + refs if inputs.masked is not None else refs
            tokens = np.concatenate([r.reshape(1, -1, r.shape[-1]) for r in refs], axis=1) if refs else None
            ids = sampling.prc_refs([r.shape[:2] for r in refs]) if refs else None
            init = None if init is None else init.reshape(1, -1, init.shape[-1])
            inputs.encoded = EncodedImages(tokens, ids, init)
        return inputs.encoded

    def _phase_streaming(self, phase: str, plan):
        return plan.streaming(phase) if plan is not None and self.memory == "phase" else None

    def _load_transformer(self, streaming):
        source = WeightSource(self._path("transformer"), pread=streaming is not None)
        if self._loras:
            source = merged_entries(transformer_entries(source), self._loras)
        return self.backend.load_transformer(self.spec.transformer, source, dtype=self.dtype,
                                             streaming=streaming, compile=self.compile)

    def _load_text_encoder(self, streaming):
        path = self._path("text_encoder")
        source = WeightSource(path, partial=True, pread=streaming is not None)
        cfg = encoder_config(source, self.spec.text_encoder)
        width = len(cfg.output_layers) * cfg.hidden_size
        if width != self.spec.transformer.context_in_dim:
            raise WeightsError(f"{path}: this text encoder gives {width} features per token but the "
                               f"transformer takes {self.spec.transformer.context_in_dim}; use "
                               f"{self.spec.text_encoder.repo_id}")
        return self.backend.load_text_encoder(cfg, source, dtype=self.dtype, streaming=streaming,
                                              fp8_matmul=self.fp8_matmul)

    @property
    def loras(self) -> tuple[tuple[str, float], ...]:
        """The LoRAs applied to the transformer: (path, scale) pairs, as `set_loras` took them."""
        return tuple((lora.path, scale) for lora, scale in self._loras)

    @property
    def lora_records(self) -> list[dict]:
        """What generated images record of each LoRA: {"file": its name, "sha256": the first 16 hex digits of
        its digest, "scale"}, in `loras` order."""
        return [dict(d) for d in self._lora_info]

    def set_loras(self, loras) -> None:
        """Apply these LoRAs ([(path, scale), ...]; [] for none) from the next generation on, merged into the
        transformer's weights as it reloads from its files (beside GGUF-quantized ones, as a separate branch).
        Every file is read and checked first: on an error (ValueError, WeightsError) nothing changes."""
        pairs = _lora_pairs(loras)
        shapes = transformer_shapes(self.spec.transformer)
        read = [(read_lora(path, shapes), scale) for path, scale in pairs]
        # headers only: what merged_entries refuses (a per-column LyCORIS DoRA on GGUF) fails now, not later
        merged_entries(transformer_entries(WeightSource(self.files["transformer"])), read)
        for lora, _ in read:
            _warn_unused(lora)
        self._lora_info = [{"file": Path(path).name, "sha256": sha256_prefix(path), "scale": scale}
                           for path, scale in pairs]
        self._loras = read
        self._memory_plans.clear()  # a LoRA branch beside quantized weights takes memory of its own
        self._transformer.free()  # the next use reloads it, merged from the original weights

    @property
    def loaded(self) -> frozenset[str]:
        """Which of "text_encoder" and "transformer" are in memory now (the VAE always is): what a "phase"
        pipeline holds between calls, for an app that reports its memory."""
        held = {"text_encoder": self._text_encoder, "transformer": self._transformer}
        return frozenset(name for name, c in held.items() if c.model is not None)

    @property
    def transformer(self):
        """The transformer as the last plan set it up (resident when nothing was planned)."""
        return self._transformer.get(self._transformer.streaming, self._load_transformer)

    def encode(self, prompts: str | list[str], plan: memory_plan.MemoryPlan | None = None) -> np.ndarray:
        """Prompt embeddings (B, 512, 3·D), float32: the encoder's hidden states at its output layers.
        The last few prompts are remembered, so rendering one prompt with many seeds encodes it once."""
        be, cfg = self.backend, self.spec.text_encoder
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        todo = list(dict.fromkeys(p for p in prompts if p not in self._prompts))
        if not todo:
            return np.stack([self._prompts[p] for p in prompts])
        # encode() without a plan (a direct call) frees as "phase" always did
        phased = self.memory == "phase" and not (plan is not None and plan.keeps_both)
        if phased and self._transformer.model is not None:
            self._transformer.free()
        if self._tokenizer is None:
            te = self.files.get("text_encoder")
            if self.files.get("tokenizer") is None and te is not None and Path(te).suffix == ".gguf":
                source, where = tokenizer_from_gguf(te), te  # a GGUF encoder carries its own vocabulary
            else:
                path = self._path("tokenizer")
                source = where = path / "tokenizer.json" if path.is_dir() else path
            self._tokenizer = PromptTokenizer.from_config(source, cfg, where)
        encoder = self._text_encoder.get(self._phase_streaming("encode", plan), self._load_text_encoder)
        ids, mask = self._tokenizer.encode(todo)
        embeds = be.to_numpy(encoder(be.from_numpy(ids), be.from_numpy(mask)))
        del encoder
        if phased:
            self._text_encoder.free()
        new = dict(zip(todo, embeds))
        out = np.stack([new[p] if p in new else self._prompts[p] for p in prompts])
        self._prompts.update(new)
        while len(self._prompts) > 4:  # oldest first: dicts keep insertion order
            self._prompts.pop(next(iter(self._prompts)))
        return out

    def settings(self, steps, guidance) -> tuple[int, float]:
        """(steps, guidance) with the model's defaults filled in."""
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

    def conditioning(self, request: GenerationRequest, plan=None):
        """(prompt embeddings, negative embeddings or None) for `request`, encoding its strings in one encoder
        phase.

        The negative side exists only for CFG variants with guidance > 1; its prompt defaults to "".
        """
        spec, r = self.spec, request
        ctx, neg = r.prompt_embeds, r.negative_prompt_embeds
        if spec.guidance_mode != "cfg" and (r.negative_prompt is not None or neg is not None):
            raise ValueError(f"{spec.name} does not use a negative prompt (only the klein base variants do)")
        use_cfg = uses_cfg(spec, r.guidance)
        texts = []
        if ctx is None:
            if r.prompt is None:
                raise ValueError("pass a prompt (a string) or prompt_embeds")
            texts.append(r.prompt)
        if use_cfg and neg is None:
            texts.append(r.negative_prompt or "")
        encoded = list(self.encode(texts, plan)) if texts else []
        if ctx is None:
            ctx = encoded.pop(0)
        if use_cfg and neg is None:
            neg = encoded.pop(0)
        neg = self._embeds(neg, "negative_prompt_embeds") if use_cfg else None
        return self._embeds(ctx, "prompt_embeds"), neg

    def _denoise(self, request: GenerationRequest) -> Iterator:
        be, spec, inputs = self.backend, self.spec, request.inputs
        if spec.guidance_mode == "none" and request.guidance not in (None, 1.0):
            warnings.warn(f"{spec.name} is guidance-distilled without a guidance input; "
                          f"guidance={request.guidance} is ignored", stacklevel=4)
        phased = self.memory == "phase"
        plan = self.plan(inputs.width, inputs.height, request.guidance, inputs) if phased else None
        ctx, neg = self.conditioning(request, plan)
        steps, guidance = self.settings(request.steps, request.guidance)
        start = sampling.img2img_start(steps, request.strength) if inputs.init is not None else 0
        images = self._encode_images(inputs, plan)
        h, w = inputs.height // 16, inputs.width // 16
        ctx_ids = be.from_numpy(sampling.prc_txt(ctx.shape[1]))
        x_ids = be.from_numpy(sampling.prc_img(h, w))
        g = be.from_numpy(np.full((1,), guidance, np.float32)) if spec.guidance_mode == "embedded" else None
        refs = {} if images.ref_latents is None else dict(ref=be.from_numpy(images.ref_latents, self.dtype),
                                                           ref_ids=be.from_numpy(images.ref_ids))
        transformer = self._transformer.get(self._phase_streaming("denoise", plan), self._load_transformer)

        def velocity_for(context):
            context = be.from_numpy(context, self.dtype)
            # klein KV: this generation's reference K/V, filled by the first step and dropped with it (a
            # reused cache would carry the previous references; docs/architecture.md, 'Klein 9B KV').
            cache = [] if spec.kv_cache and refs else None

            def velocity(x, t):
                kw = {} if cache else refs  # a filled cache stands in for the references
                return transformer(x, x_ids, be.from_numpy(np.full((1,), t, np.float32)), context, ctx_ids, g,
                                   kv_cache=cache, **kw)

            return velocity

        velocity = velocity_for(ctx)
        if neg is not None:
            velocity = sampling.cfg_velocity(velocity, velocity_for(neg), guidance)
        schedule = sampling.get_schedule(steps, h * w)
        # Latents stay float32 whatever the model dtype: the Euler sum loses detail in bf16.
        noise = sampling.make_noise(request.seed, h, w, spec.latent_channels)
        init = images.init_latents
        x = be.from_numpy(noise if init is None else sampling.noised(init, noise, schedule[start]))
        blend = None
        if inputs.masked is not None:
            cells = inputs.masked.cells
            keep, repaint = be.from_numpy(np.float32(1) - cells), be.from_numpy(cells)
            start_latents, noise_latents = be.from_numpy(init), be.from_numpy(noise)

            def blend(x, t):  # the kept cells back at time t: the start latent, noised with the same noise
                return keep * (float(t) * noise_latents + float(1 - t) * start_latents) + repaint * x

        for x in sampling.denoise(velocity, x, schedule[start:], blend):
            be.evaluate(x)
            yield x

    def _request(self, prompt, request: GenerationRequest | None, settings: dict) -> GenerationRequest:
        """`request`, or the one `prompt` and `generate`'s other keywords describe (not both)."""
        if request is None:
            return self._request_from(prompt, **settings)
        if prompt is not None or settings:
            raise ValueError("pass either request= or a prompt and its settings, not both")
        return request

    def _request_from(self, prompt=None, *, prompt_embeds=None, negative_prompt=None,
                      negative_prompt_embeds=None, width=None, height=None, images=None, image=None,
                      mask=None, mask_crop=None, mask_blur=0.0, expand=None, keep_unmasked=True,
                      strength=None, inputs=None, steps=None, guidance=None, seed: int) -> GenerationRequest:
        masking = dict(mask_crop=mask_crop, mask_blur=mask_blur, expand=expand)
        if inputs is None:
            inputs = self.prepare_inputs(width, height, images, image, mask, **masking)
        elif any(v is not None for v in (width, height, images, image, mask, mask_crop, expand)) or mask_blur:
            raise ValueError("pass either inputs= or width/height/images/image/mask…, not both")
        strength = default_strength(expand is not None) if strength is None else strength
        return GenerationRequest(inputs, seed, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                                 strength, steps, guidance, keep_unmasked)

    def iter_steps(self, prompt=None, *, request: GenerationRequest | None = None,
                   **settings) -> Iterator[np.ndarray]:
        """Latent tokens (1, N, C) after each step, for previews or progress; takes what `generate` takes,
        seed required."""
        for x in self._denoise(self._request(prompt, request, settings)):
            yield self.backend.to_numpy(x)

    def sample(self, prompt=None, *, request: GenerationRequest | None = None, **settings) -> np.ndarray:
        """Final latent tokens (1, (H/16)·(W/16), C), float32; takes what `generate` takes, seed
        required."""
        x = None
        for x in self._denoise(self._request(prompt, request, settings)):
            pass
        return self.backend.to_numpy(x)

    def decode(self, latents: np.ndarray, width: int, height: int) -> Image.Image:
        """Latent tokens → RGB image; uint8 by rounding (diffusers), not truncation (BFL)."""
        be = self.backend
        z = np.asarray(latents, np.float32).reshape(1, height // 16, width // 16, -1)
        tile = self.plan(width, height).phase("decode").tile if self.memory == "phase" else 0
        img = decode_tiled(lambda part: be.to_numpy(self.vae.decode(be.from_numpy(part)))[0], z, tile)
        if not np.isfinite(img).all():
            warnings.warn("the decoded image has NaN or infinite values (an overflow in the model); "
                          "try dtype='float32'", stacklevel=2)
            img = np.nan_to_num(img)
        return Image.fromarray(np.round((np.clip(img, -1, 1) + 1) * 127.5).astype(np.uint8))

    def render(self, latents: np.ndarray, request: GenerationRequest) -> Image.Image:
        """The request's final picture from its latents: decoded and, for an inpainting, put back on its
        source (masks.paste_back)."""
        inputs = request.inputs
        image = self.decode(latents, inputs.width, inputs.height)
        if inputs.masked is None:
            return image
        return masks.paste_back(inputs.masked, image, request.keep_unmasked)

    def generate(self, prompt=None, *, request: GenerationRequest | None = None, **settings) -> Image.Image:
        """Text-to-image, editing and image-to-image, from a prompt string or embeddings
        (1, L, context_in_dim).

        Keywords: prompt_embeds, negative_prompt, negative_prompt_embeds, width, height, images, image,
        mask, mask_crop, mask_blur, expand, keep_unmasked, strength, inputs, steps, guidance, seed; or
        instead one `GenerationRequest` as request=.
        images: up to 10 reference images (paths or PIL images) the result draws on. image: a start image
        for image-to-image; `strength` (0..1] is how much of the schedule runs from it (1: all, as from pure
        noise; default 0.6, 1 with expand). width/height default to the start image's size, else the first
        reference's, else 1024.
        mask (a path, PIL image or array; white = repaint, black = keep) inpaints `image`: after each step
        the kept part is put back, and the start image is also a reference, as diffusers'
        Flux2KleinInpaintPipeline does. expand=(left, top, right, bottom) px outpaints: the canvas grows
        and its new borders are repainted. mask_crop=PX generates only the mask's box grown by PX (at
        width x height if given, else at its own size), mask_blur=PX feathers the mask; keep_unmasked
        (default True): every pixel outside the feathered mask keeps the source's bytes.
        `inputs` (from `prepare_inputs`) replaces width/height/images/image and keeps the encoded images
        for the next seed. `seed=None` draws one. The settings used (seed included) are in `image.info`.
        To render one prompt with many seeds, encode once with `encode()` and pass `prompt_embeds`.
        """
        if request is None:
            seed = settings.get("seed")
            settings["seed"] = secrets.randbelow(2**31) if seed is None else int(seed)
        request = self._request(prompt, request, settings)
        inputs = request.inputs
        out = self.render(self.sample(request=request), request)
        steps, guidance = self.settings(request.steps, request.guidance)
        out.info.update(model=self.spec.name, seed=request.seed, steps=steps, guidance=guidance)
        if inputs.refs:
            out.info["references"] = len(inputs.refs)
        if self._lora_info:
            out.info["loras"] = self.lora_records
        if inputs.init is not None:
            out.info["strength"] = request.strength
        if inputs.masked is not None:
            out.info["keep_unmasked"] = request.keep_unmasked
        return out


def _lora_pairs(loras) -> list[tuple[str, float]]:
    """[(path, scale), ...] checked: an existing file each, a finite number for a scale (ValueError)."""
    out = []
    for item in loras:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"a LoRA is a (path, scale) pair, got {item!r}")
        path, scale = item
        if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
            raise ValueError(f"LoRA file not found: {path!r}")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not np.isfinite(scale):
            raise ValueError(f"the scale of LoRA {path} must be a number, got {scale!r}")
        out.append((str(path), float(scale)))
    return out


def _warn_unused(lora: Lora) -> None:
    """One warning per file for what it carries that is not applied."""
    parts = []
    if lora.unmatched:
        first = ", ".join(lora.unmatched[:3]) + (", …" if len(lora.unmatched) > 3 else "")
        parts.append(f"{len(lora.unmatched)} keys match no layer of this transformer ({first})")
    if lora.text_encoder:
        parts.append(f"its {len(lora.text_encoder)} text-encoder keys are not applied")
    if parts:
        warnings.warn(f"LoRA {lora.path}: " + "; ".join(parts), stacklevel=3)


def choose_backend(name: str = "auto") -> str:
    """A backend name; "auto": MLX on Apple silicon, else torch (CUDA when there is one; on a CPU, torch's
    float32 step is about 20x MLX's CPU build's: BENCHMARKS.md "Transformer step"), else MLX."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose auto or one of: {', '.join(BACKENDS)}")
        return name
    have = [b for b in BACKENDS if importlib.util.find_spec(b) is not None]
    if "mlx" in have and sys.platform == "darwin" and platform.machine() == "arm64":
        return "mlx"
    if "torch" in have:
        try:
            backend_module("torch")
            return "torch"
        except ValueError:  # torch is there but does not import: pass over it
            have.remove("torch")
    if not have:
        raise ValueError(f"no backend is installed: {_FRAMEWORKS['mlx'][1]}, or {_FRAMEWORKS['torch'][1]}")
    return have[0]


def backend_module(name: str = "mlx"):
    """The backend package by name (each exports the same functions; tests/test_layering.py checks)."""
    name = choose_backend(name)
    try:
        return importlib.import_module(f"flux2_mlx.{name}_backend")
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != name:
            raise
        framework, how = _FRAMEWORKS[name]
        raise ValueError(f"the {name} backend needs {framework}, which is not installed: {how}") from None


def open_backend(name: str = "auto", device: str | None = None) -> tuple:
    """(backend module, its name, the device it now runs on) for `name` and `device` (None: the best one)."""
    name = choose_backend(name)
    be = backend_module(name)
    return be, name, be.use_device(device)


def dtype_name(backend, dtype) -> str:
    """The name ("bfloat16", ...) of one of a backend's dtypes, asked through the contract alone."""
    for name in DTYPE_BYTES:
        try:
            if backend.resolve_dtype(name) == dtype:
                return name
        except ValueError:  # a dtype this device cannot run (bf16 on an old GPU) is not the one
            continue
    raise ValueError(f"{dtype} is not a dtype flux2 runs ({', '.join(DTYPE_BYTES)})")


def load_pipeline(model: str | ModelSpec | None = None, *, model_path=None, transformer=None, vae=None,
                  text_encoder=None, tokenizer=None, backend: str = "auto", device: str | None = None,
                  dtype: str | None = None, memory: str = "phase", memory_budget: float | None = None,
                  stream_from: str | None = None, compile: bool = False,
                  fp8_matmul: bool = False, loras=()) -> Pipeline:
    """Load a FLUX.2 model: `model` a registered name (`flux2 models`) or a ModelSpec; None: the variant the
    files say they are (variants.detect), klein-4b when no file is given. A name that a signal in the files
    contradicts (a base repo run as distilled) is refused.

    Files come from the explicit paths, else `model_path` (a downloaded repo folder, BFL or diffusers
    layout), else the Hugging Face cache, else a download of only the files the model needs.
    transformer: a BFL single file or a diffusers `transformer/` folder; vae:
    `ae.safetensors` or a `vae/` folder; text_encoder: a `text_encoder/` folder; tokenizer: a
    tokenizer.json or its folder. The text encoder is fetched only when a prompt string is used.
    dtype: "bfloat16" | "float16" | "float32"; default bf16 on a GPU, float32 on CPU. The VAE always
    runs in float32. memory: "phase" | "resident" (see `Pipeline`). memory_budget: GB the backend may
    hold (default: Metal's recommended working set, or 80 % of RAM); stream_from: "ram" | "disk" for
    streamed blocks (default: RAM when a host copy fits beside the budget). backend: "auto" | "mlx" |
    "torch" (see `choose_backend`); device: "gpu" / "cpu" on MLX, "cuda", "cuda:N", "mps" or "cpu" on
    torch (default: the GPU when there is one). compile: torch.compile the transformer's resident blocks
    (torch only; the first step of each image size compiles, later ones run the fused kernels).
    fp8_matmul: multiply an FP8 text encoder's weights in FP8, its activations quantized to e4m3 per token
    and 128 columns as transformers' FP8 Linear does (torch only, where torch has FP8 matmuls; a numerics
    change, recorded in the PNG). loras: [(path, scale), ...] merged into the transformer's weights, or beside
    its GGUF-quantized ones as a separate branch (see `Pipeline.set_loras`)."""
    if not isinstance(model, ModelSpec):
        model, _ = variants.choose(model and get_spec(model).name, model_path, transformer)
    spec = get_spec(model)
    if memory not in ("phase", "resident"):
        raise ValueError(f"unknown memory mode {memory!r}; choose phase or resident")
    be, name, device = open_backend(backend, device)
    if compile and name != "torch":
        raise ValueError(f"compiling the transformer is a torch-backend option, not {name}'s; "
                         f"use backend='torch' or leave compile off")
    if fp8_matmul and name != "torch":
        raise ValueError(f"FP8 matmuls are a torch-backend option, not {name}'s; "
                         f"use backend='torch' or leave fp8_matmul off")
    files = hub.locate(spec, model_path=model_path, transformer=transformer, vae=vae,
                       text_encoder=text_encoder, tokenizer=tokenizer)
    pipe = Pipeline(spec, be, files, be.resolve_dtype(dtype), memory, memory_budget, stream_from, compile,
                    fp8_matmul)
    pipe.backend_name, pipe.device = name, device
    if loras:
        pipe.set_loras(loras)
    return pipe
