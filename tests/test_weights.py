"""Loading is strict: bad files and wrong tensors fail at load time with messages that name them."""

import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_transformer, random_vae

from flux2_mlx import load_pipeline
from flux2_mlx.config import MODELS, tiny_spec, transformer_shapes
from flux2_mlx.entries import Entry, guess_transformer
from flux2_mlx.mlx_backend import load_transformer, load_vae
from flux2_mlx.pipeline import check_size
from flux2_mlx.weights import BF16, WeightsError, WeightSource, f32_to_bf16, save_safetensors, to_float32

CFG = tiny_spec("klein-4b").transformer


@pytest.fixture(scope="module")
def bfl():
    return random_transformer(CFG)


def _load(path):
    return load_transformer(CFG, WeightSource(path), dtype=mx.float32)


def test_bf16_round_trip(tmp_path):
    a = np.array([1.0, -2.5, 3.14159, 1e-3, 65504.0], np.float32)
    save_safetensors(tmp_path / "b.safetensors", {"x": f32_to_bf16(a)})
    src = WeightSource(tmp_path / "b.safetensors")
    assert src.dtype("x") == "BF16" and src.get("x").dtype == BF16
    assert np.allclose(to_float32(src.get("x")), a, rtol=2**-8)
    assert to_float32(src.get("x"))[1] == -2.5  # exactly representable values stay exact


@pytest.mark.parametrize("damage", ["tiny", "huge-header", "not-json"])
def test_truncated_or_foreign_header(tmp_path, damage):
    p = tmp_path / "bad.safetensors"
    if damage == "tiny":
        p.write_bytes(b"\x10\x00")
    elif damage == "huge-header":
        p.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    else:
        p.write_bytes(struct.pack("<Q", 8) + b"PK\x03\x04zip!")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        WeightSource(p)


def test_truncated_data(tmp_path, bfl):
    p = tmp_path / "t.safetensors"
    save_safetensors(p, bfl)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated"):
        WeightSource(p)


def test_missing_unexpected_and_misshaped_are_named(tmp_path, bfl):
    w = dict(bfl)
    del w["single_blocks.1.linear2.weight"]
    w["double_blocks.0.img_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    w["img_in.weight"] = np.zeros((CFG.hidden_size, 64), np.float32)
    save_safetensors(tmp_path / "t.safetensors", w)
    with pytest.raises(WeightsError) as e:
        _load(tmp_path / "t.safetensors")
    msg = str(e.value)
    assert "1 missing: single_blocks.1.linear2.weight" in msg
    assert "1 unexpected: double_blocks.0.img_attn.extra.weight" in msg
    assert "img_in.weight [256, 64] (expected [256, 128])" in msg


def test_wrong_variant_is_named():
    """klein-9b-shaped weights offered as klein-4b: the hint names the right model."""
    entries = {k: Entry(s, None) for k, s in transformer_shapes(MODELS["klein-9b"].transformer).items()}
    assert guess_transformer(entries, {n: s.transformer for n, s in MODELS.items()}) == "klein-9b"
    with pytest.raises(WeightsError, match="shapes of klein-9b"):
        load_transformer(MODELS["klein-4b"].transformer, entries, dtype=mx.float32)


def test_flux1_transformer_refused(tmp_path):
    flux1 = {"double_blocks.0.img_mod.lin.weight": np.zeros((6, 2), np.float32),
             "vector_in.in_layer.weight": np.zeros((2, 2), np.float32),
             "img_in.weight": np.zeros((2, 64), np.float32)}
    save_safetensors(tmp_path / "flux1-dev.safetensors", flux1)
    with pytest.raises(WeightsError, match="FLUX.1 checkpoint"):
        _load(tmp_path / "flux1-dev.safetensors")


def test_flux1_vae_refused(tmp_path):
    vae = {k: v for k, v in random_vae(tiny_spec().vae).items() if not k.startswith("bn.")}
    vae["decoder.conv_in.weight"] = np.zeros((64, 16, 3, 3), np.float32)
    save_safetensors(tmp_path / "ae.safetensors", vae)
    with pytest.raises(WeightsError, match="FLUX.1 autoencoder"):
        load_vae(tiny_spec().vae, WeightSource(tmp_path / "ae.safetensors"), dtype=mx.float32)


def test_vae_offered_as_transformer(tmp_path):
    save_safetensors(tmp_path / "ae.safetensors", random_vae(tiny_spec().vae))
    with pytest.raises(WeightsError, match="holds an autoencoder"):
        _load(tmp_path / "ae.safetensors")


def test_sharded_folder_with_index(tmp_path, bfl):
    names = sorted(bfl)
    halves = {"m-00001-of-00002.safetensors": names[: len(names) // 2],
              "m-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for f, ks in halves.items():
        save_safetensors(tmp_path / f, {k: bfl[k] for k in ks})
    index = {"weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    model = _load(tmp_path)
    assert np.array_equal(np.array(model.single_blocks[1].linear2.weight),
                          bfl["single_blocks.1.linear2.weight"])
    (tmp_path / "m-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="m-00002-of-00002.safetensors"):
        _load(tmp_path)


def test_gguf_and_missing_paths(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(WeightsError, match="GGUF"):
        WeightSource(tmp_path / "m.gguf")
    with pytest.raises(WeightsError, match="no such file"):
        load_pipeline(tiny_spec(), transformer=tmp_path / "nope.safetensors")


def test_pipeline_without_vae_says_where_to_get_it(tmp_path, bfl):
    save_safetensors(tmp_path / "flux-2-klein-4b.safetensors", bfl)
    with pytest.raises(WeightsError,
                       match=r"cache lacks black-forest-labs/FLUX.2-klein-4B \(vae/\*\).*--model-path"):
        load_pipeline(tiny_spec(), transformer=tmp_path / "flux-2-klein-4b.safetensors")


@pytest.mark.parametrize("w,h", [(1000, 1024), (1024, 8), (0, 512), (2064, 2048), (4096, 4096)])
def test_bad_sizes(w, h):
    with pytest.raises(ValueError, match="multiples of 16|limit is 4 MP"):
        check_size(w, h)


def test_good_sizes():
    for w, h in [(16, 16), (1024, 1024), (2048, 2048), (1360, 768), (4096, 1024)]:
        check_size(w, h)


def test_unknown_model_and_prompt_shape(tiny_models):
    with pytest.raises(ValueError, match="unknown model 'klein-5b'"):
        load_pipeline("klein-5b", transformer=".")
    m = tiny_models("klein-4b")
    pipe = load_pipeline(m.spec, model_path=m.bfl_dir)
    with pytest.raises(ValueError, match=r"prompt_embeds must have shape \(1, L, 96\)"):
        pipe.sample(prompt_embeds=np.zeros((1, 8, 95)), width=32, height=32, seed=0)
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.generate(prompt_embeds=np.zeros((1, 8, 96)), width=30, height=32)
    with pytest.warns(UserWarning, match="guidance=3.0 is ignored"):
        pipe.sample(prompt_embeds=np.zeros((1, 8, 96)), width=32, height=32, steps=1, guidance=3.0, seed=0)


def test_non_finite_latents_warn_instead_of_silently_blackening(tiny_models):
    m = tiny_models("klein-4b")
    pipe = load_pipeline(m.spec, model_path=m.bfl_dir)
    latents = np.zeros((1, 4, 128), np.float32)
    latents[0, 1, 3] = np.nan
    with pytest.warns(UserWarning, match="NaN or infinite"):
        pipe.decode(latents, 32, 32)
