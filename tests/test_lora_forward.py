"""One transformer forward with a LoRA, per format, on both backends, against diffusers'
Flux2Transformer2DModel with the same file loaded as a live (unfused) adapter: ≤1e-5 relative, and the LoRA
moves the output.

The files are built as in test_lora and test_lora_pipeline (real key names, random low-rank factors, tiny
klein-4b, float32); ours load through `lora.merged_entries`. diffusers 0.42.1's BFL and LoKr converters rename
final_layer.adaLN_modulation.1 without swapping its (shift, scale) halves (see test_lora._without_norm_out),
so those two files leave that layer out; the PEFT file keeps norm_out.linear, which diffusers loads right.
diffusers has no LoHa loader: LoHa is checked against diffusers' forward on W + ΔW formed here in numpy.
"""

import numpy as np
import pytest
from conftest import diffusers_transformer, rel_err
from test_lora import BASE, CFG, SHAPES, TARGETS, _lokr_factors, _low_rank, _rank
from test_lora_pipeline import _kohya_file, _peft_file
from test_transformer_parity import _inputs, _reference

import flux2_mlx.mlx_backend as mb
import flux2_mlx.torch_backend as tb
from flux2_mlx.entries import Entry
from flux2_mlx.lora import merged_entries, read_lora
from flux2_mlx.weights import SafetensorsFile, save_safetensors

SCALE = 0.8
BFL_TARGETS = [m for m in TARGETS if m != "final_layer.adaLN_modulation.1"]  # the converter bug above
LOHA_TARGETS = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1"]
INPUTS = _inputs(CFG, h=2, w=3, L=16)


def _bfl_file(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tensors = {}
    for m in BFL_TARGETS:
        up, down = _low_rank(rng, *SHAPES[f"{m}.weight"], _rank(m))
        tensors[f"diffusion_model.{m}.lora_A.weight"] = down
        tensors[f"diffusion_model.{m}.lora_B.weight"] = up
    save_safetensors(path, tensors)


def _lokr_file(path, seed: int) -> None:
    """Decomposed (alpha / rank) and full (no alpha scaling) factors alternately; w1 scaled down so that ΔW
    is about as large as W instead of swamping it (which would amplify rounding past 1e-5)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for i, m in enumerate(BFL_TARGETS):
        f = _lokr_factors(rng, *SHAPES[f"{m}.weight"], decomposed=i % 2 == 0)
        f["lokr_w1"] *= 0.25
        tensors.update({f"diffusion_model.{m}.{k}": v for k, v in f.items()})
        tensors[f"diffusion_model.{m}.alpha"] = np.array(3.0, np.float32)
    save_safetensors(path, tensors)


def _loha_file(path, seed: int) -> None:
    """kohya-named LoHa on a fused QKV and a linear1, alpha 2 over rank 4."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for m in LOHA_TARGETS:
        k = "lora_unet_" + m.replace(".", "_")
        for i in "12":
            up, down = _low_rank(rng, *SHAPES[f"{m}.weight"], 4)
            tensors[f"{k}.hada_w{i}_a"], tensors[f"{k}.hada_w{i}_b"] = up, down * 4
        tensors[f"{k}.alpha"] = np.array(2.0, np.float32)
    save_safetensors(path, tensors)


def _loha_merged(path) -> dict[str, np.ndarray]:
    """BASE + scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank, straight from the file's factors."""
    f = SafetensorsFile(path)
    out = dict(BASE)
    for m in LOHA_TARGETS:
        a1, b1, a2, b2 = (f.get(f"lora_unet_{m.replace('.', '_')}.hada_w{i}_{j}") for i in "12" for j in "ab")
        out[f"{m}.weight"] = BASE[f"{m}.weight"] + np.float32(SCALE * 0.5) * (a1 @ b1) * (a2 @ b2)
    return out


FORMATS = {"peft": _peft_file, "bfl": _bfl_file, "kohya": _kohya_file, "lokr": _lokr_file, "loha": _loha_file}


@pytest.fixture(scope="module")
def base_out():
    return _reference(diffusers_transformer(CFG, BASE), CFG, INPUTS)


@pytest.fixture(scope="module", params=list(FORMATS))
def case(request, tmp_path_factory):
    """(our merged entries, diffusers' forward with the LoRA) for one format."""
    from diffusers import Flux2Pipeline

    path = tmp_path_factory.mktemp("lora") / f"{request.param}.safetensors"
    FORMATS[request.param](path, len(request.param))
    if request.param == "loha":
        model = diffusers_transformer(CFG, _loha_merged(path))
    else:
        model = diffusers_transformer(CFG, BASE)
        sd, md = Flux2Pipeline.lora_state_dict(str(path), return_lora_metadata=True)
        model.load_lora_adapter(sd, adapter_name="a", prefix="transformer", metadata=md)
        model.set_adapters(["a"], [SCALE])
    lora = read_lora(path, SHAPES)
    assert not lora.unmatched and not lora.text_encoder
    entries = {k: Entry(a.shape, lambda a=a: a) for k, a in BASE.items()}
    return merged_entries(entries, [(lora, SCALE)]), _reference(model, CFG, INPUTS)


@pytest.mark.parametrize("be", [mb, tb], ids=["mlx", "torch"])
def test_forward_with_lora_matches_diffusers(case, base_out, be):
    entries, want = case
    model = be.load_transformer(CFG, entries, dtype=be.resolve_dtype("float32"))
    got = be.to_numpy(model(*(be.from_numpy(INPUTS[k]) for k in ("x", "x_ids", "t", "ctx", "ctx_ids", "g"))))
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got, base_out) > 1e-3
