"""DoRA (PEFT's `lora_magnitude_vector`) on the tiny klein-4b transformer, CPU float32: a file PEFT itself
writes, merged by us, equals diffusers' fused weights (load_lora_adapter + fuse_lora, PEFT's DoRA merge);
stacked with another LoRA or on a GGUF-quantized weight it is refused, one line."""

import pytest
from conftest import diffusers_transformer
from test_lora import BASE, CFG, SHAPES, _assert_same, _bfl_file, _diffusers_fused

from flux2_mlx.entries import Entry
from flux2_mlx.lora import merged_entries, read_lora
from flux2_mlx.weights import WeightsError

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
# separate Q, K, V into one fused qkv, a K into the middle third of another, an MLP, a fused linear1, the
# final adaLN (halves swapped against BFL's) and an embedder
TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
           "transformer_blocks.0.attn.to_v", "transformer_blocks.1.attn.add_k_proj",
           "transformer_blocks.0.ff.linear_in", "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
           "norm_out.linear", "x_embedder"]
CHANGED = {"double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "double_blocks.0.img_mlp.0",
           "single_blocks.0.linear1", "final_layer.adaLN_modulation.1", "img_in"}


@pytest.fixture(scope="module")
def dora_file(tmp_path_factory):
    """PEFT's DoRA adapter on diffusers' transformer, saved by diffusers' save_lora_weights. lora_B starts at
    zero and the magnitudes at ‖W‖ (an identity): both are made random."""
    from diffusers import Flux2Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = diffusers_transformer(CFG, BASE)
    config = LoraConfig(r=4, lora_alpha=6, use_dora=True, target_modules=TARGETS)
    model.add_adapter(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)
    d = tmp_path_factory.mktemp("dora")
    Flux2Pipeline.save_lora_weights(d, transformer_lora_layers=get_peft_model_state_dict(model),
                                    transformer_lora_adapter_metadata=config.to_dict())
    return d / "pytorch_lora_weights.safetensors"


def _dense_entries():
    return {k: Entry(a.shape, lambda a=a: a, "F32") for k, a in BASE.items()}


def test_peft_dora_equals_diffusers_fused(dora_file):
    lora = read_lora(dora_file, SHAPES)
    assert lora.dora and not lora.unmatched
    entries = merged_entries(_dense_entries(), [(lora, 0.8)])
    ours = {k: e.load() for k, e in entries.items()}
    _assert_same(ours, _diffusers_fused([dora_file], [0.8]), CHANGED)


def test_dora_stacked_or_on_gguf_is_refused(dora_file, tmp_path):
    lora = read_lora(dora_file, SHAPES)
    _bfl_file(tmp_path / "b.safetensors", 2)
    other = read_lora(tmp_path / "b.safetensors", SHAPES)
    with pytest.raises(WeightsError, match="is a DoRA LoRA, which cannot be stacked with other LoRAs yet"):
        merged_entries(_dense_entries(), [(lora, 1.0), (other, 0.5)])
    quant = {k: Entry(e.shape, e.load, "Q8_0") for k, e in _dense_entries().items()}
    with pytest.raises(WeightsError, match=r"^DoRA on a quantized \(GGUF\) transformer is not supported yet; "
                                           r"use the bf16/fp16 file$"):
        merged_entries(quant, [(lora, 1.0)])


def test_set_loras_refuses_stacked_dora_before_changing_anything(dora_file, tiny_models, tmp_path):
    from flux2_mlx import load_pipeline

    m = tiny_models("klein-4b")
    _bfl_file(tmp_path / "b.safetensors", 2)
    pipe = load_pipeline(m.spec, model_path=m.bfl_dir, loras=[(tmp_path / "b.safetensors", 0.5)])
    before = pipe.loras
    with pytest.raises(WeightsError, match="cannot be stacked"):
        pipe.set_loras([(dora_file, 1.0), (tmp_path / "b.safetensors", 0.5)])
    assert pipe.loras == before
