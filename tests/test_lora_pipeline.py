"""LoRAs applied through the Python API (load_pipeline(loras=...), Pipeline.set_loras) on the tiny klein-4b,
CPU float32: whole samplings equal diffusers' Flux2KleinPipeline with the same adapters on the same noise,
on both backends, streamed or resident; changing LoRAs re-merges from the original weights."""

import json
import types

import numpy as np
import pytest
from conftest import diffusers_run, diffusers_transformer, rel_err
from test_lora import KOHYA_TARGETS, SHAPES, _diffusers_modules, _low_rank, _rank

from flux2_mlx import load_pipeline
from flux2_mlx.lora import sha256_prefix
from flux2_mlx.weights import WeightsError, save_safetensors

pytest.importorskip("peft")
L, SIDE, STEPS, SEED = 64, 64, 2, 4


def _peft_file(path, seed: int):
    """diffusers/PEFT names on every unfused target, lora_alpha / r from the adapter metadata."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for d, bfl in _diffusers_modules().items():
        rows, cols = SHAPES[f"{bfl}.weight"]
        up, down = _low_rank(rng, rows // 3 if bfl.endswith("qkv") else rows, cols, 4)
        tensors[f"transformer.{d}.lora_A.weight"], tensors[f"transformer.{d}.lora_B.weight"] = down, up
    config = {"r": 4, "lora_alpha": 6, "target_modules": sorted(_diffusers_modules())}
    meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_safetensors(path, tensors, meta)
    return path


def _kohya_file(path, seed: int):
    rng = np.random.default_rng(seed)
    tensors = {}
    for m in KOHYA_TARGETS:
        up, down = _low_rank(rng, *SHAPES[f"{m}.weight"], _rank(m))
        k = "lora_unet_" + m.replace(".", "_")
        tensors[f"{k}.lora_down.weight"], tensors[f"{k}.lora_up.weight"] = down, up
        tensors[f"{k}.alpha"] = np.array(1.5 * _rank(m), np.float32)
    save_safetensors(path, tensors)
    return path


@pytest.fixture(scope="module")
def case(tiny_models, tmp_path_factory):
    """(model, prompt embeddings, LoRA files by name)."""
    m = tiny_models("klein-4b")
    d = tmp_path_factory.mktemp("loras")
    files = {"peft": _peft_file(d / "peft.safetensors", 1), "peft2": _peft_file(d / "peft2.safetensors", 2),
             "kohya": _kohya_file(d / "kohya.safetensors", 3)}
    embeds = np.random.default_rng(0).standard_normal((1, L, m.spec.transformer.context_in_dim))
    return m, embeds.astype(np.float32), files


def _sample(pipe, embeds):
    return pipe.sample(prompt_embeds=embeds, width=SIDE, height=SIDE, steps=STEPS, seed=SEED)


def _diffusers(m, embeds, loras):
    """diffusers' Flux2KleinPipeline on a fresh copy of the transformer with these (path, scale) adapters."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(scheduler=None, vae=m.ref_vae, text_encoder=None, tokenizer=None,
                              transformer=diffusers_transformer(m.spec.transformer, m.transformer))
    names = [f"a{i}" for i in range(len(loras))]
    for (path, _), name in zip(loras, names):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, [s for _, s in loras])
    noise = np.random.default_rng(SEED).standard_normal((1, 128, SIDE // 16, SIDE // 16), dtype=np.float32)
    lora_model = types.SimpleNamespace(ref_vae=m.ref_vae, ref_transformer=pipe.transformer)
    return diffusers_run(lora_model, "klein-4b", embeds, None, noise, steps=STEPS, guidance=1.0,
                         output_type="latent", width=SIDE, height=SIDE)


@pytest.fixture(scope="module")
def base(case):
    m, embeds, _ = case
    return _sample(load_pipeline(m.spec, model_path=m.bfl_dir, backend="mlx"), embeds)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # PEFT, on diffusers' second adapter
@pytest.mark.parametrize("loras", [[("peft", 0.8)], [("kohya", 0.8)], [("peft", 0.7), ("peft2", -0.3)]],
                         ids=["peft", "kohya", "two"])
def test_sampling_with_loras_equals_diffusers_on_both_backends(case, base, loras):
    m, embeds, files = case
    loras = [(files[name], s) for name, s in loras]
    want = _diffusers(m, embeds, loras)
    outs = {b: _sample(load_pipeline(m.spec, model_path=m.bfl_dir, backend=b, loras=loras), embeds)
            for b in ("mlx", "torch")}
    for b, out in outs.items():
        assert rel_err(out, want) <= 1e-4, b
    assert rel_err(outs["mlx"], outs["torch"]) <= 1e-4
    assert rel_err(outs["mlx"], base) > 1e-2  # the LoRA is live


def test_set_loras_switches_without_drift_and_records_them(case, base):
    m, embeds, files = case
    a, b = [(files["peft"], 0.8)], [(files["kohya"], 0.5), (files["peft2"], -0.3)]
    pipe = load_pipeline(m.spec, model_path=m.bfl_dir, backend="mlx", loras=a)
    assert pipe.loras == ((str(files["peft"]), 0.8),)
    first = _sample(pipe, embeds)
    pipe.set_loras(b)
    other = _sample(pipe, embeds)
    pipe.set_loras(a)
    assert np.array_equal(_sample(pipe, embeds), first) and not np.array_equal(other, first)
    image = pipe.generate(prompt_embeds=embeds, width=SIDE, height=SIDE, steps=STEPS, seed=SEED)
    assert image.info["loras"] == [{"file": "peft.safetensors", "sha256": sha256_prefix(files["peft"]),
                                    "scale": 0.8}]
    pipe.set_loras([])
    assert np.array_equal(_sample(pipe, embeds), base) and pipe.loras == ()
    assert "loras" not in pipe.generate(prompt_embeds=embeds, width=SIDE, height=SIDE, steps=1, seed=1).info


def test_streamed_equals_resident_with_a_lora(case):
    m, embeds, files = case
    loras = [(files["kohya"], 0.8)]
    resident = _sample(load_pipeline(m.spec, model_path=m.bfl_dir, backend="mlx", memory="resident",
                                     loras=loras), embeds)
    for source in ("ram", "disk"):
        # 0.05 GB: the tiny transformer's blocks past the first are streamed (asserted below)
        pipe = load_pipeline(m.spec, model_path=m.bfl_dir, backend="mlx", memory_budget=0.05,
                             stream_from=source, loras=loras)
        assert pipe.plan(SIDE, SIDE).streaming("denoise") is not None
        assert np.array_equal(_sample(pipe, embeds), resident), source


def test_warning_for_unmatched_and_text_encoder_keys(case, tmp_path):
    m, _, _ = case
    up, down = _low_rank(np.random.default_rng(0), 256, 256, 4)
    save_safetensors(tmp_path / "x.safetensors", {
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": down,
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": up,
        "transformer.transformer_blocks.9.attn.to_k.lora_A.weight": down,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down})
    with pytest.warns(UserWarning, match=r"x.safetensors: 1 keys match no layer of this transformer \(trans"
                                         r"former.transformer_blocks.9.attn.to_k.lora_A.weight\); its 1 text-"
                                         r"encoder keys are not applied"):
        load_pipeline(m.spec, model_path=m.bfl_dir, backend="mlx", loras=[(tmp_path / "x.safetensors", 1)])


def test_bad_loras_are_refused_and_change_nothing(case, tmp_path):
    m, embeds, files = case
    pipe = load_pipeline(m.spec, model_path=m.bfl_dir, backend="mlx", loras=[(files["peft"], 0.8)])
    before = _sample(pipe, embeds)
    save_safetensors(tmp_path / "f1.safetensors", {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": np.zeros((16, 3072), np.float32),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": np.zeros((9216, 16), np.float32)})
    with pytest.raises(WeightsError, match=r"double_blocks.0.img_attn.qkv has shape \[9216, 3072\] but the "
                                           r"model's double_blocks.0.img_attn.qkv.weight needs \[768, 256\]"):
        pipe.set_loras([(files["kohya"], 1.0), (tmp_path / "f1.safetensors", 1.0)])
    for bad, match in (([(tmp_path / "none.safetensors", 1.0)], "LoRA file not found"),
                       ([(files["kohya"], "0.5")], "must be a number"),
                       ([files["kohya"]], r"a \(path, scale\) pair")):
        with pytest.raises(ValueError, match=match):
            pipe.set_loras(bad)
    assert pipe.loras == ((str(files["peft"]), 0.8),)
    assert np.array_equal(_sample(pipe, embeds), before)

