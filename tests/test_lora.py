"""LoRA files (flux2_mlx.lora) against diffusers' own loader, on the tiny klein-4b transformer, CPU float32.

Each test writes a LoRA file with the key names a trainer writes and random low-rank factors, reads it with
`read_lora`, and compares W + ΔW (BFL names) with the weights diffusers has after `lora_state_dict` (which
converts the BFL, kohya and LyCORIS formats with diffusers' converters), `load_lora_adapter` and
`fuse_lora`. diffusers has no LoHa loader, so LoHa is checked against a direct numpy Hadamard product.
"""

import json

import numpy as np
import pytest
from conftest import diffusers_transformer, random_transformer, rel_err

from flux2_mlx.config import tiny_spec, transformer_shapes
from flux2_mlx.dit_names import transformer_to_diffusers
from flux2_mlx.lora import read_lora
from flux2_mlx.weights import save_safetensors

pytest.importorskip("peft")
CFG = tiny_spec("klein-4b").transformer
SHAPES = transformer_shapes(CFG)
BASE = random_transformer(CFG)
# BFL modules a LoRA targets here: both fused QKVs, projections, MLPs, fused linear1/linear2, embedders,
# the modulations and the final adaLN (whose halves diffusers swaps)
TARGETS = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "double_blocks.0.img_attn.proj",
           "double_blocks.1.txt_attn.proj", "double_blocks.0.img_mlp.0", "double_blocks.1.txt_mlp.2",
           "single_blocks.0.linear1", "single_blocks.1.linear2", "img_in", "txt_in", "time_in.in_layer",
           "double_stream_modulation_img.lin", "single_stream_modulation.lin",
           "final_layer.adaLN_modulation.1", "final_layer.linear"]
# diffusers' kohya converter knows the blocks, embedders and final linear only
KOHYA_TARGETS = TARGETS[:10] + ["time_in.in_layer", "final_layer.linear"]


def _rank(module: str) -> int:
    return 6 if module.endswith("qkv") else 3 if module.endswith("linear1") else 4


def _low_rank(rng, rows: int, cols: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(up, down) whose product is about as large as the weights (so ΔW is not lost in W's rounding)."""
    up = rng.standard_normal((rows, r)).astype(np.float32) / np.sqrt(r)
    down = rng.standard_normal((r, cols)).astype(np.float32) / np.sqrt(cols) * 0.5
    return up, down


def _diffusers_modules() -> dict[str, str]:
    """diffusers module → BFL module, for the unfused targets."""
    out = {}
    for bfl in TARGETS:
        for d in transformer_to_diffusers({f"{bfl}.weight": np.zeros(SHAPES[f"{bfl}.weight"])}):
            out[d.removesuffix(".weight")] = bfl
    return out


def _diffusers_fused(files: list, scales: list[float]) -> dict[str, np.ndarray]:
    """diffusers' transformer weights after loading each LoRA file as an adapter and fusing them at these
    scales; fused QKV projections (diffusers fuses them for BFL LoKr files) are kept under their names."""
    from diffusers import Flux2Pipeline

    model = diffusers_transformer(CFG, BASE)
    names = [f"a{i}" for i in range(len(files))]
    for path, name in zip(files, names):
        sd, meta = Flux2Pipeline.lora_state_dict(str(path), return_lora_metadata=True)
        model.load_lora_adapter(sd, adapter_name=name, prefix="transformer", metadata=meta)
    model.set_adapters(names, scales)
    model.fuse_lora(adapter_names=names)
    return {k.replace(".base_layer", ""): v.detach().numpy() for k, v in model.state_dict().items()
            if ".lora_" not in k and ".lokr_" not in k}


def _ours(files: list, scales: list[float]) -> dict[str, np.ndarray]:
    out = dict(BASE)
    for path, s in zip(files, scales):
        lora = read_lora(path, SHAPES)
        assert not lora.unmatched and not lora.text_encoder
        for name in lora.terms:
            out[name] = out[name] + lora.delta(name, s)
    return out


def _assert_same(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], changed: set[str]) -> None:
    """Every diffusers weight equals ours (≤1e-5 relative), and exactly the `changed` BFL weights moved."""
    ours_d = transformer_to_diffusers(ours)
    for i in range(CFG.depth):
        p = f"transformer_blocks.{i}.attn"
        ours_d[f"{p}.to_qkv.weight"] = ours[f"double_blocks.{i}.img_attn.qkv.weight"]
        ours_d[f"{p}.to_added_qkv.weight"] = ours[f"double_blocks.{i}.txt_attn.qkv.weight"]
    for k, v in theirs.items():
        assert rel_err(ours_d[k], v) <= 1e-5, k
    assert {k for k in ours if not np.array_equal(ours[k], BASE[k])} == {f"{m}.weight" for m in changed}


def test_diffusers_peft_format_with_alpha_in_metadata(tmp_path):
    """diffusers/PEFT names, ranks 3/4/6 onto fused targets, PEFT's lora_alpha / r from the metadata."""
    rng = np.random.default_rng(1)
    tensors = {}
    for d, bfl in _diffusers_modules().items():
        rows = len(np.split(np.zeros(SHAPES[f"{bfl}.weight"][0]), 3)[0]) if bfl.endswith("qkv") else None
        up, down = _low_rank(rng, rows or SHAPES[f"{bfl}.weight"][0], SHAPES[f"{bfl}.weight"][1], 4)
        tensors[f"transformer.{d}.lora_A.weight"], tensors[f"transformer.{d}.lora_B.weight"] = down, up
    config = {"r": 4, "lora_alpha": 6, "target_modules": sorted(_diffusers_modules())}
    meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_safetensors(tmp_path / "d.safetensors", tensors, meta)
    ours = _ours([tmp_path / "d.safetensors"], [0.8])
    _assert_same(ours, _diffusers_fused([tmp_path / "d.safetensors"], [0.8]), set(TARGETS))
