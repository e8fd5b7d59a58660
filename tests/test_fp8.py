"""FP8 (Qwen/Qwen3-*-FP8) text-encoder checkpoints: exact e4m3 decode, exact block dequantization,
and a tiny FP8-layout Qwen3 that loads through `load_text_encoder` and matches transformers on the
dequantized weights."""

import dataclasses
import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import ShapeSource, rel_err
from safetensors.torch import save_file
from test_text_encoder_parity import _inputs, _randomize, hf_model
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize, _dequantize_fp8_weight

from flux2_mlx.config import QWEN3_4B, QWEN3_8B, text_encoder_shapes, tiny_spec
from flux2_mlx.encoder_names import text_encoder_entries
from flux2_mlx.entries import check_keys
from flux2_mlx.mlx_backend import load_text_encoder
from flux2_mlx.weights import (
    F8_E4M3,
    F8_E5M2,
    FP8Blocks,
    SafetensorsFile,
    WeightsError,
    WeightSource,
    fp8_e4m3_to_f32,
    fp8_e5m2_to_f32,
    save_safetensors,
    to_float32,
)

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantize_blockwise(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Fp8Quantize math (per-block amax → scale = 448 / amax, store 1 / scale, clamp, cast),
    extended to a short last block per axis (zero padding leaves each block's amax unchanged)."""
    (n, k), (bn, bk) = w.shape, block
    rn, rk = -(-n // bn), -(-k // bk)
    padded = torch.zeros(rn * bn, rk * bk)
    padded[:n, :k] = w.float()
    tiles = padded.reshape(rn, bn, rk, bk)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, FP8_MAX / amax, torch.ones_like(amax))
    inv = (1.0 / scale).float()
    q = (tiles * scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(rn * bn, rk * bk)[:n, :k].contiguous(), inv


def as_numpy_fp8(q: torch.Tensor) -> np.ndarray:
    return q.view(torch.uint8).numpy().view(F8_E4M3)


# (a) ------------------------------------------------------------------------------------------------------

def test_e4m3_table_matches_torch_for_all_256_codes():
    bits = np.arange(256, dtype=np.uint8)
    ref = torch.tensor(bits, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    ours = fp8_e4m3_to_f32(bits.view(F8_E4M3))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)  # NaN equals NaN here
    assert np.array_equal(np.signbit(ours), np.signbit(ref))  # -0.0 and the NaN signs too
    assert np.isnan(ours[[0x7F, 0xFF]]).all() and np.isnan(ours).sum() == 2 and not np.isinf(ours).any()
    assert ours[0x7E] == 448 and ours[0x01] == 2.0 ** -9 and ours[0x08] == 2.0 ** -6


def test_e5m2_table_matches_torch():
    bits = np.arange(256, dtype=np.uint8)
    ref = torch.tensor(bits, dtype=torch.uint8).view(torch.float8_e5m2).float().numpy()
    np.testing.assert_array_equal(fp8_e5m2_to_f32(bits.view(F8_E5M2)), ref)


def test_fp8_dtypes_round_trip_through_safetensors(tmp_path):
    bits = np.arange(256, dtype=np.uint8).reshape(16, 16)
    save_safetensors(tmp_path / "x.safetensors", {"a": bits.view(F8_E4M3), "b": bits.view(F8_E5M2)})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert (f.dtype("a"), f.dtype("b")) == ("F8_E4M3", "F8_E5M2")
    assert f.get("a").dtype == F8_E4M3 and f.get("a").shape == (16, 16)
    np.testing.assert_array_equal(to_float32(f.get("a")), fp8_e4m3_to_f32(bits))
    # torch's own writer names the dtype the same way
    save_file({"w": torch.from_numpy(bits).view(torch.float8_e4m3fn)}, tmp_path / "t.safetensors")
    np.testing.assert_array_equal(to_float32(SafetensorsFile(tmp_path / "t.safetensors").get("w")),
                                  fp8_e4m3_to_f32(bits))


# (b) ------------------------------------------------------------------------------------------------------

def test_block_dequant_equals_torch_for_a_ragged_shape():
    """300 × 200 in 128 × 128 blocks: a 3 × 2 grid whose last row and column of blocks are short."""
    w = (torch.randn(300, 200, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16()
    w[:128, :128] *= 40  # blocks with very different scales
    w[128:256, 128:] = 0  # an all-zero block keeps scale 1
    q, inv = quantize_blockwise(w, (128, 128))
    assert inv.shape == (3, 2)
    ref = _dequantize_fp8_weight(q, inv, [128, 128], torch.float32).numpy()
    ours = FP8Blocks(as_numpy_fp8(q), inv.numpy(), (128, 128)).dequantize()
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)
    assert rel_err(ours, w.float().numpy()) < 0.05  # and it is the weight, up to FP8 rounding


def test_block_dequant_equals_transformers_fp8_quantize_and_dequantize():
    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=[128, 128],
                                                                    scale_fmt="float"))
    w = (torch.randn(256, 384, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16()
    out = Fp8Quantize(quantizer).convert({"x.weight": w})
    q, inv = out["x.weight"], out["x.weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and inv.shape == (2, 3)
    ref = Fp8Dequantize(quantizer)._dequantize_one(q, inv, output_dtype=torch.float32).numpy()
    np.testing.assert_array_equal(FP8Blocks(as_numpy_fp8(q), inv.numpy(), (128, 128)).dequantize(), ref)
    mine_q, mine_inv = quantize_blockwise(w, (128, 128))  # the test's quantizer is transformers' math
    assert torch.equal(mine_q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(mine_inv, inv)


# (c) ------------------------------------------------------------------------------------------------------

def _fp8_checkpoint(te, folder, block, with_config):
    """A tiny random Qwen3 saved the way Qwen/Qwen3-*-FP8 is: Linears F8_E4M3 + F32 weight_scale_inv,
    norms and embeddings bf16. The HF model is updated in place to the exact weights the file encodes."""
    model = _randomize(hf_model(te, max(te.output_layers) + 1), seed=0).eval()
    model.set_attn_implementation("sdpa")
    tensors = {}
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is not a separate parameter
            if p.ndim == 2 and ".layers." in name:
                q, inv = quantize_blockwise(p.data, block)
                tensors[name], tensors[name[:-len("weight")] + "weight_scale_inv"] = q, inv
                p.copy_(_dequantize_fp8_weight(q, inv, list(block), torch.float32))
            else:
                tensors[name] = p.data.bfloat16()
                p.copy_(tensors[name].float())
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    if with_config:
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "quantization_config": {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": list(block)}}))
    return model


@pytest.mark.parametrize("block, with_config", [((128, 128), True), ((16, 16), False), ((24, 24), True)],
                         ids=["128-config", "16-from-shapes", "24-ragged-config"])
def test_tiny_fp8_qwen3_matches_transformers_on_the_dequantized_weights(tmp_path, block, with_config):
    """Tiny dims (hidden 32, kv 16, MLP 64) are all under 128, so with the real block size every Linear is one
    short block; 16 gives several blocks per axis (derived from the shapes alone); 24 gives short last
    blocks, which only config.json can pin down."""
    te = tiny_spec("klein-4b").text_encoder
    model = _fp8_checkpoint(te, tmp_path / "fp8", block, with_config)
    source = WeightSource(tmp_path / "fp8")
    assert source.dtype("model.layers.0.mlp.up_proj.weight") == "F8_E4M3"
    entries = text_encoder_entries(source, te)
    assert not any("scale" in k for k in entries)
    up = entries["model.layers.0.mlp.up_proj.weight"]
    assert up.stored == "F8_E4M3" and isinstance(up.load(), FP8Blocks)  # codes and scales, as stored
    assert up.load().dequantize().dtype == np.float32

    # The first 64 of the parity tests' 512 tokens: a prompt of 37 tokens and pads, one of 64 (the FP8
    # weights are what is checked here; MLX's encoder takes 8x longer at 512).
    ids, mask = (a[:, :64] for a in _inputs("qwen3", te.vocab_size))
    with torch.no_grad():
        hs = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   output_hidden_states=True).hidden_states
    expected = torch.cat([hs[k] for k in te.output_layers], dim=-1).numpy()
    ours = load_text_encoder(te, source, dtype=mx.float32)(mx.array(ids), mx.array(mask))
    ours = np.array(ours.astype(mx.float32))
    assert ours.shape == expected.shape and np.isfinite(ours).all()
    real = mask.astype(bool)
    assert rel_err(ours[real], expected[real]) <= 1e-5
    assert rel_err(ours[~real], expected[~real]) <= 1e-5


@pytest.mark.parametrize("te", [QWEN3_4B, QWEN3_8B], ids=lambda te: te.repo_id + "-FP8")
def test_full_size_fp8_key_set_maps_to_the_needed_tensors_with_128_blocks(te):
    shapes = dict(text_encoder_shapes(dataclass_replace_depth(te)))
    for k, s in list(shapes.items()):
        if len(s) == 2 and ".layers." in k:
            shapes[k[:-len("weight")] + "weight_scale_inv"] = (-(-s[0] // 128), -(-s[1] // 128))
    entries = text_encoder_entries(ShapeSource(shapes), te)
    check_keys(entries, text_encoder_shapes(te), te.repo_id + "-FP8")
    # What the entries load (every tensor read as zero bytes): FP8 blocks of 128 x 128 for every matrix.
    loaded = text_encoder_entries(_ZeroSource(shapes), te)
    fp8 = [e.load() for n, e in loaded.items() if ".layers." in n and len(e.shape) == 2]
    assert fp8 and {(type(b), b.block) for b in fp8} == {(FP8Blocks, (128, 128))}


class _ZeroSource(ShapeSource):
    """Shapes only; every tensor reads as zeros (FP8 codes as bytes, scales as float32)."""

    def get(self, k):
        return np.zeros(self.shape(k), np.float32 if k.endswith("_scale_inv") else np.uint8)


def dataclass_replace_depth(te):
    """All 36 layers, as the FP8 repos ship them (the loader drops layers 27..35)."""
    return dataclasses.replace(te, output_layers=(te.num_hidden_layers,))


# (d) ------------------------------------------------------------------------------------------------------

def test_fp8_weight_without_its_scale_is_refused(tmp_path):
    te = tiny_spec("klein-4b").text_encoder
    _fp8_checkpoint(te, tmp_path / "fp8", (128, 128), True)
    source = WeightSource(tmp_path / "fp8")
    gone = "model.layers.3.self_attn.k_proj.weight_scale_inv"
    save_safetensors(tmp_path / "broken.safetensors",
                     {k: np.array(source.get(k)) for k in source.keys() if k != gone})
    with pytest.raises(WeightsError, match=r"model\.layers\.3\.self_attn\.k_proj\.weight is FP8 .*"
                                           r"weight_scale_inv are missing"):
        load_text_encoder(te, WeightSource(tmp_path / "broken.safetensors"), dtype=mx.float32)


def test_scale_grid_that_fits_no_block_size_is_refused(tmp_path):
    w = np.zeros((64, 64), np.uint8).view(F8_E4M3)
    tensors = {"model.embed_tokens.weight": np.zeros((256, 32), np.float32),
               "model.layers.0.mlp.up_proj.weight": w,
               "model.layers.0.mlp.up_proj.weight_scale_inv": np.ones((2, 2), np.float32),
               "model.layers.0.mlp.down_proj.weight": w,
               "model.layers.0.mlp.down_proj.weight_scale_inv": np.ones((3, 3), np.float32)}
    save_safetensors(tmp_path / "x.safetensors", tensors)
    with pytest.raises(WeightsError, match="do not fit any one block size"):
        text_encoder_entries(WeightSource(tmp_path / "x.safetensors"), tiny_spec("klein-4b").text_encoder)
