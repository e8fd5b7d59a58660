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
from flux2_mlx.weights import WeightsError, save_safetensors

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
    out = {k.replace(".base_layer", ""): v.detach().numpy() for k, v in model.state_dict().items()
           if ".lora_" not in k and ".lokr_" not in k}
    for k in [k for k in out if k.endswith(("to_qkv.weight", "to_added_qkv.weight"))]:
        # the fused projection is the one in use; its unfused parts keep the base weights
        parts = ("to_q", "to_k", "to_v") if k.endswith(".to_qkv.weight") else ("add_q_proj", "add_k_proj",
                                                                                 "add_v_proj")
        for p in parts:
            del out[k.rsplit(".", 2)[0] + f".{p}.weight"]
    return out


def _delta(lora, name: str, scale: float = 1.0) -> np.ndarray:
    """ΔW of one BFL weight: what Lora.add_to adds to it."""
    out = np.zeros(SHAPES[name], np.float32)
    lora.add_to(out, name, scale)
    return out


def _ours(files: list, scales: list[float]) -> dict[str, np.ndarray]:
    out = dict(BASE)
    for path, s in zip(files, scales):
        lora = read_lora(path, SHAPES)
        assert not lora.unmatched and not lora.text_encoder
        for name in lora.terms:
            out[name] = out[name] + _delta(lora, name, s)
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


def _bfl_file(path, seed: int, prefix: str = "diffusion_model.") -> dict[str, np.ndarray]:
    """A BFL-named LoRA as ai-toolkit writes it (or BFL's trainer, prefix `base_model.model.`); ranks 3 and 6
    on the fused targets, one down matrix shared by the Q, K and V rows."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for m in TARGETS:
        up, down = _low_rank(rng, *SHAPES[f"{m}.weight"], _rank(m))
        tensors[f"{prefix}{m}.lora_A.weight"], tensors[f"{prefix}{m}.lora_B.weight"] = down, up
    save_safetensors(path, tensors)
    return tensors


def _without_norm_out(theirs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers 0.42's BFL-LoRA converter renames final_layer.adaLN_modulation.1 to norm_out.linear without
    swapping lora_B's (shift, scale) halves as its checkpoint converter does for the weight, so its result
    there is wrong; the tests check that layer against B @ A directly instead."""
    return {k: v for k, v in theirs.items() if k != "norm_out.linear.weight"}


@pytest.mark.parametrize("prefix", ["diffusion_model.", "base_model.model."])
def test_bfl_format(tmp_path, prefix):
    t = _bfl_file(tmp_path / "b.safetensors", 2, prefix)
    ours = _ours([tmp_path / "b.safetensors"], [1.0])
    _assert_same(ours, _without_norm_out(_diffusers_fused([tmp_path / "b.safetensors"], [1.0])), set(TARGETS))
    m = f"{prefix}final_layer.adaLN_modulation.1"
    name = "final_layer.adaLN_modulation.1.weight"
    assert rel_err(ours[name] - BASE[name], t[f"{m}.lora_B.weight"] @ t[f"{m}.lora_A.weight"]) <= 1e-6


def test_two_loras_summed(tmp_path):
    """Scales 0.7 and −0.3 together, as diffusers' set_adapters with the same weights."""
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    _bfl_file(files[0], 3)
    _bfl_file(files[1], 4)
    theirs = _without_norm_out(_diffusers_fused(files, [0.7, -0.3]))
    _assert_same(_ours(files, [0.7, -0.3]), theirs, set(TARGETS))


@pytest.mark.parametrize("sparse", [False, True])
def test_kohya_format_with_alpha(tmp_path, sparse):
    """kohya / musubi names with `.alpha` (scale alpha / rank). Rank 6 on the fused QKV: a dense up matrix
    (one shared down) and a block-diagonal one (each of Q, K, V using its own 2 ranks), the two cases
    diffusers' converter splits differently; neither may be split by rank blindly."""
    rng = np.random.default_rng(5)
    tensors = {}
    for m in KOHYA_TARGETS:
        r = _rank(m)
        up, down = _low_rank(rng, *SHAPES[f"{m}.weight"], r)
        if sparse and m.endswith("qkv"):
            third = up.shape[0] // 3
            for j in range(3):
                up[:j * third, 2 * j:2 * j + 2] = 0
                up[(j + 1) * third:, 2 * j:2 * j + 2] = 0
        k = "lora_unet_" + m.replace(".", "_")
        tensors[f"{k}.lora_down.weight"], tensors[f"{k}.lora_up.weight"] = down, up
        tensors[f"{k}.alpha"] = np.array(r * 1.5 if r != 4 else 2.0, np.float32)
    save_safetensors(tmp_path / "k.safetensors", tensors)
    ours = _ours([tmp_path / "k.safetensors"], [1.0])
    _assert_same(ours, _diffusers_fused([tmp_path / "k.safetensors"], [1.0]), set(KOHYA_TARGETS))


def _lokr_factors(rng, rows: int, cols: int, decomposed: bool) -> dict[str, np.ndarray]:
    w1 = rng.standard_normal((4, 4)).astype(np.float32)
    if not decomposed:
        w2 = rng.standard_normal((rows // 4, cols // 4)).astype(np.float32) * 0.1
        return {"lokr_w1": w1, "lokr_w2": w2}
    a, b = _low_rank(rng, rows // 4, cols // 4, 2)
    return {"lokr_w1": w1, "lokr_w2_a": a, "lokr_w2_b": b}


def test_lokr_bfl_format(tmp_path):
    """LoKr on BFL names (ai-toolkit): kron(w1, w2_a @ w2_b) · alpha / rank, and full factors (no alpha
    scaling); diffusers fuses its Q, K, V projections to take the fused-QKV LoKr. The final adaLN (full
    factors) is checked against kron(w1, w2) directly (see _without_norm_out)."""
    rng = np.random.default_rng(6)
    tensors = {}
    for i, m in enumerate(TARGETS):
        f = _lokr_factors(rng, *SHAPES[f"{m}.weight"], decomposed=i % 2 == 0)
        tensors.update({f"diffusion_model.{m}.{k}": v for k, v in f.items()})
        tensors[f"diffusion_model.{m}.alpha"] = np.array(3.0, np.float32)
    save_safetensors(tmp_path / "lokr.safetensors", tensors)
    ours = _ours([tmp_path / "lokr.safetensors"], [0.9])
    theirs = _without_norm_out(_diffusers_fused([tmp_path / "lokr.safetensors"], [0.9]))
    _assert_same(ours, theirs, set(TARGETS))
    m, name = "diffusion_model.final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1.weight"
    want = 0.9 * np.kron(tensors[f"{m}.lokr_w1"], tensors[f"{m}.lokr_w2"])
    assert rel_err(ours[name] - BASE[name], want) <= 1e-6


def test_lokr_lycoris_format_on_separate_q_k_v(tmp_path):
    """LyCORIS LoKr on diffusers' separate to_q / add_k_proj …: each lands in its third of the fused QKV."""
    rng = np.random.default_rng(7)
    modules = {"transformer_blocks_0_attn_to_q": (256, 256),
               "transformer_blocks_0_attn_add_k_proj": (256, 256),
               "transformer_blocks_1_ff_linear_in": SHAPES["double_blocks.1.img_mlp.0.weight"],
               "single_transformer_blocks_0_attn_to_qkv_mlp_proj": SHAPES["single_blocks.0.linear1.weight"]}
    tensors = {}
    for k, shape in modules.items():
        tensors.update({f"lycoris_{k}.{n}": v for n, v in _lokr_factors(rng, *shape, True).items()})
        tensors[f"lycoris_{k}.alpha"] = np.array(1.0, np.float32)
    save_safetensors(tmp_path / "lyco.safetensors", tensors)
    ours = _ours([tmp_path / "lyco.safetensors"], [1.0])
    changed = {"double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.1.img_mlp.0",
               "single_blocks.0.linear1"}
    _assert_same(ours, _diffusers_fused([tmp_path / "lyco.safetensors"], [1.0]), changed)


def test_loha_against_numpy(tmp_path):
    """LoHa (diffusers has no loader for it): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank, built here
    directly, on a kohya-named fused QKV and on diffusers' to_v (the last third of the same kind of QKV)."""
    rng = np.random.default_rng(8)
    f = {f"hada_w{i}_{j}": rng.standard_normal(s).astype(np.float32)
         for i in "12" for j, s in (("a", (768, 4)), ("b", (4, 256)))}
    g = {f"hada_w{i}_{j}": rng.standard_normal(s).astype(np.float32)
         for i in "12" for j, s in (("a", (256, 2)), ("b", (2, 256)))}
    tensors = {f"lora_unet_double_blocks_0_img_attn_qkv.{k}": v for k, v in f.items()}
    tensors |= {f"lycoris_transformer_blocks_1_attn_to_v.{k}": v for k, v in g.items()}
    tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = np.array(2.0, np.float32)
    save_safetensors(tmp_path / "loha.safetensors", tensors)
    lora = read_lora(tmp_path / "loha.safetensors", SHAPES)
    want = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * 0.5
    assert rel_err(_delta(lora, "double_blocks.0.img_attn.qkv.weight", 0.6), 0.6 * want) <= 1e-6
    want = np.zeros((768, 256), np.float32)
    want[512:] = (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])
    assert rel_err(_delta(lora, "double_blocks.1.img_attn.qkv.weight"), want) <= 1e-6


def test_onetrainer_names_equal_the_same_factors_under_peft_names(tmp_path):
    """OneTrainer writes diffusers module paths the kohya way (`lora_transformer_` prefix, underscores,
    lora_down/up and a per-module alpha): the same merge as those factors under PEFT names with lora_alpha."""
    rng = np.random.default_rng(5)
    peft, onetrainer = {}, {}
    for d, bfl in _diffusers_modules().items():
        rows, cols = SHAPES[f"{bfl}.weight"]
        up, down = _low_rank(rng, rows // 3 if bfl.endswith("qkv") else rows, cols, 4)
        peft[f"transformer.{d}.lora_A.weight"], peft[f"transformer.{d}.lora_B.weight"] = down, up
        k = "lora_transformer_" + d.replace(".", "_")
        onetrainer[f"{k}.lora_down.weight"], onetrainer[f"{k}.lora_up.weight"] = down, up
        onetrainer[f"{k}.alpha"] = np.array(6.0, np.float32)
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 6})}
    save_safetensors(tmp_path / "peft.safetensors", peft, meta)
    save_safetensors(tmp_path / "onetrainer.safetensors", onetrainer)
    assert read_lora(tmp_path / "onetrainer.safetensors", SHAPES).format == "kohya"
    ours, theirs = (_ours([tmp_path / f"{n}.safetensors"], [0.9]) for n in ("onetrainer", "peft"))
    assert all(np.array_equal(ours[k], theirs[k]) for k in BASE)
    assert {k for k in BASE if not np.array_equal(ours[k], BASE[k])} == {f"{m}.weight" for m in TARGETS}


def test_peft_adapter_names_and_unmatched_and_text_encoder_keys(tmp_path):
    """`.default.` adapter names read like plain PEFT keys; keys for layers this model lacks (a block past
    its depth, FLUX.1's img_mod) are listed, text-encoder keys are listed apart, nothing is applied."""
    rng = np.random.default_rng(9)
    up, down = _low_rank(rng, 256, 256, 4)
    plain = {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": down,
             "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": up}
    extra = {"transformer.transformer_blocks.0.attn.to_k.lora_A.default.weight": down,
             "transformer.transformer_blocks.0.attn.to_k.lora_B.default.weight": up,
             "transformer.transformer_blocks.7.attn.to_k.lora_A.default.weight": down,
             "diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight": down,
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
             "text_encoder.layers.0.q_proj.lora_A.weight": down}
    save_safetensors(tmp_path / "plain.safetensors", plain)
    save_safetensors(tmp_path / "extra.safetensors", extra)
    lora = read_lora(tmp_path / "extra.safetensors", SHAPES)
    assert lora.unmatched == ["transformer.transformer_blocks.7.attn.to_k.lora_A.default.weight",
                              "diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight"]
    assert lora.text_encoder == ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                                 "text_encoder.layers.0.q_proj.lora_A.weight"]
    name = "double_blocks.0.img_attn.qkv.weight"
    theirs = _diffusers_fused([tmp_path / "plain.safetensors"], [1.0])
    ours = BASE[name] + _delta(lora, name)
    assert rel_err(ours[256:512], theirs["transformer_blocks.0.attn.to_k.weight"]) <= 1e-5
    assert list(lora.terms) == [name]


def test_unknown_format(tmp_path):
    save_safetensors(tmp_path / "u.safetensors", {"double_blocks.0.img_attn.qkv.weight": np.zeros((2, 2))})
    with pytest.raises(WeightsError, match=r"format guess: none recognised\); first unknown key "
                                           r"'double_blocks.0.img_attn.qkv.weight'"):
        read_lora(tmp_path / "u.safetensors", SHAPES)


def test_flux1_lora_names_layer_and_both_shapes(tmp_path):
    """A FLUX.1 LoRA (hidden size 3072) uses the same BFL names with other shapes: refused, one line."""
    save_safetensors(tmp_path / "f1.safetensors", {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": np.zeros((16, 3072), np.float32),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": np.zeros((9216, 16), np.float32)})
    with pytest.raises(WeightsError, match=r"double_blocks.0.img_attn.qkv has shape \[9216, 3072\] but the "
                                           r"model's double_blocks.0.img_attn.qkv.weight needs \[768, 256\]"):
        read_lora(tmp_path / "f1.safetensors", SHAPES)


def test_lokr_bare_diffusers_names_on_swapped_final_adaln(tmp_path):
    """LoKr with bare diffusers module names (SimpleTuner): on norm_out.linear, whose (scale, shift) halves
    are BFL's (shift, scale), the dense Kronecker product is moved half for half."""
    rng = np.random.default_rng(10)
    tensors = {}
    for k, shape in {"norm_out.linear": (512, 256), "transformer_blocks.1.attn.to_v": (256, 256)}.items():
        tensors.update({f"{k}.{n}": v for n, v in _lokr_factors(rng, *shape, True).items()})
        tensors[f"{k}.alpha"] = np.array(4.0, np.float32)
    save_safetensors(tmp_path / "st.safetensors", tensors)
    ours = _ours([tmp_path / "st.safetensors"], [1.0])
    changed = {"final_layer.adaLN_modulation.1", "double_blocks.1.img_attn.qkv"}
    _assert_same(ours, _diffusers_fused([tmp_path / "st.safetensors"], [1.0]), changed)
