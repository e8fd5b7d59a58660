"""Inpainting and outpainting: whole runs equal diffusers' Flux2KleinInpaintPipeline (same noise and
embeddings, float32), and the composite keeps every unmasked byte of the source."""

import numpy as np
import pytest
import torch
from conftest import flux2_scheduler, rel_err
from PIL import Image, ImageFilter
from test_edit import _case, _noise, _photo

from flux2_mlx import load_pipeline


def _mask(w, h, box):
    """An "L" mask, white (repaint) inside box (x1, y1, x2, y2), black elsewhere."""
    a = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    a[y1:y2, x1:x2] = 255
    return Image.fromarray(a, "L")


def diffusers_inpaint(m, variant, embeds, neg, seed, *, steps, guidance, **call) -> np.ndarray:
    """Flux2KleinInpaintPipeline's final latents as normalized tokens (1, N, C), its noise our seed's
    (sampling.make_noise): its own randn_tensor draws it, since a `latents=` argument would start from
    pure noise whatever the strength."""
    from diffusers.pipelines.flux2 import pipeline_flux2_klein_inpaint as module

    pipe = module.Flux2KleinInpaintPipeline(scheduler=flux2_scheduler(), vae=m.ref_vae, text_encoder=None,
                                            tokenizer=None, transformer=m.ref_transformer,
                                            is_distilled=variant == "klein-4b")
    final = {}

    def keep(_pipe, _i, _t, kw):
        final["latents"] = kw["latents"]
        return {}

    def noise(shape, **_kw):
        assert shape[1:] == (128, shape[2], shape[3])
        return torch.from_numpy(_noise(seed, 16 * shape[3], 16 * shape[2]))

    real = module.randn_tensor
    module.randn_tensor = noise
    try:
        with torch.no_grad():
            pipe(prompt_embeds=torch.from_numpy(embeds),
                 negative_prompt_embeds=None if neg is None else torch.from_numpy(neg),
                 num_inference_steps=steps, guidance_scale=guidance, callback_on_step_end=keep, **call)
    finally:
        module.randn_tensor = real
    return final["latents"].numpy()


# (variant, guidance, image size, mask box, strength, padding_mask_crop, extra): masks with edges inside
# 16-px cells, so some cells are half kept.
CASES = {
    "centred+reference": ("klein-4b", 1.0, (96, 64), (24, 20, 72, 44), 0.6, None, "reference"),
    "border-torch": ("klein-4b", 1.0, (96, 64), (0, 40, 40, 64), 1.0, None, "torch"),
    "crop": ("klein-4b", 1.0, (128, 96), (72, 24, 104, 56), 0.6, 8, None),
    "base-cfg-crop": ("klein-base-4b", 4.0, (64, 96), (0, 0, 30, 20), 1.0, 4, None),
}


@pytest.mark.parametrize("case", CASES)
def test_inpaint_matches_diffusers(tiny_models, case):
    """Also with a reference image (diffusers' image_reference, after the start image: t = 20) and on the
    torch backend. A crop's generation size is diffusers' (the picture's): width/height."""
    variant, guidance, (W, H), box, strength, crop, extra = CASES[case]
    m = tiny_models(variant)
    embeds, neg = _case(m, variant, seed=5)
    image, mask = _photo(W, H, 31), _mask(W, H, box)
    reference = _photo(80, 70, 32) if extra == "reference" else None
    steps, seed = 4, 13
    pipe = load_pipeline(m.spec, model_path=m.bfl_dir, backend="torch" if extra == "torch" else "mlx")
    size = {} if crop is None else dict(width=W, height=H, mask_crop=crop)
    ours = pipe.sample(prompt_embeds=embeds, negative_prompt_embeds=neg, image=image, mask=mask,
                       images=reference and [reference], strength=strength, steps=steps, guidance=guidance,
                       seed=seed, **size)
    want = diffusers_inpaint(m, variant, embeds, neg, seed, steps=steps, guidance=guidance, image=image,
                             mask_image=mask, image_reference=reference, strength=strength,
                             padding_mask_crop=crop, output_type="pil" if crop else "latent")
    assert ours.shape == want.shape == (1, (W // 16) * (H // 16), 128)
    assert rel_err(ours, want) <= 1e-4
    if case == "centred+reference":  # the mask is live (the images are: diffusers' result depends on them)
        other = pipe.sample(prompt_embeds=embeds, image=image, mask=_mask(W, H, (40, 20, 72, 44)),
                            images=[reference], strength=strength, steps=steps, seed=seed)
        assert rel_err(ours, other) > 1e-3


def _textured(w, h, seed):
    """A photo-like picture: smooth shapes plus per-pixel grain, which no VAE round trip keeps exactly."""
    grain = np.random.default_rng(seed).integers(-40, 41, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(_photo(w, h, seed), np.int16) + grain, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def klein(tiny_models):
    m = tiny_models("klein-4b")
    return m, load_pipeline(m.spec, model_path=m.bfl_dir), _case(m, "klein-4b", seed=6)[0]


def test_keep_unmasked_keeps_every_source_byte(klein):
    """Outside the feathered mask every pixel is the source's; beyond the feather (3 sigma) too; inside,
    the picture is new. Without keep_unmasked the kept area is the VAE's round trip, not the bytes."""
    m, pipe, embeds = klein
    source, mask = _textured(96, 64, 41), _mask(96, 64, (30, 18, 70, 50))
    kw = dict(prompt_embeds=embeds, image=source, mask=mask, mask_blur=3, strength=1.0, steps=2, seed=2)
    out = np.asarray(pipe.generate(**kw), np.int16)
    src = np.asarray(source, np.int16)
    feathered = np.asarray(mask.filter(ImageFilter.GaussianBlur(3)))
    assert (feathered == 0).sum() > 0.4 * feathered.size
    assert np.array_equal(out[feathered == 0], src[feathered == 0])
    beyond = np.ones((64, 96), bool)
    beyond[18 - 9:50 + 9, 30 - 9:70 + 9] = False
    assert np.array_equal(out[beyond], src[beyond])
    assert np.abs(out - src)[24:44, 36:64].mean() > 20  # repainted
    loose = np.asarray(pipe.generate(**kw, keep_unmasked=False), np.int16)
    assert np.abs(loose - src)[feathered == 0].max() > 20
    assert np.array_equal(loose[feathered == 255], out[feathered == 255])


def test_mask_crop_generates_only_the_box(klein):
    """Without a size, mask_crop generates the mask's box grown by the margin, rounded out to 16 px (at
    least 64): a small generation; everything outside the box is the source's."""
    m, pipe, embeds = klein
    source, mask = _textured(160, 128, 42), _mask(160, 128, (100, 76, 120, 96))
    inputs = pipe.prepare_inputs(image=source, mask=mask, mask_crop=8)
    assert inputs.masked.box == (78, 54, 142, 118) and (inputs.width, inputs.height) == (64, 64)
    out = np.asarray(pipe.generate(prompt_embeds=embeds, inputs=inputs, strength=1.0, steps=2, seed=3,
                                   keep_unmasked=False), np.int16)
    src = np.asarray(source, np.int16)
    outside = np.ones((128, 160), bool)
    outside[54:118, 78:142] = False
    assert out.shape == src.shape and np.array_equal(out[outside], src[outside])
    assert np.abs(out - src)[80:92, 102:118].mean() > 20


@pytest.mark.parametrize("variant", ["klein-9b-kv", "dev"])
def test_other_variants_keep_the_image_where_the_mask_keeps_it(tiny_models, variant):
    """diffusers has no inpaint pipeline for these: the last step's blend leaves every fully kept cell at
    the image's own latent, on both backends, which agree; the masked cells are generated."""
    m = tiny_models(variant)
    embeds, _ = _case(m, variant, seed=5)
    image, mask = _photo(80, 64, 31), _mask(80, 64, (16, 16, 48, 48))
    outs = []
    for backend in ("mlx", "torch"):
        pipe = load_pipeline(m.spec, model_path=m.bfl_dir, backend=backend)
        inputs = pipe.prepare_inputs(image=image, mask=mask)
        outs.append(pipe.sample(prompt_embeds=embeds, inputs=inputs, strength=0.8, steps=2, seed=3))
        kept = inputs.masked.cells[0, :, 0] == 0
        init = inputs.encoded.init_latents
        assert kept.sum() == 20 - 4 and np.allclose(outs[-1][0, kept], init[0, kept], atol=1e-6), backend
        assert rel_err(outs[-1][0, ~kept], init[0, ~kept]) > 1e-2
    assert rel_err(*outs) <= 1e-4


def test_inpaint_with_a_lora_streamed_equals_resident(tiny_models, tmp_path):
    from test_lora import _bfl_file

    m = tiny_models("klein-4b")
    _bfl_file(tmp_path / "style.safetensors", seed=1)
    embeds, _ = _case(m, "klein-4b", seed=5)
    kw = dict(prompt_embeds=embeds, image=_photo(64, 64, 31), mask=_mask(64, 64, (8, 8, 40, 40)),
              strength=0.8, steps=2, seed=3)
    loras = [(tmp_path / "style.safetensors", 0.8)]
    resident = load_pipeline(m.spec, model_path=m.bfl_dir, memory="resident", loras=loras).sample(**kw)
    # 0.07 GB: the tiny transformer's blocks past the first are streamed (asserted)
    pipe = load_pipeline(m.spec, model_path=m.bfl_dir, memory_budget=0.07, stream_from="disk", loras=loras)
    assert pipe.plan(64, 64).streaming("denoise") is not None
    assert np.array_equal(pipe.sample(**kw), resident)
    pipe.set_loras([])
    assert rel_err(pipe.sample(**kw), resident) > 1e-3  # the LoRA is live
