"""BFL's / Comfy-Org's FP8 and NVFP4 transformer files (ComfyUI's mixed-precision layers): built by
comfy-kitchen's own quantizers, read strictly, decoded bit for bit as comfy-kitchen decodes them, and run
natively (MLX's nvfp4 / mxfp8 matmuls; torch decoding each layer just in time)."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from comfy_kitchen.tensor.fp8 import TensorCoreFP8Layout
from comfy_kitchen.tensor.mxfp8 import TensorCoreMXFP8Layout
from comfy_kitchen.tensor.nvfp4 import TensorCoreNVFP4Layout
from conftest import random_transformer, random_vae, rel_err

from flux2_mlx.config import tiny_spec
from flux2_mlx.dit_names import transformer_entries
from flux2_mlx.entries import Entry
from flux2_mlx.quant.scaled import MXFP8, NVFP4, ScaledFP8, mlx_layout
from flux2_mlx.sampling import prc_img, prc_txt
from flux2_mlx.weights import (
    F8_E4M3,
    F8_E8M0,
    WeightsError,
    WeightSource,
    f32_to_bf16,
    save_safetensors,
    to_float32,
)

CFG = tiny_spec("klein-4b").transformer
LAYOUT = {"float8_e4m3fn": TensorCoreFP8Layout, "nvfp4": TensorCoreNVFP4Layout,
          "mxfp8": TensorCoreMXFP8Layout}
# Formats cycled over the matrices: "nvfp4!" is nvfp4 with full_precision_matrix_mult, None plain bf16.
CYCLE = ["nvfp4", "float8_e4m3fn", None, "nvfp4", "nvfp4!", "float8_e4m3fn", "mxfp8"]


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu):
        return t.view(torch.uint8).numpy().view(F8_E4M3 if t.dtype == torch.float8_e4m3fn else F8_E8M0)
    return t.numpy()


def comfy_quantize(a: np.ndarray, fmt: str, scale=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({suffix: tensor} as comfy-kitchen serializes the layer, comfy-kitchen's eager dequantization)."""
    layout = LAYOUT[fmt]
    q, params = layout.quantize(torch.from_numpy(a), **({} if fmt == "mxfp8" else {"scale": scale}))
    parts = {s: _np(t) for s, t in layout.state_dict_tensors(q, params).items()}
    return parts, layout.dequantize(q, params).numpy()


def write_file(path, tensors, formats, layout="tensors", prefix="model.diffusion_model."):
    """A BFL-named transformer file with the matrices of `formats` quantized, marked per layer by
    `.comfy_quant` tensors ("tensors"), the header's `_quantization_metadata` ("header"), both, as ComfyUI
    saves them ("both"), or ComfyUI's legacy `scaled_fp8` names ("legacy"). Returns the dequantized
    weights (comfy-kitchen's values, float32)."""
    out, dense, layers = {}, {}, {}
    for k, a in tensors.items():
        fmt = formats.get(k)
        if fmt is None:
            out[prefix + k] = f32_to_bf16(a)
            dense[k] = to_float32(out[prefix + k])
            continue
        layer = k.removesuffix(".weight")
        parts, dense[k] = comfy_quantize(a, fmt.rstrip("!"))
        conf = {"format": fmt.rstrip("!")}
        if fmt.endswith("!"):
            conf["full_precision_matrix_mult"] = True
        if layout == "legacy":
            out[f"{prefix}{k}"], out[f"{prefix}{layer}.scale_weight"] = parts[""], parts["_scale"]
            out[f"{prefix}{layer}.scale_input"] = np.float32(1.0).reshape(())
            continue
        out.update({f"{prefix}{k}{s}": t for s, t in parts.items()})
        out[f"{prefix}{layer}.input_scale"] = np.float32(0.5).reshape(())
        if layout in ("tensors", "both"):
            out[f"{prefix}{layer}.comfy_quant"] = np.frombuffer(json.dumps(conf).encode(), np.uint8)
        layers[prefix + layer] = conf
    meta = None
    if layout in ("header", "both"):
        meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    if layout == "legacy":
        out[prefix + "scaled_fp8"] = np.zeros(0, np.uint8).view(F8_E4M3)
    save_safetensors(path, out, meta)
    return dense


def _formats(tensors, cycle=CYCLE):
    matrices = [k for k, a in tensors.items() if a.ndim == 2]
    return {k: f for k, f in zip(matrices, cycle * len(matrices)) if f is not None}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny klein transformer, every layout written once: {layout: (path, dense weights)}."""
    root = tmp_path_factory.mktemp("comfy_quant")
    tensors = random_transformer(CFG, seed=7)
    legacy = {k: "float8_e4m3fn" for k in _formats(tensors)}
    files = {"tensors": (tensors, _formats(tensors), "model.diffusion_model."),
             "header": (tensors, _formats(tensors), ""),
             "both": (tensors, _formats(tensors), "model.diffusion_model."),
             "legacy": (tensors, legacy, "model.diffusion_model.")}
    return {name: (root / f"{name}.safetensors", write_file(root / f"{name}.safetensors", t, f, name, p))
            for name, (t, f, p) in files.items()}


@pytest.mark.parametrize("layout", ["tensors", "header", "both", "legacy"])
def test_each_layout_loads_strictly_and_decodes_as_comfy_kitchen(tiny, layout):
    path, dense = tiny[layout]
    entries = transformer_entries(WeightSource(path))
    assert entries.keys() == dense.keys()
    stored = {e.stored for e in entries.values()}
    assert stored == ({"FP8", "BF16"} if layout == "legacy" else {"FP8", "MXFP8", "NVFP4", "BF16"})
    for k, e in entries.items():
        a = e.load()
        ours = a.dequantize() if isinstance(a, (ScaledFP8, NVFP4, MXFP8)) else to_float32(a)
        assert ours.shape == e.shape and np.array_equal(ours.view(np.uint32), dense[k].view(np.uint32)), k


def _pattern(n: int, k: int) -> np.ndarray:
    """Values NVFP4 holds exactly with weight_scale_2 = 1: E2M1 codes times a power of two per (row, block),
    neither symmetric in a byte's two codes nor across the scale tiles; each block holds a ±6."""
    i, j = np.arange(n)[:, None], np.arange(k)[None, :]
    codes = (3 * i + 5 * j + (j // 16)) % 16
    codes = np.where(j % 16 == i % 16, 7 + 8 * (i % 2), codes)  # the block's largest magnitude, 6
    exp = (7 * i + 3 * (j // 16)) % 9 - 4
    return (np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)[codes]
            * np.exp2(exp)).astype(np.float32)


def test_nibble_order_and_scale_swizzle_on_a_non_symmetric_pattern():
    w = _pattern(144, 96)  # two 128-row tiles, 6 blocks a row padded to 8: every swizzle edge
    parts, ref = comfy_quantize(w, "nvfp4", scale=1.0)
    t = NVFP4(parts[""], parts["_scale"].view(np.uint8), np.float32(parts["_scale_2"]))
    assert np.array_equal(t.dequantize(), w) and np.array_equal(ref, w)
    p = t.packed
    swapped = NVFP4(((p << 4) | (p >> 4)).astype(np.uint8), t.block_scales, t.scale)
    assert not np.array_equal(swapped.dequantize(), w)  # low nibble first would be wrong
    flat = np.zeros_like(t.block_scales)
    flat[:144, :6] = t.block_scales.reshape(-1)[:144 * 6].reshape(144, 6)
    assert not np.allclose(NVFP4(p, flat, t.scale).dequantize(), w)  # row-major scales would be wrong


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "nvfp4", "mxfp8"])
def test_mlx_layout_holds_the_same_values(fmt):
    import mlx.core as mx

    a = np.random.default_rng(1).standard_normal((144, 64)).astype(np.float32)
    parts, ref = comfy_quantize(a, fmt)
    t = {"float8_e4m3fn": lambda: ScaledFP8(parts[""], np.float32(parts["_scale"])),
         "nvfp4": lambda: NVFP4(parts[""], parts["_scale"].view(np.uint8), np.float32(parts["_scale_2"])),
         "mxfp8": lambda: MXFP8(parts[""], parts["_scale"].view(np.uint8))}[fmt]()
    q = mlx_layout(t)
    group, bits = (16, 4) if q.mode == "nvfp4" else (32, 8)
    values = np.array(mx.dequantize(mx.array(q.weight), mx.array(q.scales), group_size=group, bits=bits,
                                    mode=q.mode, dtype=mx.float32))
    # a per-tensor scale goes on the matmul's output: the layout holds the values at scale 1, exactly
    assert np.array_equal(values, t.dequantize() if fmt == "mxfp8" else
                          dataclasses.replace(t, scale=np.float32(1)).dequantize())
    assert rel_err(values * q.scale, ref) < 1e-7 and np.array_equal(t.dequantize(), ref)


def _dense_entries(dense):
    return {k: Entry(a.shape, lambda a=a: a) for k, a in dense.items()}


def _inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 6, CFG.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((1, 16, CFG.context_in_dim)).astype(np.float32)
    return x, prc_img(2, 3), np.array([0.6], np.float32), ctx, prc_txt(16), np.array([3.5], np.float32)


def _mlx_forward(model):
    import mlx.core as mx

    return np.array(model(*(mx.array(a) for a in _inputs())))


@pytest.fixture(scope="module")
def mlx_outputs(tiny):
    """MLX forwards: the native file and the same values loaded dense, per layout."""
    import mlx.core as mx

    from flux2_mlx.mlx_backend import load_transformer

    out = {}
    for layout in ("tensors", "legacy"):
        path, dense = tiny[layout]
        native = load_transformer(CFG, WeightSource(path), dtype=mx.float32)
        out[layout] = (native, _mlx_forward(native),
                       _mlx_forward(load_transformer(CFG, _dense_entries(dense), dtype=mx.float32)))
    return out


@pytest.mark.parametrize("layout", ["tensors", "legacy"])
def test_mlx_runs_the_file_natively_as_the_dense_model_of_its_values(mlx_outputs, layout):
    from flux2_mlx.mlx_backend.quant_layers import FPLinear

    model, ours, ref = mlx_outputs[layout]
    blk = model.double_blocks[1]
    if layout == "tensors":  # CYCLE over the matrices in order: txt_in is the 2nd, time_in.in_layer the 3rd
        assert [m.mode for m in (model.img_in, model.txt_in, model.single_stream_modulation.lin)] == [
            "nvfp4", "mxfp8", "mxfp8"]  # FP8 runs as mxfp8, and so does MXFP8
        assert not isinstance(model.time_in.in_layer, FPLinear)
    assert isinstance(blk.img_attn.qkv, FPLinear)
    if layout == "tensors":  # 5th matrix: nvfp4 with full_precision_matrix_mult, decoded once
        assert not isinstance(model.double_stream_modulation_img.lin, FPLinear)
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("layout", ["tensors", "legacy"])
def test_torch_decodes_per_layer_as_the_dense_model_and_matches_mlx(tiny, mlx_outputs, layout):
    import flux2_mlx.torch_backend as tb
    from flux2_mlx.torch_backend.quant_layers import ScaledLinear

    path, dense = tiny[layout]
    model = tb.load_transformer(CFG, WeightSource(path), dtype=torch.float32)
    assert isinstance(model.double_blocks[1].img_attn.qkv, ScaledLinear)
    if layout == "tensors":  # full_precision_matrix_mult changes nothing here: every layer decodes per call
        assert isinstance(model.double_stream_modulation_img.lin, ScaledLinear)
    with torch.no_grad():
        ours = model(*(tb.from_numpy(a) for a in _inputs())).numpy()
        ref = tb.load_transformer(CFG, _dense_entries(dense), dtype=torch.float32)(
            *(tb.from_numpy(a) for a in _inputs())).numpy()
    assert np.array_equal(ours, ref)  # the same float32 weights, decoded in the same order
    assert rel_err(ours, mlx_outputs[layout][1]) < 1e-5


def test_info_tells_the_format_of_each_layer_kind_and_the_planner_counts_them_as_each_backend_holds_them(
        tiny):
    from flux2_mlx.info import describe
    from flux2_mlx.memory import component_weights

    path, dense = tiny["tensors"]
    lines = describe(path)
    assert ("linear layers: 9 NVFP4, 8 FP8, 4 BF16, 4 NVFP4 full-precision matmul, 4 MXFP8; MLX decodes the "
            "full-precision-matmul ones once to the compute dtype") in lines
    assert ["double_blocks.*.txt_attn.qkv", "1", "MXFP8,", "1", "NVFP4"] in [line.split() for line in lines]
    assert lines[-1] == ("size: 5.9 MiB; on MLX about 7.9 MiB (FP8 / MXFP8 / NVFP4 layers as stored, the "
                         "rest in bfloat16; on torch about 5.9 MiB)")
    entries = transformer_entries(WeightSource(path))
    assert sum(e.full_precision for e in entries.values()) == 4

    def size(e, torch):  # NVFP4: half a byte a weight and an E4M3 byte per 16; FP8 and MXFP8: E8M0 per 32
        n = math.prod(e.shape)
        if e.full_precision and not torch:  # MLX holds these decoded in the compute dtype, torch as stored
            return 2 * n
        fp8 = n + 4 if torch else n + n // 32  # torch: the codes and their one float32 scale
        return {"NVFP4": n // 2 + n // 16, "FP8": fp8, "MXFP8": n + n // 32}.get(e.stored, 2 * n)

    for torch_ in (False, True):
        w = component_weights("transformer", entries, ("double_blocks", "single_blocks"), 2, fp8_kept=torch_)
        assert w.total == sum(size(e, torch_) for e in entries.values())


def _one_layer(tmp_path, fmt="nvfp4", marker=None, drop=(), replace=None, shape=(32, 64)):
    """A file holding one marked layer (img_in) with its tensors as comfy-kitchen writes them, edited."""
    a = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    parts, _ = comfy_quantize(a, fmt)
    p = "model.diffusion_model.img_in."
    out = {p + "weight" + s: t for s, t in parts.items() if "weight" + s not in drop}
    out[p + "comfy_quant"] = np.frombuffer(json.dumps(marker or {"format": fmt}).encode(), np.uint8)
    out.update({p + k: v for k, v in (replace or {}).items()})
    save_safetensors(tmp_path / "bad.safetensors", out)
    return tmp_path / "bad.safetensors"


@pytest.mark.parametrize("case, message", [
    ({"marker": {"format": "int4_awq"}}, "layer img_in is marked as format 'int4_awq', which flux2-mlx does "
                                         "not run (it runs float8_e4m3fn, mxfp8, nvfp4)"),
    ({"replace": {"weight_scale": np.zeros((32, 4), np.uint8).view(F8_E4M3)}},
     "layer img_in: weight_scale is F8_E4M3 [32, 4], expected F8_E4M3 [128, 4] (block scales of a 32 × 64 "
     "NVFP4 weight in 128 × 4 tiles)"),
    ({"fmt": "float8_e4m3fn", "drop": ("weight_scale",)}, "layer img_in is marked float8_e4m3fn but has no "
                                                          "weight_scale"),
    ({"replace": {"weight": np.zeros((32, 12), np.uint8)}},  # K = 24: one and a half blocks
     "layer img_in is marked nvfp4 but its weight is U8 [32, 12]; NVFP4 rows are uint8 pairs of codes, whole "
     "blocks of 16"),
    ({"drop": ("weight_scale_2",)}, "layer img_in is marked nvfp4 but has no weight_scale_2"),
])
def test_bad_input_is_one_error_line_naming_the_file_and_the_layer(tmp_path, case, message):
    from click.testing import CliRunner

    from flux2_mlx.cli import main

    path = _one_layer(tmp_path, **case)
    with pytest.raises(WeightsError, match="^" + re.escape(f"{path}: {message}")):
        transformer_entries(WeightSource(path))
    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [f"error: {path}: {message}"]


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_streamed_blocks_load_their_quantized_layers_the_same_way(tiny, mlx_outputs, backend):
    import mlx.core as mx

    import flux2_mlx.mlx_backend as mb
    import flux2_mlx.torch_backend as tb
    from flux2_mlx.memory import Streaming

    be, dtype = (mb, mx.float32) if backend == "mlx" else (tb, torch.float32)
    model = be.load_transformer(CFG, WeightSource(tiny["tensors"][0]), dtype=dtype,
                                streaming=Streaming(1, False))
    ours = be.to_numpy(model(*(be.from_numpy(a) for a in _inputs())))
    assert rel_err(ours, mlx_outputs["tensors"][1]) < (1e-12 if backend == "mlx" else 1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
@pytest.mark.parametrize("input_scale", [0.05, None])
def test_fp8_matmul_equals_its_float64_emulation_and_nears_the_decoded_weight(device, input_scale):
    from flux2_mlx.torch_backend.quant_layers import E4M3_MAX, ScaledLinear

    rng = np.random.default_rng(3)
    parts, dense = comfy_quantize(rng.standard_normal((64, 96)).astype(np.float32) / 10, "float8_e4m3fn")
    codes = torch.from_numpy(parts[""].view(np.uint8)).view(torch.float8_e4m3fn).to(device)
    scale = torch.from_numpy(parts["_scale"]).to(device)
    act = None if input_scale is None else torch.tensor(input_scale, device=device)
    layer = ScaledLinear(codes, scale, torch.float32, input_scale=act, fp8_matmul=True)
    x = torch.from_numpy(rng.standard_normal((2, 5, 96)).astype(np.float32)).to(device)
    y = layer(x).cpu().double().numpy()
    sx = act if act is not None else x.abs().amax() / E4M3_MAX  # float32, as the layer rounds it
    xq = (x / sx).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).double().cpu().numpy()
    emulated = xq @ codes.double().cpu().numpy().T * float(sx) * float(parts["_scale"])
    assert rel_err(y, emulated) < 1e-6
    assert rel_err(y, x.cpu().numpy() @ dense.T) < 3e-2  # the activations' rounding to e4m3


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_lora_runs_beside_the_stored_layers(tiny, tmp_path, backend):
    """A LoRA (with a LyCORIS DoRA) on FP8, MXFP8 and NVFP4 layers stays a branch beside them, never a dense
    copy; one forward equals the decoded model with the LoRAs merged."""
    from test_lora_dora import BACKENDS, _dense_entries, _forward, _lycoris_file

    from flux2_mlx.config import transformer_shapes
    from flux2_mlx.lora import merged_entries, read_lora

    path, dense = tiny["tensors"]
    shapes = transformer_shapes(CFG)
    rng = np.random.default_rng(5)
    tensors = {}
    # NVFP4, FP8, MXFP8, and NVFP4 marked for a full-precision matmul (MLX holds it decoded: merged there)
    for name in ("double_blocks.1.img_attn.qkv", "double_blocks.1.img_mlp.0", "single_blocks.1.linear1",
                 "double_blocks.0.img_mlp.0"):
        n, k = shapes[name + ".weight"]
        down, up = (rng.standard_normal(s).astype(np.float32) / 10 for s in ((4, k), (n, 4)))
        tensors[f"diffusion_model.{name}.lora_A.weight"] = down
        tensors[f"diffusion_model.{name}.lora_B.weight"] = up
    save_safetensors(tmp_path / "lora.safetensors", tensors)
    dora, _ = _lycoris_file(tmp_path, "locon", True, seed=6)
    loras = [(read_lora(tmp_path / "lora.safetensors", shapes), 0.7), (read_lora(dora, shapes), 0.5)]
    entries = transformer_entries(WeightSource(path))
    targeted = {e.stored for name, e in entries.items() if any(name in lo.terms for lo, _ in loras)}
    assert {"FP8", "MXFP8", "NVFP4"} <= targeted
    be = BACKENDS[backend]
    merged = merged_entries(entries, loras)
    assert merged["double_blocks.1.img_attn.qkv.weight"].stored == "NVFP4"  # planned as stored + the branch
    ours = _forward(be, merged)
    want = _forward(be, merged_entries(_dense_entries(dense), loras))
    assert rel_err(ours, want) <= 1e-5
    assert rel_err(want, _forward(be, _dense_entries(dense))) > 1e-2


def test_convert_reads_the_decoded_values(tiny, tmp_path):
    from flux2_mlx import convert as conv

    path, dense = tiny["tensors"]
    out = conv.convert(path, tmp_path / "out.gguf", "BF16", progress=False, jobs=1)
    back = {k: to_float32(e.load()) for k, e in transformer_entries(WeightSource(out)).items()}
    # BF16 holds the decoded values rounded once (norms stay float32)
    assert all(np.array_equal(back[k], to_float32(f32_to_bf16(a))) or np.array_equal(back[k], a)
               for k, a in dense.items())


def test_pipeline_runs_an_fp8_nvfp4_transformer(tiny, tmp_path):
    from flux2_mlx import load_pipeline

    spec = tiny_spec("klein-4b")
    path, dense = tiny["tensors"]
    save_safetensors(tmp_path / "decoded.safetensors", dense)
    save_safetensors(tmp_path / "original.safetensors", random_transformer(CFG, seed=7))
    save_safetensors(tmp_path / "ae.safetensors", random_vae(spec.vae))
    embeds = np.random.default_rng(1).standard_normal((1, 16, CFG.context_in_dim)).astype(np.float32)
    kw = dict(prompt_embeds=embeds, width=32, height=48, steps=2, seed=3)
    q, ref, original = (load_pipeline(spec, transformer=p, vae=tmp_path / "ae.safetensors").sample(**kw)
                        for p in (path, tmp_path / "decoded.safetensors", tmp_path / "original.safetensors"))
    assert rel_err(q, ref) < 1e-5 < 1e-2 < rel_err(q, original)  # the file's values, not the original's
