"""Inpainting and outpainting: whole runs equal diffusers' Flux2KleinInpaintPipeline (same noise and
embeddings, float32), and the composite keeps every unmasked byte of the source."""

import numpy as np
import pytest
import torch
from conftest import flux2_scheduler, rel_err
from PIL import Image
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


# (variant, guidance, image size, mask box, strength, padding_mask_crop): masks with edges inside 16-px
# cells, so some cells are half kept.
CASES = {
    "centred": ("klein-4b", 1.0, (96, 64), (24, 20, 72, 44), 0.6, None),
    "border": ("klein-4b", 1.0, (96, 64), (0, 40, 40, 64), 1.0, None),
    "crop": ("klein-4b", 1.0, (128, 96), (72, 24, 104, 56), 0.6, 8),
    "base-cfg": ("klein-base-4b", 4.0, (64, 96), (8, 24, 56, 72), 1.0, None),
    "base-cfg-crop": ("klein-base-4b", 4.0, (96, 64), (0, 0, 30, 20), 1.0, 4),
}


@pytest.mark.parametrize("case", CASES)
def test_inpaint_matches_diffusers(tiny_models, case):
    variant, guidance, (W, H), box, strength, crop = CASES[case]
    m = tiny_models(variant)
    embeds, neg = _case(m, variant, seed=5)
    image, mask = _photo(W, H, 31), _mask(W, H, box)
    steps, seed = 4, 13
    pipe = load_pipeline(m.spec, model_path=m.bfl_dir)
    size = {} if crop is None else dict(width=W, height=H, mask_crop=crop)  # diffusers' crop generation size
    ours = pipe.sample(prompt_embeds=embeds, negative_prompt_embeds=neg, image=image, mask=mask,
                       strength=strength, steps=steps, guidance=guidance, seed=seed, **size)
    want = diffusers_inpaint(m, variant, embeds, neg, seed, steps=steps, guidance=guidance, image=image,
                             mask_image=mask, strength=strength, padding_mask_crop=crop,
                             output_type="pil" if crop else "latent")
    assert ours.shape == want.shape == (1, (W // 16) * (H // 16), 128)
    assert rel_err(ours, want) <= 1e-4
    plain = pipe.sample(prompt_embeds=embeds, negative_prompt_embeds=neg, image=image, strength=strength,
                        steps=steps, guidance=guidance, seed=seed)
    assert rel_err(ours, plain) > 1e-3  # the mask and the conditioning image are live
