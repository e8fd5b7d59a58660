"""The whole pipeline on torch equals MLX on the same files and the same noise: klein base with CFG and a
negative prompt, 1 and 3 references, img2img, tiled VAE decode and encode, an FP8 Qwen3 encoder (final
latents ≤1e-4 relative, pictures within one uint8 step)."""

import json

import numpy as np
import pytest
from conftest import rel_err, write_tiny_repo
from test_edit import REFS, _photo
from test_fp8 import _fp8_checkpoint

from flux2_mlx import load_pipeline, memory
from flux2_mlx.config import tiny_spec
from flux2_mlx.pipeline import backend_module

BACKENDS = ("torch", "mlx")
TILE = 256 + 2 * memory.TILE_OVERLAP  # the pixels a 256 px tile decodes or encodes, its margins included


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _pipes(model, **kw) -> dict:
    return {be: load_pipeline(model, backend=be, dtype="float32", **kw) for be in BACKENDS}


def _embeds(m, seed=0, L=32):
    return np.random.default_rng(seed).standard_normal((1, L, m.spec.transformer.context_in_dim)).astype(np.float32)


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
    _same_on_both(pipes, prompt="a red fox on a blue sofa", negative_prompt="blurry, dark", guidance=4.0, width=64,
                  height=48, steps=2, seed=3)


@pytest.mark.parametrize("count", [1, 3])
def test_references(tiny_models, count):
    m = tiny_models("klein-4b")
    refs = [_photo(w, h, k) for k, (w, h) in enumerate(REFS[count])]
    _same_on_both(_pipes(m.spec, model_path=m.bfl_dir), images=refs, prompt_embeds=_embeds(m), steps=3, seed=3)


def test_img2img(tiny_models):
    m = tiny_models("klein-4b")
    _same_on_both(_pipes(m.spec, model_path=m.bfl_dir), image=_photo(96, 64, 11), strength=0.6,
                  prompt_embeds=_embeds(m, 2), steps=4, seed=9)


def _tiling_budget(be: str, maps: str, m, height: int) -> float:
    """GB that fit the VAE and one 256 px tile of a 512 px wide image (1 % to spare), not the whole image:
    each backend's own activation coefficients, so both tile the same way."""
    weights = sum(a.nbytes for a in m.vae.values())  # float32, as the VAE runs
    coefficients = backend_module(be).device_memory()["activations"]
    act = memory.vae_activations(getattr(coefficients, maps), TILE, height, m.spec.vae.ch, coefficients.fixed)
    return (weights + act) / (1 - memory.HEADROOM) * 1.01 / memory.GB


@pytest.mark.parametrize("phase", ["decode", "images"])
def test_tiled_vae(tiny_models, phase):
    """A budget too small for the whole image: decode (text-to-image 512x256) or encode (a 512x256
    reference, 128x128 out); each large enough that the budget still holds the denoising: runs in 256 px
    tiles on both backends."""
    m = tiny_models("klein-4b")
    maps, height = ("vae_decode_maps", 256) if phase == "decode" else ("vae_encode_maps", 256)
    pipes = {be: load_pipeline(m.spec, model_path=m.bfl_dir, backend=be, dtype="float32",
                               memory_budget=_tiling_budget(be, maps, m, height)) for be in BACKENDS}
    kw = dict(width=512, height=256) if phase == "decode" else dict(images=[_photo(512, 256, 4)], width=128,
                                                                       height=128)
    for pipe in pipes.values():
        inputs = pipe.prepare_inputs(**kw)
        plan = pipe.plan(inputs.width, inputs.height, inputs=inputs)
        assert plan.phase(phase).tile == 256 and not plan.phase("denoise").streamed
    _same_on_both(pipes, **kw, prompt_embeds=_embeds(m, 5), steps=1, seed=4)


def test_fp8_qwen3_encoder_encodes_the_same_embeddings(tiny_repo, tmp_path):
    """A Qwen3 checkpoint stored as Qwen/Qwen3-*-FP8 are (e4m3 Linears with block scales) in the pipeline's
    encoder phase: the same prompt embeddings on torch as on MLX."""
    te = tiny_spec("klein-4b").text_encoder
    folder = tmp_path / "fp8"
    _fp8_checkpoint(te, folder, (16, 16), False)
    config = json.loads((tiny_repo / "text_encoder" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))  # the dimensions; the blocks follow the shapes
    embeds = {be: pipe.encode(["a red fox", "a photograph of a mountain lake"])
              for be, pipe in _pipes("klein-4b", model_path=tiny_repo, text_encoder=folder).items()}
    assert embeds["torch"].shape == (2, 512, 3 * te.hidden_size) and np.isfinite(embeds["torch"]).all()
    assert rel_err(embeds["torch"], embeds["mlx"]) <= 1e-5
