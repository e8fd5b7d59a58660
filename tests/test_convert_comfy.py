"""`flux2 convert --type fp8 / nvfp4 / mxfp8`: our numpy quantizers equal comfy-kitchen's bit for bit, and a
converted tiny transformer reads back through safetensors + comfy-kitchen's dequantization (as ComfyUI
loads it) and through our own strict loader, whose forward equals the dense model of the same values."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from comfy_kitchen.tensor.fp8 import TensorCoreFP8Layout
from comfy_kitchen.tensor.mxfp8 import TensorCoreMXFP8Layout
from comfy_kitchen.tensor.nvfp4 import TensorCoreNVFP4Layout
from conftest import random_transformer, random_vae, rel_err
from safetensors import safe_open
from safetensors.torch import load_file
from test_fp8_nvfp4 import CFG, _dense_entries, _mlx_forward, _pattern

from flux2_mlx.cli import main
from flux2_mlx.convert import convert
from flux2_mlx.dit_names import transformer_entries
from flux2_mlx.quant.scaled import (
    SCALED,
    f32_to_e4m3,
    quantize_fp8,
    quantize_mxfp8,
    quantize_nvfp4,
    quantize_nvfp4_rows,
)
from flux2_mlx.weights import WeightSource, f32_to_bf16, save_safetensors, to_float32

LAYOUT = {"fp8": TensorCoreFP8Layout, "nvfp4": TensorCoreNVFP4Layout, "mxfp8": TensorCoreMXFP8Layout}
FORMAT = {"fp8": "float8_e4m3fn", "nvfp4": "nvfp4", "mxfp8": "mxfp8"}


def _u8(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy() if t.dtype != torch.uint8 else t.numpy()


def test_e4m3_rounding_equals_torch():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.standard_normal(50_000).astype(np.float32) * s for s in (2e-3, .05, 1, 30, 200)])
    v = np.concatenate([v.clip(-448, 448), np.float32([0, -0., 2 ** -10, 2 ** -9 * 1.5, 448, -448])])
    ref = torch.from_numpy(v).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(f32_to_e4m3(v).view(np.uint8), ref)


@pytest.mark.parametrize("qtype", ["fp8", "nvfp4", "mxfp8"])
@pytest.mark.parametrize("case", ["normal", "heavy-tailed", "pattern"])
def test_quantizers_equal_comfy_kitchen_bit_for_bit(qtype, case):
    rng = np.random.default_rng(1)
    a = {"normal": lambda: rng.standard_normal((256, 192)).astype(np.float32) * .03,
         "heavy-tailed": lambda: (rng.standard_normal((160, 96)) ** 3).astype(np.float32),
         "pattern": lambda: _pattern(160, 96)}[case]()  # non-symmetric in a byte's nibbles and the tiles
    q, params = LAYOUT[qtype].quantize(torch.from_numpy(a))
    ours = {"fp8": quantize_fp8, "nvfp4": quantize_nvfp4, "mxfp8": quantize_mxfp8}[qtype](a)
    if qtype == "fp8":
        assert np.array_equal(ours.codes.view(np.uint8), _u8(q)) and ours.scale == params.scale.item()
    elif qtype == "nvfp4":
        assert np.array_equal(ours.packed, _u8(q)) and ours.scale == params.scale.item()
        assert np.array_equal(ours.block_scales, _u8(params.block_scale))  # swizzled, padded tiles
        assert ours.block_scales.shape == (256, 12 if case == "normal" else 8)
    else:
        assert np.array_equal(ours.codes.view(np.uint8), _u8(q))
        assert np.array_equal(ours.block_scales, _u8(params.scale))
    assert np.array_equal(ours.dequantize(), LAYOUT[qtype].dequantize(q, params).float().numpy())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_comfy")
    src = root / "src.safetensors"
    original = random_transformer(CFG, seed=7)
    save_safetensors(src, original)
    return src, original, {t: convert(src, root / f"{t}.safetensors", t, progress=False, jobs=j)
                 for t, j in (("fp8", 1), ("nvfp4", 2), ("mxfp8", 2))}


def _comfy_dequantize(sd: dict, layer: str, qtype: str) -> np.ndarray:
    """A layer as ComfyUI's mixed-precision ops build it from the file, dequantized by comfy-kitchen."""
    layout, w = LAYOUT[qtype], sd[f"{layer}.weight"]
    if qtype == "fp8":
        params = layout.Params(scale=sd[f"{layer}.weight_scale"], orig_dtype=torch.float32,
                               orig_shape=tuple(w.shape))
    elif qtype == "nvfp4":
        params = layout.Params(scale=sd[f"{layer}.weight_scale_2"], orig_dtype=torch.float32,
                               orig_shape=(w.shape[0], w.shape[1] * 2),
                               block_scale=sd[f"{layer}.weight_scale"])
    else:
        params = layout.Params(scale=sd[f"{layer}.weight_scale"], orig_dtype=torch.float32,
                               orig_shape=tuple(w.shape))
    return layout.dequantize(w, params).numpy()


@pytest.mark.parametrize("qtype", ["fp8", "nvfp4", "mxfp8"])
def test_converted_file_reads_back_in_comfy_kitchen_and_in_our_loader(converted, qtype):
    import mlx.core as mx

    from flux2_mlx.mlx_backend import load_transformer

    src, original, files = converted
    sd = load_file(files[qtype])  # safetensors' own reader: dtypes and shapes as torch sees them
    with safe_open(files[qtype], "pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])
    entries = transformer_entries(WeightSource(files[qtype]))
    decoded, n_quantized = {}, 0
    for name, e in entries.items():
        a = e.load()
        if isinstance(a, SCALED):
            layer = name.removesuffix(".weight")
            assert json.loads(bytes(sd[f"{layer}.comfy_quant"].numpy())) == {"format": FORMAT[qtype]}
            assert meta["layers"].pop(layer) == {"format": FORMAT[qtype]}
            decoded[name] = a.dequantize()
            assert np.array_equal(decoded[name], _comfy_dequantize(sd, layer, qtype)), name
            q, p = LAYOUT[qtype].quantize(torch.from_numpy(original[name]))  # quantized from the source
            assert np.array_equal(decoded[name], LAYOUT[qtype].dequantize(q, p).float().numpy()), name
            assert name.startswith(("double_blocks.", "single_blocks."))
            n_quantized += 1
        else:
            assert sd[name].dtype == torch.bfloat16
            decoded[name] = to_float32(a)
    assert meta == {"format_version": "1.0", "layers": {}}
    assert n_quantized == 20 and not any(k.startswith("model.") for k in sd)  # BFL names, no prefix
    if qtype == "mxfp8":  # its native path is test_fp8_nvfp4's; two forwards here are 1 s of CPU
        return
    native = load_transformer(CFG, WeightSource(files[qtype]), dtype=mx.float32)
    dense = load_transformer(CFG, _dense_entries(decoded), dtype=mx.float32)
    assert rel_err(_mlx_forward(native), _mlx_forward(dense)) <= 1e-5


def test_bad_input_is_one_error_line_exit_2_and_nothing_written(converted, tmp_path):
    from flux2_mlx.config import tiny_spec

    src, _, _ = converted
    vae = tmp_path / "ae.safetensors"
    save_safetensors(vae, random_vae(tiny_spec("klein-4b").vae))
    before = set(os.listdir(tmp_path))
    cases = [([str(vae), str(tmp_path / "o.safetensors"), "-t", "nvfp4"],
              f"error: {vae}: a VAE; --type nvfp4 converts FLUX.2 transformers only"),
             ([str(src), str(tmp_path / "o.safetensors"), "-t", "fp4"],
              "error: unknown type 'fp4'; choose one of: Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q4_0, "
              "Q4_1, Q5_0, Q5_1, Q3_K_M, Q2_K, BF16, F16, FP8, NVFP4, MXFP8"),
             ([str(src), str(vae), "-t", "fp8"], f"error: {vae} already exists; pass --force (force=True) to "
                                                  f"replace it"),
             ([str(src), str(tmp_path / "o.gguf"), "-t", "mxfp8"],
              f"error: {tmp_path / 'o.gguf'}: --type mxfp8 writes a safetensors file; name it o.safetensors")]
    for args, line in cases:
        r = CliRunner().invoke(main, ["convert", *args])
        assert r.exit_code == 2 and r.output.strip().splitlines() == [line]
        assert set(os.listdir(tmp_path)) == before


def test_a_quantized_source_warns_once_and_is_decoded_exactly(converted, tmp_path):
    _, _, files = converted
    with pytest.warns(UserWarning, match="is already quantized: 20 tensors") as record:
        out = convert(files["nvfp4"], tmp_path / "again.safetensors", "fp8", progress=False, jobs=1)
    assert len(record) == 1
    src = transformer_entries(WeightSource(files["nvfp4"]))
    back = transformer_entries(WeightSource(out))
    name = "single_blocks.0.linear1.weight"
    assert np.array_equal(back[name].load().codes, quantize_fp8(src[name].load().dequantize()).codes)
    name = "img_in.weight"  # bf16 in, bf16 out: the same bytes
    assert np.array_equal(to_float32(back[name].load()), to_float32(src[name].load()))


@pytest.mark.parametrize("qtype", ["fp8", "nvfp4"])
def test_a_bf16_source_gives_the_bytes_of_its_float32_values(converted, tmp_path, qtype):
    # a bf16 source's per-tensor scale comes from its bits: it must equal that of the same values in float32
    _, original, _ = converted
    values = {k: to_float32(f32_to_bf16(a)) for k, a in original.items()}
    w = values["single_blocks.0.linear2.weight"]
    w[1, 3] = -4 * np.abs(w).max()  # the largest magnitude negative
    save_safetensors(tmp_path / "bf16.safetensors", {k: f32_to_bf16(a) for k, a in values.items()})
    save_safetensors(tmp_path / "f32.safetensors", values)
    a, b = (convert(tmp_path / f"{s}.safetensors", tmp_path / f"{s}.{qtype}.safetensors", qtype,
                    progress=False, jobs=1) for s in ("bf16", "f32"))
    assert a.read_bytes() == b.read_bytes()


def test_bytes_do_not_depend_on_jobs_and_an_interrupt_leaves_nothing(converted, tmp_path, monkeypatch):
    import flux2_mlx.convert as conv

    src, _, files = converted
    one = convert(src, tmp_path / "one.safetensors", "nvfp4", progress=False, jobs=1)
    assert one.read_bytes() == files["nvfp4"].read_bytes()  # written with jobs=2
    calls = []

    def interrupted(rows, scale):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return quantize_nvfp4_rows(rows, scale)

    monkeypatch.setattr(conv, "quantize_nvfp4_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "cut.safetensors", "nvfp4", progress=False, jobs=2)
    assert sorted(os.listdir(tmp_path)) == ["one.safetensors"]


def test_an_all_zero_tensor_decodes_to_zeros():  # comfy-kitchen divides 0 by 0 there (NaN codes / scales)
    z = np.zeros((32, 64), np.float32)
    for t in (quantize_fp8(z), quantize_nvfp4(z), quantize_mxfp8(z)):
        assert np.array_equal(t.dequantize(), z) and not np.isnan(t.dequantize()).any()
