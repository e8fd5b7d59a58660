"""torch's native NVFP4 matmul (quant_layers.nvfp4_linear): its activation quantizer against
comfy-kitchen's, its math emulated in float64 on the CPU, the CPU's choice to decode, and the real kernel on
a Blackwell GPU."""

import comfy_kitchen as ck
import numpy as np
import pytest
import torch
from conftest import rel_err
from torch import nn
from torch.nn import functional as F

from flux2_mlx.comfy_quant import scaled_entries
from flux2_mlx.quant.scaled import E2M1, FPQuant, comfy_marker, nvfp4_lsb_first, quantize_nvfp4, unswizzle
from flux2_mlx.torch_backend import quant_layers as ql
from flux2_mlx.weights import F8_E4M3, WeightSource, fp8_e4m3_to_f32, save_safetensors

TIES = [6, 5, 3.5, 2.5, 1.75, 1.25, .75, .25, -6, -5, -3.5, -2.5, -1.75, -1.25, -.75, -.25]


def _activations(m: int, k: int) -> torch.Tensor:
    """Columns of growing scale, an all-zero block, a block of -0, and a block at every E2M1 tie (with the
    per-tensor scale 0.25 its block scale is 4 exactly, so the values reach the rounding unscaled)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(m, k, generator=g) * torch.linspace(.1, 3, k) + .2
    x[1, 16:32] = 0
    x[2, 32:48] = -0.0
    x[3, :16] = torch.tensor(TIES)
    return x


def test_activation_quantizer_is_comfy_kitchens_bit_for_bit():
    x, s = _activations(40, 96), torch.tensor(.25)
    codes, tiles = ql.quantize_nvfp4(x, s)
    ck_codes, ck_tiles = ck.quantize_nvfp4(x, s, hi_first=False)  # torch's order: element 2j low
    assert torch.equal(codes, ck_codes) and torch.equal(tiles, ck_tiles.view(torch.uint8))
    assert tiles.shape == (128, 8)  # 40 rows, 6 blocks: one tile high, padded to 4-block columns
    stored, _ = ck.quantize_nvfp4(x, s)  # the files' order: element 2j high
    assert torch.equal(codes, (stored << 4) | (stored >> 4))
    assert codes[3, :8].tolist() == [0x67, 0x46, 0x24, 0x02, 0xEF, 0xCE, 0xAC, 0x8A]  # ties to even codes


def _emulated_mm(a, a_tiles, a_scale, b, b_tiles, b_scale, dtype):
    """What cuBLAS's NVFP4 matmul computes, in float64: both operands decoded with their block scales,
    multiplied, times the two per-tensor scales."""
    def decode(codes, tiles):
        c = codes.numpy()
        n, half = c.shape
        v = E2M1.astype(np.float64)[np.stack([c & 15, c >> 4], -1).reshape(n, 2 * half)]
        block = fp8_e4m3_to_f32(unswizzle(tiles.numpy(), n, half // 8).view(F8_E4M3)).astype(np.float64)
        return (v.reshape(n, -1, 16) * block[..., None]).reshape(n, 2 * half)
    return torch.from_numpy(decode(a, a_tiles) @ decode(b, b_tiles).T * float(a_scale) * float(b_scale))


def _layer(n: int, k: int, input_scale, native: bool, device="cpu", dtype=torch.float32):
    rng = np.random.default_rng(9)
    stored = quantize_nvfp4((rng.standard_normal((n, k)) / 10).astype(np.float32))
    q = nvfp4_lsb_first(stored)
    act = None if input_scale is None else torch.tensor(input_scale, device=device)
    q = FPQuant(*(torch.from_numpy(np.asarray(a)).to(device) for a in (q.weight, q.scales, q.scale)), "nvfp4",
                input_scale=act)
    if native:
        return ql.ScaledLinear(q.weight, q.scale, dtype, q.scales, q.input_scale, nvfp4_matmul=True), stored
    return ql.quantized_layer(nn.Linear(k, n, bias=False, device="meta"), q, dtype), stored


@pytest.mark.parametrize("input_scale", [5e-3, None])
def test_native_math_emulated_equals_comfy_kitchens_values_and_nears_the_decoded_weight(input_scale):
    layer, stored = _layer(144, 96, input_scale, native=True)  # two 128-row tiles of weight scales
    assert torch.equal(layer.dense(), torch.from_numpy(stored.dequantize()))  # swizzled, the same values
    x = _activations(2 * 19, 96).reshape(2, 19, 96)  # 38 tokens: padded to 48 rows
    y = ql.nvfp4_linear(x, layer.weight, layer.block_scales, layer.scale, layer.input_scale, torch.float32,
                        mm=_emulated_mm)
    x2 = x.reshape(-1, 96)
    sx = torch.tensor(input_scale) if input_scale else x2.abs().amax() / (448 * 6)
    qx, tiles = ck.quantize_nvfp4(x2, sx)
    xq = ck.dequantize_nvfp4(qx, sx, tiles, output_type=torch.float32).numpy()
    ref = xq @ stored.dequantize().astype(np.float64).T
    assert y.shape == (2, 19, 144) and rel_err(y.reshape(-1, 144), ref) < 1e-6
    decoded = F.linear(x, layer.dense()).numpy()
    assert .05 < rel_err(y, decoded) < .12  # the activations rounded to E2M1 (one mantissa bit)


def test_the_cpu_decodes_and_its_output_is_unchanged():
    assert ql.nvfp4_matmul_kind(torch.device("cpu"), torch.float32) == "decode"
    layer, stored = _layer(144, 96, 5e-3, native=False)
    assert isinstance(layer, ql.ScaledLinear) and not layer.nvfp4_matmul
    x = _activations(7, 96)
    assert torch.equal(layer(x), F.linear(x, torch.from_numpy(stored.dequantize())))


def _blackwell() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (10, 12)


@pytest.mark.skipif(not _blackwell(), reason="needs a CUDA GPU of compute capability 10.x or 12.x (FP4 MMA)")
@pytest.mark.parametrize("input_scale", [5e-3, None])
def test_the_real_fp4_matmul_equals_its_emulation(input_scale):
    dev = torch.device("cuda")
    assert ql.nvfp4_matmul_kind(dev, torch.bfloat16) == "native"
    layer, _ = _layer(144, 96, input_scale, native=False, device=dev, dtype=torch.bfloat16)
    assert layer.nvfp4_matmul
    x = _activations(38, 96).to(dev, torch.bfloat16)
    y = layer(x).float().cpu()
    w, tiles, scale, act = (None if a is None else a.cpu()
                            for a in (layer.weight, layer.block_scales, layer.scale, layer.input_scale))
    emulated = ql.nvfp4_linear(x.cpu(), w, tiles, scale, act, torch.float32, mm=_emulated_mm)
    assert rel_err(y, emulated) < 8e-3  # the bf16 output's rounding


def test_a_files_nvfp4_input_scale_is_kept_for_the_torch_layer(tmp_path):
    stored = quantize_nvfp4(np.random.default_rng(2).standard_normal((32, 64)).astype(np.float32))
    one = np.ones((), np.float32)
    parts = {"weight": stored.packed, "weight_scale": stored.block_scales.view(F8_E4M3),
             "weight_scale_2": one * stored.scale, "input_scale": one / 2,
             "comfy_quant": comfy_marker("nvfp4")}
    path = tmp_path / "l.safetensors"
    save_safetensors(path, {f"l.{s}": a for s, a in parts.items()})
    entries, _ = scaled_entries(WeightSource(path), {f"l.{s}": f"l.{s}" for s in parts}, "")
    q = nvfp4_lsb_first(entries["l.weight"].load())
    assert q.input_scale == np.float32(.5) and not q.full_precision
