"""The MLX transformer equals diffusers' Flux2Transformer2DModel on identical weights (float32)."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import rel_err

from flux2_mlx.dit_names import transformer_entries
from flux2_mlx.mlx_backend import load_transformer
from flux2_mlx.sampling import prc_img, prc_txt
from flux2_mlx.weights import WeightSource, f32_to_bf16, save_safetensors


def _inputs(cfg, h=3, w=5, L=512, seed=0):
    rng = np.random.default_rng(seed)
    return dict(x=rng.standard_normal((1, h * w, cfg.in_channels)).astype(np.float32),
                ctx=rng.standard_normal((1, L, cfg.context_in_dim)).astype(np.float32),
                x_ids=prc_img(h, w), ctx_ids=prc_txt(L),
                t=np.array([0.731], np.float32), g=np.array([4.0], np.float32))


def _reference(model, cfg, i):
    with torch.no_grad():
        return model(hidden_states=torch.from_numpy(i["x"]), encoder_hidden_states=torch.from_numpy(i["ctx"]),
                     timestep=torch.from_numpy(i["t"]), img_ids=torch.from_numpy(i["x_ids"]).long(),
                     txt_ids=torch.from_numpy(i["ctx_ids"]).long(),
                     guidance=torch.from_numpy(i["g"]) if cfg.use_guidance_embed else None,
                     return_dict=False)[0].numpy()


def _ours(model, i):
    return np.array(model(mx.array(i["x"]), mx.array(i["x_ids"]), mx.array(i["t"]), mx.array(i["ctx"]),
                          mx.array(i["ctx_ids"]), mx.array(i["g"])))


@pytest.mark.parametrize("variant", ["dev", "klein-4b"])
@pytest.mark.parametrize("layout", ["bfl", "bfl-prefixed", "diffusers"])
def test_forward_matches_diffusers(tiny_models, variant, layout, tmp_path):
    m = tiny_models(variant)
    cfg = m.spec.transformer
    if layout == "bfl":
        path = m.bfl_dir / m.spec.transformer_file
    elif layout == "bfl-prefixed":  # ComfyUI re-packs
        path = tmp_path / "comfy.safetensors"
        save_safetensors(path, {f"model.diffusion_model.{k}": v for k, v in m.transformer.items()})
    else:
        path = m.diffusers_dir / "transformer"
    ours = load_transformer(cfg, WeightSource(path), dtype=mx.float32)
    # FLUX.2's real 512 text tokens for the BFL file; the other layouts only change which weight lands
    # where, which 64 tokens check as well (MLX's CPU forward takes ~1.5 s at 512 here, 0.2 s at 64).
    i = _inputs(cfg, L=512 if layout == "bfl" else 64)
    assert rel_err(_ours(ours, i), _reference(m.ref_transformer, cfg, i)) <= 1e-5


def test_guidance_changes_dev_output(tiny_models):
    """The guidance embedding is live: a different guidance value gives a different velocity."""
    m = tiny_models("dev")
    ours = load_transformer(m.spec.transformer, WeightSource(m.bfl_dir / m.spec.transformer_file),
                            dtype=mx.float32)
    i = _inputs(m.spec.transformer, L=64)
    a = _ours(ours, i)
    i["g"] = np.array([2.5], np.float32)
    assert rel_err(_ours(ours, i), a) > 1e-3


@pytest.mark.parametrize("store", ["bf16", "fp16"])
def test_half_precision_sources(tiny_models, store, tmp_path):
    """bf16 / fp16 checkpoints load; the result equals the reference run on the rounded weights."""
    m = tiny_models("klein-4b")
    cfg = m.spec.transformer
    half = {k: f32_to_bf16(v) if store == "bf16" else v.astype(np.float16) for k, v in m.transformer.items()}
    path = tmp_path / "half.safetensors"
    save_safetensors(path, half)
    source = WeightSource(path)
    ours = load_transformer(cfg, source, dtype=mx.float32)
    from conftest import diffusers_transformer

    from flux2_mlx.weights import to_float32
    rounded = {k: to_float32(e.load()) for k, e in transformer_entries(source).items()}
    i = _inputs(cfg, L=64)
    assert rel_err(_ours(ours, i), _reference(diffusers_transformer(cfg, rounded), cfg, i)) <= 1e-5


def test_timestep_rounds_like_bfl_in_bf16():
    """BFL makes t bf16, then takes 1000·t in bf16: t = 0.9973 → 0.99609375 → 996.0."""
    from flux2_mlx.mlx_backend.layers import timestep_embedding

    got = timestep_embedding(mx.array([0.9973], dtype=mx.bfloat16))
    want = timestep_embedding(mx.array([0.996], dtype=mx.float32)).astype(mx.bfloat16)
    assert got.dtype == mx.bfloat16
    assert np.array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))
    # In float32 nothing is rounded: 997.3 differs from 996.
    assert not np.allclose(np.array(timestep_embedding(mx.array([0.9973]))),
                           np.array(want.astype(mx.float32)))


def test_bf16_model_tracks_float32(tiny_models):
    m = tiny_models("dev")
    path = WeightSource(m.bfl_dir / m.spec.transformer_file)
    i = _inputs(m.spec.transformer, L=64)
    i["t"] = np.array([0.5], np.float32)  # 1000·t = 500 and 1000·g = 4000 are exact in bf16
    f32 = _ours(load_transformer(m.spec.transformer, path, dtype=mx.float32), i)
    bf16_model = load_transformer(m.spec.transformer, path, dtype=mx.bfloat16)
    out = bf16_model(*(mx.array(i[k]) for k in ("x", "x_ids", "t", "ctx", "ctx_ids", "g")))
    assert out.dtype == mx.bfloat16
    assert rel_err(np.array(out.astype(mx.float32)), f32) < 3e-2


def test_default_dtype_is_float32_on_cpu():
    from flux2_mlx.mlx_backend import resolve_dtype

    assert mx.default_device() == mx.cpu and resolve_dtype(None) == mx.float32
    assert resolve_dtype("bfloat16") == mx.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


def _refs(cfg, sizes, seed=1):
    """Reference tokens (1, R, C) and their ids for references of `sizes` latent cells."""
    from flux2_mlx.sampling import prc_refs
    rng = np.random.default_rng(seed)
    tokens = sum(h * w for h, w in sizes)
    return rng.standard_normal((1, tokens, cfg.in_channels)).astype(np.float32), prc_refs(sizes)


@pytest.mark.parametrize("variant", ["dev", "klein-4b"])
def test_reference_tokens_match_diffusers(tiny_models, variant):
    """References join the image tokens with t = 10, 20, … and their outputs are dropped."""
    m = tiny_models(variant)
    cfg = m.spec.transformer
    ours = load_transformer(cfg, WeightSource(m.bfl_dir / m.spec.transformer_file), dtype=mx.float32)
    i = _inputs(cfg, L=64)
    ref, ref_ids = _refs(cfg, [(2, 4), (5, 3), (3, 3)])
    got = np.array(ours(mx.array(i["x"]), mx.array(i["x_ids"]), mx.array(i["t"]), mx.array(i["ctx"]),
                        mx.array(i["ctx_ids"]), mx.array(i["g"]), ref=mx.array(ref),
                        ref_ids=mx.array(ref_ids)))
    joint = dict(i, x=np.concatenate([i["x"], ref], 1), x_ids=np.concatenate([i["x_ids"], ref_ids], 1))
    want = _reference(m.ref_transformer, cfg, joint)[:, : i["x"].shape[1]]
    assert got.shape == want.shape == i["x"].shape
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got, _ours(ours, i)) > 1e-3  # the references are live


def test_kv_extract_and_cached_match_diffusers(tiny_models):
    """klein 9B KV: the first step runs the references at t = 0, attending only to themselves, and caches
    their K/V per block; later steps attend to the cache. Both equal diffusers' KV transformer."""
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )
    m = tiny_models("klein-9b-kv")
    cfg = m.spec.transformer
    for block in m.ref_transformer.transformer_blocks:  # what Flux2KleinKVPipeline does
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in m.ref_transformer.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    ours = load_transformer(cfg, WeightSource(m.bfl_dir / m.spec.transformer_file), dtype=mx.float32)
    ref, ref_ids = _refs(cfg, [(4, 2), (3, 5)])
    R = ref.shape[1]
    cache = []
    for step, t in enumerate([0.9, 0.4]):
        i = _inputs(cfg, L=64, seed=step)
        i["t"] = np.array([t], np.float32)
        kw = dict(ref=mx.array(ref), ref_ids=mx.array(ref_ids)) if step == 0 else {}
        got = np.array(ours(mx.array(i["x"]), mx.array(i["x_ids"]), mx.array(i["t"]), mx.array(i["ctx"]),
                            mx.array(i["ctx_ids"]), kv_cache=cache, **kw))
        args = dict(encoder_hidden_states=torch.from_numpy(i["ctx"]), timestep=torch.from_numpy(i["t"]),
                    txt_ids=torch.from_numpy(i["ctx_ids"]).long(), guidance=None, return_dict=False)
        with torch.no_grad():
            if step == 0:
                want, ref_cache = m.ref_transformer(
                    hidden_states=torch.from_numpy(np.concatenate([ref, i["x"]], 1)),
                    img_ids=torch.from_numpy(np.concatenate([ref_ids, i["x_ids"]], 1)).long(),
                    kv_cache_mode="extract", num_ref_tokens=R, **args)
            else:
                (want,) = m.ref_transformer(hidden_states=torch.from_numpy(i["x"]),
                                            img_ids=torch.from_numpy(i["x_ids"]).long(),
                                            kv_cache=ref_cache, kv_cache_mode="cached", **args)
        assert len(cache) == cfg.depth + cfg.depth_single_blocks
        assert all(k.shape == (1, cfg.num_heads, R, cfg.head_dim) for k, _ in cache)
        assert rel_err(got, want.numpy()) <= 1e-5
    # The cached K/V are the ones diffusers stored (diffusers keeps (B, L, heads, D)).
    k0, v0 = ref_cache.get_double(0).get()
    assert rel_err(np.array(cache[0][0]), k0.numpy().transpose(0, 2, 1, 3)) <= 1e-5
    # A KV model without references runs the standard forward.
    i = _inputs(cfg, L=64)
    assert rel_err(np.array(ours(mx.array(i["x"]), mx.array(i["x_ids"]), mx.array(i["t"]), mx.array(i["ctx"]),
                                 mx.array(i["ctx_ids"]), kv_cache=[])),
                   _reference(m.ref_transformer, cfg, i)) <= 1e-5
