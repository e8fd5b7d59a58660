"""One request's images, seed after seed, as `flux2 generate` writes them and `flux2 serve` sends them: the
prompts encoded once, each seed denoised and rendered, and its PNG with the settings `flux2 info` reads.

`images` is a generator of events, so that the CLI can draw progress bars and the server job events (and
stop a job between two steps) from the same run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any, NamedTuple

from . import __version__

META_KEY = "flux2"  # the PNG text chunk holding the settings


class Phase(NamedTuple):
    """A phase begins: "encode" (the prompts, once), "denoise" (a seed's steps) or "decode"; total: its
    units (the seed's steps, else 1)."""

    name: str
    index: int  # which seed
    seed: int
    total: int


class Step(NamedTuple):
    """A denoising step made: step counts from 1 within the seed; latents (1, N, C) after it."""

    index: int
    step: int
    latents: Any


class Result(NamedTuple):
    """A seed's picture and its PNG file."""

    index: int
    seed: int
    image: Any
    png: bytes


def denoise_steps(pipe, request) -> int:
    """The steps each seed makes: image-to-image starts part way down the schedule."""
    from .sampling import img2img_start

    steps, _ = pipe.settings(request.steps, request.guidance)
    return steps - (img2img_start(steps, request.strength) if request.inputs.init is not None else 0)


def images(pipe, request, plan, seeds: list[int], edit: dict,
           lora_meta: list) -> Iterator[Phase | Step | Result]:
    """`request` rendered for each of `seeds`; edit and lora_meta: what the PNGs record (image_metadata)."""
    total = denoise_steps(pipe, request)
    yield Phase("encode", 0, seeds[0], 1)
    ctx, neg = pipe.conditioning(request, plan)
    # Every seed denoises from these embeddings: the prompts are encoded once.
    encoded = dataclasses.replace(request, prompt=None, prompt_embeds=ctx, negative_prompt=None,
                                  negative_prompt_embeds=neg)
    for index, seed in enumerate(seeds):
        yield Phase("denoise", index, seed, total)
        latents = None
        for step, latents in enumerate(pipe.iter_steps(request=dataclasses.replace(encoded, seed=seed)), 1):
            yield Step(index, step, latents)
        yield Phase("decode", index, seed, 1)
        image = pipe.render(latents, request)
        yield Result(index, seed, image, png_bytes(image, image_metadata(pipe, request, seed, image, edit,
                                                                         lora_meta)))


def png_bytes(image, meta: dict) -> bytes:
    """The PNG file of `image` with its settings in the `flux2` text chunk."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(META_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def image_metadata(pipe, request, seed: int, image, edit: dict, lora_meta: list) -> dict:
    """What the PNG of one seed records (`flux2 info` reads it back); `edit`: generate's image options, the
    files as given."""
    inputs = request.inputs
    steps, guidance = pipe.settings(request.steps, request.guidance)
    meta = dict(prompt=request.prompt, model=pipe.spec.name, seed=seed, steps=steps, guidance=guidance,
                width=image.width, height=image.height, dtype=pipe.dtype_name, backend=pipe.backend_name,
                device=pipe.device, version=__version__)
    if request.negative_prompt is not None:
        meta["negative_prompt"] = request.negative_prompt
    if edit["images"]:
        meta["refs"] = [str(r) for r in edit["images"]]
    if edit["image"] is not None:
        meta.update(image=str(edit["image"]), strength=request.strength)
    if inputs.masked is not None:
        meta.update(_mask_meta(edit, request.keep_unmasked, (inputs.width, inputs.height)))
    if pipe.compile:  # fused kernels round differently: the same flag reproduces the same bytes
        meta["compile"] = True
    if pipe.fp8_matmul:  # FP8 activations change the embeddings
        meta["fp8_matmul"] = True
    if lora_meta:
        meta["loras"] = lora_meta
    return meta


def _mask_meta(edit: dict, keep_unmasked: bool, size: tuple[int, int]) -> dict:
    """An inpainting's settings as the PNG records them: the mask file as given, the crop, feather and
    outpainting borders, and the crop's generation size when -W/-H gave one."""
    meta = dict(keep_unmasked=keep_unmasked, mask_blur=edit["mask_blur"])
    if edit["mask"] is not None:
        meta["mask"] = str(edit["mask"])
    if edit["expand"] is not None:
        meta["expand"] = list(edit["expand"])
    if edit["mask_crop"] is not None:
        meta["mask_crop"] = edit["mask_crop"]
        if edit["width"] or edit["height"]:
            meta["mask_crop_size"] = list(size)
    return meta
