"""The MLX autoencoder equals diffusers' AutoencoderKLFlux2 on identical random weights (float32).

Weights are BFL-named; the reference is filled through diffusers' own LDM→diffusers VAE converter,
and our model is loaded from both a BFL `ae.safetensors` and a diffusers `vae/` folder.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import random_vae
from diffusers import AutoencoderKLFlux2, Flux2Pipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from flux2_mlx.config import tiny_spec
from flux2_mlx.mlx_backend.load import load_vae
from flux2_mlx.vae_names import vae_to_diffusers
from flux2_mlx.weights import WeightSource, bf16_to_f32, f32_to_bf16, save_safetensors

CFG = tiny_spec("klein-4b").vae
TOL = 1e-5


def diffusers_vae(cfg, bfl: dict[str, np.ndarray]) -> AutoencoderKLFlux2:
    """AutoencoderKLFlux2 filled through diffusers' `convert_ldm_vae_checkpoint`.

    That converter reads LDM names, which differ from BFL's only in where the quant convs live
    (top level instead of inside encoder/decoder), and it drops `bn.*`, which is added back here.
    """
    ref = AutoencoderKLFlux2(
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups, batch_norm_eps=cfg.bn_eps,
    )
    moves = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
    ldm = {}
    for k, v in bfl.items():
        for a, b in moves.items():
            k = k.replace(a, b)
        ldm[k] = torch.from_numpy(v.copy())
    sd = convert_ldm_vae_checkpoint(ldm, ref.config)
    assert not any(k.startswith("bn.") for k in sd)
    sd["bn.running_mean"], sd["bn.running_var"] = ldm["bn.running_mean"], ldm["bn.running_var"]
    sd["bn.num_batches_tracked"] = torch.tensor(0)
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def ref_encode(ref, img: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        z = Flux2Pipeline._patchify_latents(ref.encode(torch.from_numpy(img)).latent_dist.mode())
        std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
        return ((z - ref.bn.running_mean.view(1, -1, 1, 1)) / std).numpy()


def ref_decode(ref, z: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
        z = torch.from_numpy(z) * std + ref.bn.running_mean.view(1, -1, 1, 1)
        return ref.decode(Flux2Pipeline._unpatchify_latents(z)).sample.numpy()


def _nhwc(a: np.ndarray) -> mx.array:
    return mx.array(a.transpose(0, 2, 3, 1))


def _nchw(a: mx.array) -> np.ndarray:
    return np.asarray(a.astype(mx.float32)).transpose(0, 3, 1, 2)


def ours_encode(model, img: np.ndarray) -> np.ndarray:
    return _nchw(model.encode(_nhwc(img)))


def ours_decode(model, z: np.ndarray) -> np.ndarray:
    return _nchw(model.decode(_nhwc(z)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vae")
    bfl = random_vae(CFG)
    ref = diffusers_vae(CFG, bfl)
    save_safetensors(tmp / "ae.safetensors", bfl)
    ref.save_pretrained(tmp / "vae")
    rng = np.random.default_rng(7)
    img = rng.uniform(-1, 1, (1, 3, 64, 48)).astype(np.float32)  # not square: catches h/w swaps
    z = rng.standard_normal((1, 4 * CFG.z_channels, 4, 3)).astype(np.float32)
    return {"tmp": tmp, "bfl": bfl, "ref": ref, "img": img, "z": z}


def test_diffusers_converter_agrees_with_keymap(setup):
    theirs = {k: v.numpy() for k, v in setup["ref"].state_dict().items()
              if k != "bn.num_batches_tracked"}
    ours = vae_to_diffusers(setup["bfl"])
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


@pytest.mark.parametrize("layout", ["ae.safetensors", "vae"])
def test_encode_decode_match_diffusers(setup, layout):
    model = load_vae(CFG, WeightSource(setup["tmp"] / layout))
    ours, ref = ours_encode(model, setup["img"]), ref_encode(setup["ref"], setup["img"])
    assert ref.shape == (1, 4 * CFG.z_channels, 4, 3)
    assert rel_err(ours, ref) <= TOL
    ours, ref = ours_decode(model, setup["z"]), ref_decode(setup["ref"], setup["z"])
    assert ref.shape == (1, 3, 64, 48)
    assert rel_err(ours, ref) <= TOL


def test_bf16_file_loads_and_decodes(setup):
    bf16 = {k: f32_to_bf16(v) for k, v in setup["bfl"].items()}
    save_safetensors(setup["tmp"] / "ae-bf16.safetensors", bf16)
    model = load_vae(CFG, WeightSource(setup["tmp"] / "ae-bf16.safetensors"))
    ours = ours_decode(model, setup["z"])
    # Exact against a reference holding the same bf16-rounded weights; near the float32 one
    # (measured 8e-3 for these weights: bf16 rounding of every weight, compounded over ~30 layers).
    rounded = diffusers_vae(CFG, {k: bf16_to_f32(v) for k, v in bf16.items()})
    assert rel_err(ours, ref_decode(rounded, setup["z"])) <= TOL
    assert rel_err(ours, ref_decode(setup["ref"], setup["z"])) <= 2e-2


def test_bf16_compute_follows_parameter_dtype(setup):
    model = load_vae(CFG, WeightSource(setup["tmp"] / "ae.safetensors"), dtype=mx.bfloat16)
    out = model.decode(_nhwc(setup["z"]))
    assert out.dtype == mx.bfloat16
    assert rel_err(_nchw(out), ref_decode(setup["ref"], setup["z"])) <= 5e-2  # measured 1.8e-2
