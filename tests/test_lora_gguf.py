"""LoRAs on a quantized (GGUF) transformer, CPU float32, tiny klein-4b: the weight stays quantized and each
LoRA runs as a separate branch beside it (lora.LoraQuant). One forward equals the model of the
dense-dequantized weights with the LoRAs merged, on both backends; streamed == resident; set_loras([])
gives the base back."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import rel_err, write_gguf
from test_gguf_load import _dense
from test_lora import BASE, CFG, SHAPES, _bfl_file, _lokr_factors
from test_lora_pipeline import _peft_file
from test_transformer_parity import _inputs

import flux2_mlx.mlx_backend as mb
import flux2_mlx.torch_backend as tb
from flux2_mlx import load_pipeline, memory
from flux2_mlx.dit_names import transformer_entries
from flux2_mlx.entries import Entry
from flux2_mlx.lora import merged_entries, read_lora
from flux2_mlx.weights import WeightSource, save_safetensors

BACKENDS = {"mlx": (mb, mx.float32), "torch": (tb, torch.float32)}
INPUTS = _inputs(CFG, L=16)


def _lokr_file(path):
    """LoKr (a dense term on a quantized weight) on a fused qkv, a linear1 and an MLP."""
    rng = np.random.default_rng(7)
    tensors = {}
    for m in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "double_blocks.1.txt_mlp.2"):
        tensors.update({f"diffusion_model.{m}.{k}": v
                        for k, v in _lokr_factors(rng, *SHAPES[f"{m}.weight"], decomposed=True).items()})
        tensors[f"diffusion_model.{m}.alpha"] = np.array(1.0, np.float32)
    save_safetensors(path, tensors)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_gguf")
    _bfl_file(d / "bfl.safetensors", 2)
    out = {"bfl": d / "bfl.safetensors", "peft": _peft_file(d / "peft.safetensors", 1),
           "lokr": _lokr_file(d / "lokr.safetensors")}
    for qtype in ("Q8_0", "Q4_K", "Q6_K"):  # whole K-blocks: img_in, txt_in stay F32 (a dense merge beside)
        types = {k: qtype for k, a in BASE.items() if a.ndim == 2 and a.shape[1] % 256 == 0}
        out[qtype] = write_gguf(d / f"t-{qtype}.gguf", BASE, types), types
    return out


def _forward(backend, entries, streaming=None):
    be, dtype = BACKENDS[backend]
    model = be.load_transformer(CFG, entries, dtype=dtype, streaming=streaming)
    args = [be.from_numpy(INPUTS[k]) for k in ("x", "x_ids", "t", "ctx", "ctx_ids", "g")]
    return model, be.to_numpy(model(*args))


def _loras(files, names_scales):
    return [(read_lora(files[n], SHAPES), s) for n, s in names_scales]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
@pytest.mark.parametrize("loras", [[("bfl", 0.8)], [("peft", 0.7), ("bfl", -0.3)],
                                   [("lokr", 0.9), ("peft", 0.5)]], ids=["bfl", "two", "lokr+peft"])
def test_forward_equals_merged_dense_dequantized_model(files, backend, qtype, loras):
    path, types = files[qtype]
    loras = _loras(files, loras)
    model, ours = _forward(backend, merged_entries(transformer_entries(WeightSource(path)), loras))
    qkv = model.double_blocks[0].img_attn.qkv
    assert type(qkv).__name__ == "LoraLinear"  # the quantized layer kept, the LoRA beside it
    assert type(qkv.base).__name__ in ("QuantizedLinear", "QuantLinear")
    dense = {k: Entry(a.shape, lambda a=a: a) for k, a in _dense(BASE, types).items()}
    _, want = _forward(backend, merged_entries(dense, loras))
    _, base = _forward(backend, dense)
    assert rel_err(ours, want) <= 1e-5
    assert rel_err(want, base) > 1e-2  # the LoRAs are live


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])  # repacked, kept as blocks
def test_streamed_equals_resident_with_loras(files, backend, qtype):
    path, _ = files[qtype]
    loras = _loras(files, [("peft", 0.7), ("lokr", 0.9)])
    _, resident = _forward(backend, merged_entries(transformer_entries(WeightSource(path)), loras))
    for keep_host in (False, True):
        entries = merged_entries(transformer_entries(WeightSource(path, pread=True)), loras)
        _, streamed = _forward(backend, entries, memory.Streaming(1, keep_host))
        assert np.array_equal(streamed, resident), keep_host


def test_pipeline_with_a_gguf_transformer_and_loras(files, tiny_models, tmp_path):
    m = tiny_models("klein-4b")
    path = write_gguf(tmp_path / "t.gguf", m.transformer, {k: "Q8_0" for k, a in m.transformer.items()
                                                            if a.ndim == 2 and a.shape[1] % 32 == 0})
    embeds = np.random.default_rng(0).standard_normal((1, 16, CFG.context_in_dim)).astype(np.float32)
    kw = dict(prompt_embeds=embeds, width=32, height=32, steps=2, seed=3)
    outs = {}
    for b in BACKENDS:
        pipe = load_pipeline(m.spec, transformer=path, vae=m.bfl_dir / "ae.safetensors", backend=b)
        base = pipe.sample(**kw)
        pipe.set_loras([(files["peft"], 0.8), (files["lokr"], 0.5)])
        outs[b] = pipe.sample(**kw)
        assert rel_err(outs[b], base) > 1e-2
        pipe.set_loras([])
        assert np.array_equal(pipe.sample(**kw), base), b
    assert rel_err(outs["mlx"], outs["torch"]) <= 1e-4


def test_planner_counts_the_branch_beside_quantized_weights(files):
    """What the LoRAs add beside quantized weights (factors, a LoKr's dense term, a DoRA rescale) is what the
    memory planner adds: the torch model's held bytes grow by the planned amount."""
    from test_lora_dora import _lycoris_file

    path, _ = files["Q4_K"]
    dora, _ = _lycoris_file(path.parent, "locon", True, seed=4)
    loras = _loras(files, [("peft", 0.7), ("lokr", 0.9)]) + [(read_lora(dora, SHAPES), 0.5)]
    sizes = []
    for entries in (transformer_entries(WeightSource(path)),
                    merged_entries(transformer_entries(WeightSource(path)), loras)):
        model = tb.load_transformer(CFG, entries, dtype=torch.float32)
        held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        planned = memory.component_weights("transformer", entries, ("double_blocks", "single_blocks"), 4)
        sizes.append((held, planned.total))
    (held0, planned0), (held1, planned1) = sizes
    assert held1 - held0 == planned1 - planned0 > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_ggml_type_takes_the_branch(files, tmp_path, backend):
    """One file with every block type the converters write on the LoRAs' targets, round-robin, against the
    values the backends hold (gguf-py's; Q6_K, Q3_K and Q2_K decoded from their blocks), a DoRA's norms
    too."""
    from test_lora_dora import _lycoris_file

    from flux2_mlx.weights import GGMLTensor

    kinds = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    targets = [k for k in read_lora(files["bfl"], SHAPES).terms if SHAPES[k][1] % 256 == 0]
    types = {k: kinds[i % len(kinds)] for i, k in enumerate(targets)}
    assert set(types.values()) == set(kinds)
    path = write_gguf(tmp_path / "mixed.gguf", BASE, types)
    dora, _ = _lycoris_file(tmp_path, "locon", True, seed=5)
    loras = _loras(files, [("bfl", 0.8), ("lokr", 0.6)]) + [(read_lora(dora, SHAPES), 0.7)]
    entries = transformer_entries(WeightSource(path))
    _, ours = _forward(backend, merged_entries(entries, loras))
    held = {k: e.load() for k, e in entries.items()}
    held = {k: t.dequantize() if isinstance(t, GGMLTensor) else t for k, t in held.items()}
    _, want = _forward(backend, merged_entries({k: Entry(a.shape, lambda a=a: a) for k, a in held.items()},
                                               loras))
    assert rel_err(ours, want) <= 1e-5
