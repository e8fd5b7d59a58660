"""GGUF weights run on MLX's quantized kernels (Q6_K, Q3_K and Q2_K as their blocks, decoded per layer):
per-tensor layer types, values equal to gguf-py's."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import random_transformer, rel_err, write_gguf
from mlx.utils import tree_flatten

from flux2_mlx.config import tiny_spec
from flux2_mlx.entries import Entry
from flux2_mlx.mlx_backend import load_transformer
from flux2_mlx.mlx_backend.quant_layers import KBlocksLinear
from flux2_mlx.quant import GGMLType, dequantize, quantize
from flux2_mlx.sampling import prc_img, prc_txt
from flux2_mlx.weights import WeightSource

CFG = tiny_spec("dev").transformer
# One type per matrix, cycling: every repacked type and those kept as blocks in one model.
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q3_K", "Q6_K", "Q2_K", "F16"]
KEPT_AS_BLOCKS = {"Q3_K", "Q6_K", "Q2_K"}


def _dense(tensors, types):
    """What the file holds, dequantized by gguf-py: the reference the quantized model must match."""
    return {k: (dequantize(quantize(a, GGMLType[types[k]]), GGMLType[types[k]], a.shape)
                if types.get(k, "F32") not in ("F32", "F16") else a.astype(np.float16).astype(np.float32)
                if types.get(k) == "F16" else a) for k, a in tensors.items()}


def _forward(model):
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, 6, CFG.in_channels)).astype(np.float32))
    ctx = mx.array(rng.standard_normal((1, 16, CFG.context_in_dim)).astype(np.float32))
    return np.array(model(x, mx.array(prc_img(2, 3)), mx.array([0.6]), ctx, mx.array(prc_txt(16)),
                          mx.array([3.5])))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    tensors = random_transformer(CFG, seed=4)
    matrices = [k for k, a in tensors.items() if a.ndim == 2]
    types = {k: TYPES[i % len(TYPES)] for i, k in enumerate(matrices)}
    path = tmp_path_factory.mktemp("gguf") / "tiny-dev-mixed.gguf"
    write_gguf(path, tensors, types)
    return path, tensors, types


def test_each_tensor_gets_the_layer_its_type_asks_for(mixed):
    path, tensors, types = mixed
    model = load_transformer(CFG, WeightSource(path), dtype=mx.float32)
    params = dict(tree_flatten(model.parameters()))
    for name, t in types.items():
        layer = name.removesuffix(".weight")
        if t in ("F32", "F16"):
            assert params[name].dtype == mx.float32
        elif t in KEPT_AS_BLOCKS:  # the blocks' fields only
            assert name not in params and params[f"{layer}.d"].dtype == mx.float16
        else:  # packed codes only: no dense copy of this weight exists
            assert params[name].dtype == mx.uint32 and f"{layer}.scales" in params
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def test_quantized_model_equals_dense_model_of_the_same_values(mixed):
    """Every type must give the dense result of gguf-py's dequantized weights."""
    path, tensors, types = mixed
    ours = _forward(load_transformer(CFG, WeightSource(path), dtype=mx.float32))
    ref = _forward(load_transformer(CFG, {k: Entry(a.shape, lambda a=a: a)
                                          for k, a in _dense(tensors, types).items()},
                                    dtype=mx.float32))
    assert rel_err(ours, ref) <= 1e-5


def test_pipeline_runs_a_gguf_transformer(tiny_models, tmp_path):
    from flux2_mlx import load_pipeline

    m = tiny_models("klein-4b")
    types = {k: "Q8_0" for k, a in m.transformer.items() if a.ndim == 2}
    path = tmp_path / "flux-2-klein-4b-Q8_0.gguf"
    write_gguf(path, m.transformer, types)
    embeds = (np.random.default_rng(1).standard_normal((1, 16, m.spec.transformer.context_in_dim))
              .astype(np.float32))
    kw = dict(prompt_embeds=embeds, width=32, height=48, steps=2, seed=3)
    q = load_pipeline(m.spec, transformer=path, vae=m.bfl_dir / "ae.safetensors").sample(**kw)
    dense = load_pipeline(m.spec, model_path=m.bfl_dir).sample(**kw)
    assert rel_err(q, dense) < 3e-2 and rel_err(q, dense) > 0  # Q8_0 rounding, nothing more


# Relative error of one forward vs the float model, per `flux2 convert --type` (measured x ~1.5).
CONVERT_BOUNDS = {"BF16": 2e-2, "Q8_0": 2e-2, "Q6_K": 4e-2, "Q5_K_M": 8e-2, "Q5_0": 1e-1, "Q4_K_M": 1.5e-1,
                  "Q4_0": 2e-1, "Q3_K_M": 3e-1, "Q2_K": 6e-1}


@pytest.mark.parametrize("qtype", list(CONVERT_BOUNDS))
def test_converted_transformer_runs_in_our_loader(tmp_path, qtype):
    """`flux2 convert` output loads through the MLX loader (quantized, never dense) and runs close to
    the float model."""
    from flux2_mlx.convert import convert
    from flux2_mlx.weights import save_safetensors

    tensors = random_transformer(CFG, seed=5)
    src = tmp_path / "tiny-dev.safetensors"
    save_safetensors(src, tensors)
    dst = convert(src, tmp_path / f"tiny-dev-{qtype}.gguf", qtype, progress=False)
    model = load_transformer(CFG, WeightSource(dst), dtype=mx.float32)
    quantized = [n for n, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, KBlocksLinear))]
    assert (len(quantized) > 0) == (qtype != "BF16")
    ref = _forward(load_transformer(CFG, {k: Entry(a.shape, lambda a=a: a) for k, a in tensors.items()},
                                    dtype=mx.float32))
    assert rel_err(_forward(model), ref) <= CONVERT_BOUNDS[qtype]


@pytest.mark.parametrize("kind", ["qwen3", "mistral"])
def test_converted_text_encoder_runs_quantized(tmp_path, kind):
    """HF folder → `flux2 convert` (llama.cpp names; Mistral's Q/K rows permuted) → our loader
    (un-permuted, QuantizedEmbedding/QuantizedLinear) ≈ the float encoder."""
    import dataclasses

    from test_convert import _tiny_text_encoder

    from flux2_mlx.convert import convert
    from flux2_mlx.mlx_backend import load_text_encoder

    te, _, _ = _tiny_text_encoder(tmp_path, kind)
    te = dataclasses.replace(te, max_length=16)
    dst = convert(tmp_path / "text_encoder", tmp_path / "te-Q8_0.gguf", "Q8_0", progress=False)
    quant = load_text_encoder(te, WeightSource(dst), dtype=mx.float32)
    dense = load_text_encoder(te, WeightSource(tmp_path / "text_encoder"), dtype=mx.float32)
    assert isinstance(quant.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(quant.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    ids = mx.array(np.random.default_rng(0).integers(0, te.vocab_size, (1, 16)))
    mask = mx.ones((1, 16), dtype=mx.int32)
    # Q8_0 rounding (~4e-3 per weight) compounds over 27-30 layers of width 32 to 3-6e-2 (measured).
    assert rel_err(np.array(quant(ids, mask)), np.array(dense(ids, mask))) <= 1e-1


def test_pipeline_uses_the_tokenizer_inside_a_gguf_text_encoder(tiny_repo, tmp_path):
    """A Q8_0 GGUF encoder with no tokenizer.json beside it: the vocabulary stored in the GGUF gives the
    same token ids, hence the same embeddings as tokenizer.json with that encoder."""
    import shutil

    from flux2_mlx import load_pipeline
    from flux2_mlx.convert import convert

    gguf_te = convert(tiny_repo / "text_encoder", tmp_path / "qwen3-tiny-Q8_0.gguf", "Q8_0", progress=False)
    alone = tmp_path / "alone"  # the transformer and VAE without the repo's tokenizer/ folder
    alone.mkdir()
    shutil.copy(tiny_repo / "flux-2-klein-4b.safetensors", alone)
    shutil.copytree(tiny_repo / "vae", alone / "vae")
    from_gguf = load_pipeline("klein-4b", model_path=alone, text_encoder=gguf_te)
    from_json = load_pipeline("klein-4b", model_path=tiny_repo, text_encoder=gguf_te)
    assert from_gguf.files["tokenizer"] is None
    prompt = "A photograph of a red fox, highly detailed"
    assert np.array_equal(from_gguf.encode(prompt), from_json.encode(prompt))
