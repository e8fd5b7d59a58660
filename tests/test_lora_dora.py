"""DoRA on the tiny klein-4b transformer, CPU float32, against the trainers' own code:
- PEFT's `lora_magnitude_vector` (a file PEFT itself writes): alone, merged by us == diffusers' fused
  weights; stacked with another LoRA in either order, our merged forward == diffusers' live adapters.
- LyCORIS's `dora_scale` on LoCon, LoKr and LoHa, norms per output row and per input column: our merged
  weight == the one lycoris-lora's own modules run with, at a user scale ≠ 1.
- Beside GGUF-quantized weights (Q8_0, Q4_K), both backends: one forward == the dense-dequantized model with
  the same LoRAs merged; a per-column LyCORIS DoRA there is refused, one line, before anything changes."""

import numpy as np
import pytest
from conftest import diffusers_transformer, rel_err, write_gguf
from test_gguf_load import _dense
from test_lora import BASE, CFG, SHAPES, _assert_same, _diffusers_fused, _low_rank
from test_lora_pipeline import _peft_file
from test_transformer_parity import _inputs, _reference

import flux2_mlx.mlx_backend as mb
import flux2_mlx.torch_backend as tb
from flux2_mlx.dit_names import transformer_entries
from flux2_mlx.entries import Entry
from flux2_mlx.lora import merged_entries, read_lora
from flux2_mlx.weights import WeightsError, WeightSource, save_safetensors

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
# LyCORIS files name BFL modules the kohya way; a fused qkv, an MLP and a linear1
LYCORIS_TARGETS = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.1.linear1"]
INPUTS = _inputs(CFG, h=2, w=3, L=16)
BACKENDS = {"mlx": mb, "torch": tb}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """PEFT's DoRA adapter on diffusers' transformer, saved by diffusers' save_lora_weights (lora_B starts
    at zero and the magnitudes at ‖W‖, an identity: both are made random); a plain PEFT LoRA; LyCORIS
    DoRA LoCon files with row and with column norms."""
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
    out = {"dora": d / "pytorch_lora_weights.safetensors", "peft": _peft_file(d / "peft.safetensors", 1)}
    for on_out in (True, False):
        out[f"lycoris-{'rows' if on_out else 'cols'}"], _ = _lycoris_file(d, "locon", on_out, seed=2)
    return out


def _lycoris_file(folder, kind: str, on_out: bool, seed: int):
    """A LyCORIS DoRA file for LYCORIS_TARGETS (kohya names, random factors and magnitudes) and the
    weights lycoris-lora's modules run with it at multiplier 0.7 (BFL weight name → float32). Their forward,
    not `get_merged_weight`, which in lycoris-lora 4.1 applies a LoHa's alpha / rank twice."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    cls, kw = {"locon": (LoConModule, {}), "loha": (LohaModule, {}),
               "lokr": (LokrModule, dict(factor=4, decompose_both=False))}[kind]
    g = torch.Generator().manual_seed(seed)
    tensors, merged = {}, {}
    for m in LYCORIS_TARGETS:
        rows, cols = SHAPES[f"{m}.weight"]
        linear = torch.nn.Linear(cols, rows, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(BASE[f"{m}.weight"]))
        name = "lora_unet_" + m.replace(".", "_")
        module = cls(name, linear, multiplier=0.7, lora_dim=4, alpha=3, weight_decompose=True,
                     wd_on_out=on_out, **kw)
        with torch.no_grad():  # the zero-initialised factor and the identity magnitudes made random
            for key, p in module.named_parameters():
                if key == "dora_scale":
                    p.mul_(torch.rand(p.shape, generator=g) + 0.5)
                elif key in ("lora_up.weight", "hada_w2_a", "lokr_w1"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        tensors.update({f"{name}.{k}": v.detach().numpy() for k, v in module.state_dict().items()})
        with torch.no_grad():  # its forward on the identity: (I @ W'ᵀ)ᵀ
            merged[f"{m}.weight"] = module(torch.eye(cols)).T.numpy()
    path = folder / f"lycoris-{kind}-{on_out}.safetensors"
    save_safetensors(path, tensors)
    return path, merged


def _dense_entries(tensors=BASE):
    return {k: Entry(a.shape, lambda a=a: a, "F32") for k, a in tensors.items()}


def _forward(be, entries):
    model = be.load_transformer(CFG, entries, dtype=be.resolve_dtype("float32"))
    return be.to_numpy(model(*(be.from_numpy(INPUTS[k]) for k in ("x", "x_ids", "t", "ctx", "ctx_ids", "g"))))


def test_peft_dora_equals_diffusers_fused(files):
    lora = read_lora(files["dora"], SHAPES)
    assert lora.dora and not lora.unmatched
    entries = merged_entries(_dense_entries(), [(lora, 0.8)])
    ours = {k: e.load() for k, e in entries.items()}
    _assert_same(ours, _diffusers_fused([files["dora"]], [0.8]), CHANGED)


@pytest.mark.parametrize("order", [("dora", "peft"), ("peft", "dora")])
def test_stacked_peft_dora_equals_diffusers_live_adapters(files, order):
    """PEFT runs each adapter on the output of those before it, so a DoRA rescales the LoRAs listed before
    it too: the order matters, and both orders are checked."""
    from diffusers import Flux2Pipeline

    scales = {"dora": 0.8, "peft": -0.6}
    model = diffusers_transformer(CFG, BASE)
    for name in order:
        sd, meta = Flux2Pipeline.lora_state_dict(str(files[name]), return_lora_metadata=True)
        model.load_lora_adapter(sd, adapter_name=name, prefix="transformer", metadata=meta)
    model.set_adapters(list(order), [scales[n] for n in order])
    want = _reference(model, CFG, INPUTS)
    loras = [(read_lora(files[n], SHAPES), scales[n]) for n in order]
    got = _forward(mb, merged_entries(_dense_entries(), loras))
    assert rel_err(got, want) <= 1e-5
    single = _forward(mb, merged_entries(_dense_entries(), loras[:1]))
    assert rel_err(got, single) > 1e-2  # the second LoRA is live


@pytest.mark.parametrize("kind", ["locon", "lokr", "loha"])
@pytest.mark.parametrize("on_out", [True, False], ids=["rows", "columns"])
def test_lycoris_dora_equals_lycoris_forward(tmp_path, kind, on_out):
    path, want = _lycoris_file(tmp_path, kind, on_out, seed=3)
    lora = read_lora(path, SHAPES)
    assert lora.dora and not lora.unmatched and lora.format.startswith(("kohya", "LyCORIS"))
    entries = merged_entries(_dense_entries(), [(lora, 0.7)])
    for name, w in want.items():
        assert rel_err(entries[name].load(), w) <= 1e-6, name
        assert rel_err(w, BASE[name]) > 1e-2


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    d = tmp_path_factory.mktemp("dora_gguf")
    out = {}
    for qtype in ("Q8_0", "Q4_K"):  # whole K-blocks: img_in and txt_in stay F32 (a dense merge beside)
        types = {k: qtype for k, a in BASE.items() if a.ndim == 2 and a.shape[1] % 256 == 0}
        out[qtype] = write_gguf(d / f"t-{qtype}.gguf", BASE, types), types
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
@pytest.mark.parametrize("loras", [[("dora", 0.8)], [("peft", 0.5), ("dora", 0.8), ("lycoris-rows", 0.7)]],
                         ids=["dora", "stacked"])
def test_dora_beside_gguf_equals_merged_dense_dequantized_model(files, quantized, backend, qtype, loras):
    be = BACKENDS[backend]
    path, types = quantized[qtype]
    loras = [(read_lora(files[n], SHAPES), s) for n, s in loras]
    entries = merged_entries(transformer_entries(WeightSource(path)), loras)
    assert entries["double_blocks.0.img_attn.qkv.weight"].load().base_scale is not None  # a DoRA branch
    ours = _forward(be, entries)
    dense = _dense(BASE, types)
    want = _forward(be, merged_entries(_dense_entries(dense), loras))
    assert rel_err(ours, want) <= 1e-5
    assert rel_err(want, _forward(be, _dense_entries(dense))) > 1e-2


def test_column_dora_beside_gguf_is_refused_before_anything_changes(files, quantized, tiny_models):
    from flux2_mlx import load_pipeline

    path, _ = quantized["Q8_0"]
    lora = read_lora(files["lycoris-cols"], SHAPES)
    with pytest.raises(WeightsError, match=r"lycoris-locon-False\.safetensors: double_blocks\.0\.img_attn"
                                           r"\.qkv\.weight is a LyCORIS DoRA trained per input column"):
        merged_entries(transformer_entries(WeightSource(path)), [(lora, 1.0)])
    m = tiny_models("klein-4b")
    pipe = load_pipeline(m.spec, transformer=path, vae=m.bfl_dir / "ae.safetensors",
                         loras=[(files["dora"], 0.5)])
    before = pipe.loras
    with pytest.raises(WeightsError, match="per input column"):
        pipe.set_loras([(files["peft"], 0.5), (files["lycoris-cols"], 1.0)])
    assert pipe.loras == before
    # on the dense file the same LoRA merges
    qkv = "double_blocks.0.img_attn.qkv.weight"
    assert rel_err(merged_entries(_dense_entries(), [(lora, 1.0)])[qkv].load(), BASE[qkv]) > 1e-2


def test_dora_magnitudes_that_do_not_fit_are_one_line(tmp_path):
    up, down = _low_rank(np.random.default_rng(0), 256, 128, 4)
    save_safetensors(tmp_path / "bad.safetensors", {
        "lora_unet_img_in.lora_down.weight": down, "lora_unet_img_in.lora_up.weight": up,
        "lora_unet_img_in.dora_scale": np.ones((255, 1), np.float32)})
    with pytest.raises(WeightsError, match=r"bad\.safetensors: img_in: its DoRA magnitudes \(255\) do not "
                                           r"fit its update of shape \[256, 128\]"):
        read_lora(tmp_path / "bad.safetensors", SHAPES)
