"""Editing equals diffusers: reference images (Flux2Pipeline, Flux2KleinPipeline), the klein KV path
(Flux2KleinKVPipeline), image-to-image; float32, shared noise and embeddings."""

import numpy as np
import pytest
import torch
from conftest import diffusers_run, flux2_scheduler, rel_err
from PIL import Image

from flux2_mlx import load_pipeline

L = 64  # text tokens


def _photo(w, h, seed):
    """A smooth random RGB picture (VAE-friendly), w x h, sizes deliberately not multiples of 16."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


REFS = {1: [(100, 70)], 3: [(100, 70), (64, 130), (90, 90)]}  # processed: 96x64, 64x128, 80x80


def _case(m, variant, seed=0):
    rng = np.random.default_rng(seed)
    D = m.spec.transformer.context_in_dim
    embeds = rng.standard_normal((1, L, D)).astype(np.float32)
    neg = rng.standard_normal((1, L, D)).astype(np.float32) if variant.startswith("klein-base") else None
    return embeds, neg


def _noise(seed, w, h):
    """Our noise convention (sampling.make_noise) in the (1, C, h, w) layout diffusers takes as `latents`."""
    return np.random.default_rng(seed).standard_normal((1, 128, h // 16, w // 16), dtype=np.float32)


@pytest.fixture(scope="module")
def plain_renders():
    """variant → its text-to-image latents at the references' output size (the same for 1 and 3)."""
    return {}


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("variant,guidance", [("dev", 4.0), ("klein-4b", 1.0), ("klein-base-4b", 4.0),
                                              ("klein-9b-kv", 1.0)])
def test_references_match_diffusers(tiny_models, plain_renders, variant, guidance, count):
    """1 and 3 non-square references of different sizes; the output size comes from the first one."""
    m = tiny_models(variant)
    embeds, neg = _case(m, variant)
    refs = [_photo(w, h, k) for k, (w, h) in enumerate(REFS[count])]
    pipe = load_pipeline(m.spec, model_path=m.bfl_dir)
    inputs = pipe.prepare_inputs(images=refs)
    assert (inputs.width, inputs.height) == (96, 64) and inputs.ref_tokens == [24, 24 + 32 + 25][count > 1]
    seed = 3
    ours = pipe.sample(prompt_embeds=embeds, negative_prompt_embeds=neg, inputs=inputs, steps=3,
                       guidance=guidance, seed=seed)
    ref = diffusers_run(m, variant, embeds, neg, _noise(seed, 96, 64), steps=3, guidance=guidance,
                        output_type="latent", image=refs)
    assert ours.shape == ref.shape == (1, 4 * 6, 128)
    assert rel_err(ours, ref) <= 1e-4
    if variant not in plain_renders:
        plain_renders[variant] = pipe.sample(prompt_embeds=embeds, negative_prompt_embeds=neg, width=96,
                                             height=64, steps=3, guidance=guidance, seed=seed)
    assert rel_err(ours, plain_renders[variant]) > 1e-3  # the references are live


def test_kv_cache_belongs_to_one_generation(tiny_models, monkeypatch):
    """Two generations with different references (and seeds) on one pipeline each equal diffusers' KV
    pipeline: the second does not reuse the first's cache. The cached steps are really cached: the
    transformer sees the references only on the first step."""
    m = tiny_models("klein-9b-kv")
    embeds, _ = _case(m, "klein-9b-kv", seed=1)
    pipe = load_pipeline(m.spec, model_path=m.bfl_dir)
    calls = []
    model_class = type(pipe.transformer)
    real = model_class.__call__

    def spy(self, *args, **kw):
        calls.append(("ref" in kw, len(kw["kv_cache"])))
        return real(self, *args, **kw)

    monkeypatch.setattr(model_class, "__call__", spy)
    first, second = [_photo(80, 80, 5)], [_photo(120, 64, 6), _photo(70, 70, 7)]
    for refs, seed in ((first, 1), (second, 2), (first, 2)):
        ours = pipe.sample(prompt_embeds=embeds, images=refs, width=80, height=64, steps=3, seed=seed)
        want = diffusers_run(m, "klein-9b-kv", embeds, None, _noise(seed, 80, 64), steps=3, guidance=1.0,
                             output_type="latent", image=refs, width=80, height=64)
        assert rel_err(ours, want) <= 1e-4
        blocks = m.spec.transformer.depth + m.spec.transformer.depth_single_blocks
        assert calls == [(True, 0), (False, blocks), (False, blocks)]
        calls.clear()


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(tiny_models, strength):
    """img2img = diffusers' sampler started at the schedule point the strength gives, from the start
    image's latent noised there (scheduler.scale_noise); strength 1 is text-to-image."""
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    m = tiny_models("klein-4b")
    embeds, _ = _case(m, "klein-4b", seed=2)
    W, H, steps, seed = 96, 64, 4, 9
    start = _photo(W, H, 11)
    pipe = load_pipeline(m.spec, model_path=m.bfl_dir)
    ours = pipe.sample(prompt_embeds=embeds, image=start, strength=strength, steps=steps, seed=seed)
    noise = torch.from_numpy(_noise(seed, W, H))
    x = torch.from_numpy(np.asarray(start, np.float32) / 255.0 * 2 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        x0 = m.ref_vae.encode(x).latent_dist.mode()
        x0 = Flux2Pipeline._patchify_latents(x0)
        bn = m.ref_vae.bn
        x0 = (x0 - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4)
    t_start = int(steps - steps * strength)  # diffusers' get_timesteps
    sigmas = np.linspace(1.0, 1 / steps, steps)
    sched = flux2_scheduler()
    sched.set_timesteps(sigmas=sigmas, mu=compute_empirical_mu((H // 16) * (W // 16), steps))
    latents = sched.scale_noise(x0, sched.timesteps[t_start : t_start + 1], noise)
    want = diffusers_run(m, "klein-4b", embeds, None, latents.numpy(), steps=steps, guidance=1.0,
                         output_type="latent", width=W, height=H, sigmas=sigmas[t_start:])
    assert rel_err(ours, want) <= 1e-4
    plain = pipe.sample(prompt_embeds=embeds, width=W, height=H, steps=steps, seed=seed)
    assert (rel_err(ours, plain) == 0) == (strength == 1.0)
    assert len(list(pipe.iter_steps(prompt_embeds=embeds, image=start, strength=strength, steps=steps,
                                    seed=seed))) == steps - t_start


def test_edit_api_generate(tiny_models, tmp_path):
    """pipe.generate(images=[...]) from files, several references plus a start image; info records them."""
    m = tiny_models("klein-4b")
    embeds, _ = _case(m, "klein-4b")
    paths = []
    for k, (w, h) in enumerate(REFS[3]):
        paths.append(tmp_path / f"ref{k}.png")
        _photo(w, h, k).save(paths[-1])
    pipe = load_pipeline(m.spec, model_path=m.bfl_dir)
    image = pipe.generate(prompt_embeds=embeds, images=paths, steps=2, seed=1)
    assert image.size == (96, 64) and image.info["references"] == 3
    loaded = pipe.transformer  # new images are encoded beside it: the budget has room for both
    again = pipe.generate(prompt_embeds=embeds, images=[str(p) for p in paths], image=paths[1], height=96,
                          steps=4, strength=0.5, seed=1)
    assert again.size == (64, 96) and again.info["strength"] == 0.5 and pipe.transformer is loaded
    with pytest.raises(ValueError, match="at most 10"):
        pipe.generate(prompt_embeds=embeds, images=paths * 4, seed=1)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        pipe.generate(prompt_embeds=embeds, image=paths[0], strength=0, steps=4, seed=1)
    assert len(list(pipe.iter_steps(prompt_embeds=embeds, image=paths[0], strength=0.01, steps=4,
                                    seed=1))) == 1
    with pytest.raises(ValueError, match="not both"):
        pipe.generate(prompt_embeds=embeds, inputs=pipe.prepare_inputs(images=paths), width=64, seed=1)


def test_ten_references_match_diffusers(tiny_models):
    """The most references supported (t = 10 … 100), above BFL's recommendation: a warning, same result."""
    m = tiny_models("klein-4b")
    embeds, _ = _case(m, "klein-4b", seed=4)
    refs = [_photo(64 + 8 * k, 80 - k, 20 + k) for k in range(10)]
    pipe = load_pipeline(m.spec, model_path=m.bfl_dir)
    with pytest.warns(UserWarning, match="10 reference images; BFL recommends at most 4"):
        ours = pipe.sample(prompt_embeds=embeds, images=refs, width=64, height=64, steps=2, seed=5)
    want = diffusers_run(m, "klein-4b", embeds, None, _noise(5, 64, 64), steps=2, guidance=1.0,
                         output_type="latent", image=refs, width=64, height=64)
    assert rel_err(ours, want) <= 1e-4
