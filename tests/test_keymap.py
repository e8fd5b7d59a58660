"""Key maps: BFL ↔ diffusers for the DiT and the VAE, checked against diffusers' own names and converters."""

import numpy as np
import pytest
import torch
from conftest import ShapeSource, random_transformer, random_vae
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

from flux2_mlx.config import MODELS, tiny_spec, transformer_shapes, vae_shapes
from flux2_mlx.dit_names import transformer_entries, transformer_to_diffusers
from flux2_mlx.entries import check_keys
from flux2_mlx.vae_names import vae_entries, vae_to_diffusers
from flux2_mlx.weights import WeightSource, save_safetensors


def _diffusers_shapes(model_cls, **config):
    with torch.device("meta"):
        model = model_cls(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["dev", "klein-4b", "klein-9b"])
def test_full_size_diffusers_transformer_maps_to_bfl(name):
    cfg = MODELS[name].transformer
    shapes = _diffusers_shapes(
        Flux2Transformer2DModel, num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
        num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
        guidance_embeds=cfg.use_guidance_embed)
    entries = transformer_entries(ShapeSource(shapes))
    check_keys(entries, transformer_shapes(cfg), name)  # raises on any difference


def test_full_size_vae_names_match_diffusers():
    cfg = MODELS["dev"].vae
    ours = vae_to_diffusers({k: np.broadcast_to(np.float32(0), s) for k, s in vae_shapes(cfg).items()})
    theirs = _diffusers_shapes(AutoencoderKLFlux2)
    theirs.pop("bn.num_batches_tracked", None)
    assert {k: tuple(v.shape) for k, v in ours.items()} == theirs
    check_keys(vae_entries(ShapeSource(theirs)), vae_shapes(cfg), "vae")


def test_transformer_to_diffusers_agrees_with_diffusers_converter():
    bfl = random_transformer(tiny_spec("dev").transformer)
    theirs = convert_flux2_transformer_checkpoint_to_diffusers({k: torch.from_numpy(v)
                                                                for k, v in bfl.items()})
    ours = transformer_to_diffusers(bfl)
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k].numpy()) for k in ours)


@pytest.mark.parametrize("variant", ["dev", "klein-4b"])
def test_transformer_round_trip_through_diffusers_file(variant, tmp_path):
    bfl = random_transformer(tiny_spec(variant).transformer)
    save_safetensors(tmp_path / "t.safetensors", transformer_to_diffusers(bfl))
    back = transformer_entries(WeightSource(tmp_path / "t.safetensors"))
    assert back.keys() == bfl.keys()
    assert all(np.array_equal(back[k].load(), bfl[k]) and back[k].shape == bfl[k].shape for k in bfl)


def test_vae_round_trip_through_diffusers_file(tmp_path):
    bfl = random_vae(tiny_spec().vae)
    save_safetensors(tmp_path / "v.safetensors", vae_to_diffusers(bfl))
    back = vae_entries(WeightSource(tmp_path / "v.safetensors"))
    assert back.keys() == bfl.keys()
    assert all(np.array_equal(back[k].load(), bfl[k]) for k in bfl)


def test_final_modulation_halves_swap_and_swap_back(tmp_path):
    """BFL's final (shift, scale) rows are diffusers' (scale, shift): the halves swap on the way to diffusers
    names and swap back on the way in (the one map that moves values, not only names)."""
    bfl = random_transformer(tiny_spec("klein-4b").transformer)
    a = bfl["final_layer.adaLN_modulation.1.weight"]
    diffusers = transformer_to_diffusers(bfl)
    h = a.shape[0] // 2
    assert np.array_equal(diffusers["norm_out.linear.weight"], np.concatenate([a[h:], a[:h]]))
    assert not np.array_equal(diffusers["norm_out.linear.weight"], a)
    save_safetensors(tmp_path / "t.safetensors", diffusers)
    back = transformer_entries(WeightSource(tmp_path / "t.safetensors"))
    assert np.array_equal(back["final_layer.adaLN_modulation.1.weight"].load(), a)


def test_bfl_prefixed_keys_map_by_identity(tmp_path):
    bfl = random_transformer(tiny_spec("klein-4b").transformer)
    save_safetensors(tmp_path / "c.safetensors", {f"model.diffusion_model.{k}": v for k, v in bfl.items()})
    assert transformer_entries(WeightSource(tmp_path / "c.safetensors")).keys() == bfl.keys()
