"""The whole pipeline on torch equals MLX on the same files and the same noise: klein base with CFG and a
negative prompt, 1 and 3 references, img2img, tiled VAE decode and encode, an FP8 Qwen3 encoder (final
latents ≤1e-4 relative, pictures within one uint8 step)."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import rel_err, write_tiny_repo
from test_edit import REFS, _photo
from test_fp8 import _fp8_checkpoint

from flux2_mlx import load_pipeline, memory
from flux2_mlx.config import MODELS, tiny_spec
from flux2_mlx.pipeline import backend_module

BACKENDS = ("torch", "mlx")
TILE = 256 + 2 * memory.TILE_OVERLAP  # the pixels a 256 px tile decodes or encodes, its margins included


# Prompt strings pad to 64 tokens, not 512 (conftest.short_prompts), but in the FP8 encoder test.
pytestmark = pytest.mark.usefixtures("short_prompts")


def _pipes(model, **kw) -> dict:
    return {be: load_pipeline(model, backend=be, dtype="float32", **kw) for be in BACKENDS}


TEXT = 32  # prompt tokens of the embeddings the tests pass


def _embeds(m, seed=0, L=TEXT):
    return (np.random.default_rng(seed).standard_normal((1, L, m.spec.transformer.context_in_dim))
            .astype(np.float32))


def _same_on_both(pipes: dict, width=None, height=None, images=None, image=None, **kw):
    """Each pipeline samples and decodes: final latents ≤1e-4 relative, the pictures within one step."""
    out = {}
    for be, pipe in pipes.items():
        inputs = pipe.prepare_inputs(width, height, images, image)
        latents = pipe.sample(inputs=inputs, **kw)
        out[be] = latents, np.asarray(pipe.decode(latents, inputs.width, inputs.height), np.int16)
    assert rel_err(out["torch"][0], out["mlx"][0]) <= 1e-4
    assert np.abs(out["torch"][1] - out["mlx"][1]).max() <= 1


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("FLUX.2-klein-base-4B")
    write_tiny_repo(root, "klein-base-4b")
    return root


def test_klein_base_true_cfg_with_a_negative_prompt(base_repo):
    """Prompt strings through the Qwen3 encoder on each backend, a negative pass at guidance 4."""
    pipes = _pipes("klein-base-4b", model_path=base_repo)
    _same_on_both(pipes, prompt="a red fox on a blue sofa", negative_prompt="blurry, dark", guidance=4.0,
                  width=64, height=48, steps=2, seed=3)


@pytest.mark.parametrize("count", [1, 3])
def test_references(tiny_models, count):
    m = tiny_models("klein-4b")
    refs = [_photo(w, h, k) for k, (w, h) in enumerate(REFS[count])]
    _same_on_both(_pipes(m.spec, model_path=m.bfl_dir), images=refs, prompt_embeds=_embeds(m), steps=3,
                  seed=3)


def test_img2img(tiny_models):
    m = tiny_models("klein-4b")
    _same_on_both(_pipes(m.spec, model_path=m.bfl_dir), image=_photo(96, 64, 11), strength=0.6,
                  prompt_embeds=_embeds(m, 2), steps=4, seed=9)


def _tiling_budget(be: str, maps: str, m, height: int) -> float:
    """GB that fit the VAE and one 256 px tile of a 400 px wide image (1 % to spare), not the whole image:
    each backend's own activation coefficients, so both tile the same way."""
    weights = sum(a.nbytes for a in m.vae.values())  # float32, as the VAE runs
    coefficients = backend_module(be).device_memory()["activations"]
    act = memory.vae_activations(getattr(coefficients, maps), TILE, height, m.spec.vae.ch, coefficients.fixed)
    return (weights + act) / (1 - memory.HEADROOM) * 1.01 / memory.GB


@pytest.mark.parametrize("phase", ["decode", "images"])
def test_tiled_vae(tiny_models, phase):
    """A budget too small for the whole image: decode (text-to-image 400x96) or encode (a 400x160
    reference, 64x64 out); each large enough that the budget still holds the denoising: runs in 256 px
    tiles on both backends."""
    m = tiny_models("klein-4b")
    # Prompts of this test's 32 tokens, so that the planner sizes the denoising for them, not for FLUX.2's
    # 512 (which would take a budget, hence an image, twice as tall to hold it: MLX's VAE takes ~30 ms per
    # 16x16 px).
    spec = dataclasses.replace(m.spec, text_encoder=dataclasses.replace(m.spec.text_encoder, max_length=TEXT))
    maps, height = ("vae_decode_maps", 96) if phase == "decode" else ("vae_encode_maps", 160)
    pipes = {be: load_pipeline(spec, model_path=m.bfl_dir, backend=be, dtype="float32",
                               memory_budget=_tiling_budget(be, maps, m, height)) for be in BACKENDS}
    kw = dict(width=400, height=96) if phase == "decode" else dict(images=[_photo(400, 160, 4)], width=64,
                                                                      height=64)
    for pipe in pipes.values():
        inputs = pipe.prepare_inputs(**kw)
        plan = pipe.plan(inputs.width, inputs.height, inputs=inputs)
        assert plan.phase(phase).tile == 256 and not plan.phase("denoise").streamed
    _same_on_both(pipes, **kw, prompt_embeds=_embeds(m, 5), steps=1, seed=4)


def test_fp8_qwen3_encoder_encodes_the_same_embeddings(tiny_repo, tmp_path, short_prompts, monkeypatch):
    """A Qwen3 checkpoint stored as Qwen/Qwen3-*-FP8 are (e4m3 Linears with block scales) in the pipeline's
    encoder phase: the same prompt embeddings on torch as on MLX, at the real 512 tokens."""
    monkeypatch.setitem(MODELS, "klein-4b", short_prompts["klein-4b"])
    te = tiny_spec("klein-4b").text_encoder
    folder = tmp_path / "fp8"
    _fp8_checkpoint(te, folder, (16, 16), False)
    config = json.loads((tiny_repo / "text_encoder" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))  # the dimensions; the blocks follow the shapes
    embeds = {be: pipe.encode(["a red fox", "a photograph of a mountain lake"])
              for be, pipe in _pipes("klein-4b", model_path=tiny_repo, text_encoder=folder).items()}
    assert embeds["torch"].shape == (2, 512, 3 * te.hidden_size) and np.isfinite(embeds["torch"]).all()
    assert rel_err(embeds["torch"], embeds["mlx"]) <= 1e-5
