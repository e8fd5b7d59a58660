"""Q6_K, Q3_K and Q2_K kept as their blocks (quant/kblocks.py) and decoded per layer on both backends: the
decoded weight is gguf-py's dequantize bit for bit, a tiny transformer from such a file equals the dense
model of gguf-py's values, embeddings decode only the rows they look up, and the memory planner's bytes
are what the backends hold."""

import dataclasses

import mlx.core as mx
import mlx.nn as mnn
import numpy as np
import pytest
import torch
from conftest import random_transformer, rel_err, write_gguf

import flux2_mlx.mlx_backend as mb
import flux2_mlx.torch_backend as tb
from flux2_mlx import memory
from flux2_mlx.config import tiny_spec
from flux2_mlx.dit_names import transformer_entries
from flux2_mlx.entries import Entry
from flux2_mlx.mlx_backend.quant_layers import decode_kblocks as mlx_decode
from flux2_mlx.mlx_backend.quant_layers import quantized_layer as mlx_layer
from flux2_mlx.quant import GGMLType, block_info, dequantize, quantize
from flux2_mlx.quant.kblocks import FIELDS, split_blocks
from flux2_mlx.sampling import prc_img, prc_txt
from flux2_mlx.torch_backend.quant_layers import decode_kblocks as torch_decode
from flux2_mlx.torch_backend.quant_layers import quantized_layer as torch_layer
from flux2_mlx.weights import WeightSource

TYPES = ["Q6_K", "Q3_K", "Q2_K"]
CFG = tiny_spec("dev").transformer
BACKENDS = {"mlx": (mb, mx.float32), "torch": (tb, torch.float32)}
F16_AT = {"Q6_K": [208], "Q3_K": [108], "Q2_K": [80, 82]}  # byte offsets of the fp16 fields of a block


def gaussian_blocks(t: str, shape, seed: int) -> np.ndarray:
    """Blocks by the project's K-quantizer (llama.cpp's bytes) of weights whose rows span 1e-4 to 10 in
    scale, with outliers."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * np.logspace(-4, 1, shape[0])[:, None]
    w[rng.random(shape) < 0.01] *= 20
    return quantize(w.astype(np.float32), GGMLType[t])


def random_blocks(t: str, shape, seed: int) -> np.ndarray:
    """Random bytes with finite fp16 fields: every code and sub-block scale pattern, negative ones too."""
    rng = np.random.default_rng(seed)
    rows, n = shape
    raw = rng.integers(0, 256, (rows, n // 256, block_info(GGMLType[t])[1]), dtype=np.uint8)
    for at in F16_AT[t]:
        d = (rng.standard_normal((rows, n // 256)) * 0.01).astype(np.float16)
        d[0, 0] = 3e-7  # a subnormal scale
        raw[..., at:at + 2] = d[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def as_bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("t", TYPES)
def test_decode_is_gguf_dequantize_bit_for_bit_on_both_backends(t):
    shape = (24, 768)
    for raw in (gaussian_blocks(t, shape, 1), random_blocks(t, shape, 2)):
        q = split_blocks(raw, GGMLType[t], shape)
        assert [a.dtype for a in q.fields] == [np.dtype(d) for _, _, d in FIELDS[GGMLType[t]]]
        assert sum(a.nbytes for a in q.fields) == raw.nbytes  # the file's bytes, nothing added
        want = as_bits(dequantize(raw, GGMLType[t], shape))
        got_mlx = mlx_decode(q.type, [mx.array(a) for a in q.fields], mx.float32)
        got_torch = torch_decode(q.type, [torch.from_numpy(a) for a in q.fields], torch.float32)
        assert np.array_equal(as_bits(np.array(got_mlx)), want)
        assert np.array_equal(as_bits(got_torch.numpy()), want)
        # a 16-bit compute dtype gets the float32 values rounded once
        bf16 = mlx_decode(q.type, [mx.array(a) for a in q.fields], mx.bfloat16)
        assert bf16.dtype == mx.bfloat16 and mx.array_equal(bf16, mx.array(got_mlx).astype(mx.bfloat16))


def test_truncated_blocks_are_one_line_errors():
    raw = gaussian_blocks("Q6_K", (2, 256), 0)
    want = r"^Q6_K tensor of shape \(2, 256\) needs 420 bytes of blocks, got 419$"
    with pytest.raises(ValueError, match=want):
        split_blocks(raw.ravel()[:-1], GGMLType.Q6_K, (2, 256))
    with pytest.raises(ValueError, match="multiple of 256"):
        split_blocks(raw, GGMLType.Q6_K, (2, 128))


@pytest.mark.parametrize("t", TYPES)
def test_embedding_decodes_only_the_looked_up_rows(t):
    """A text encoder's token table (Q6_K in Q4_K_M / Q5_K_M LLM files) and a Linear from the same blocks."""
    shape = (40, 512)
    raw = gaussian_blocks(t, shape, 3)
    table = dequantize(raw, GGMLType[t], shape)
    q = split_blocks(raw, GGMLType[t], shape)
    ids = np.array([[3, 39, 0, 3], [7, 7, 12, 1]])
    x = np.random.default_rng(4).standard_normal((5, shape[1])).astype(np.float32)
    mq = dataclasses.replace(q, fields=tuple(mx.array(a) for a in q.fields))
    tq = dataclasses.replace(q, fields=tuple(torch.from_numpy(a) for a in q.fields))
    emb = mlx_layer(mnn.Embedding(*shape), mq, mx.float32)
    assert np.array_equal(as_bits(np.array(emb(mx.array(ids)))), as_bits(table[ids]))
    emb = torch_layer(torch.nn.Embedding(*shape), tq, torch.float32)
    assert np.array_equal(as_bits(emb(torch.from_numpy(ids)).numpy()), as_bits(table[ids]))
    want = x.astype(np.float64) @ table.T.astype(np.float64)
    lin = mlx_layer(mnn.Linear(shape[1], shape[0], bias=False), mq, mx.float32)
    assert rel_err(np.array(lin(mx.array(x))), want) <= 1e-5
    lin = torch_layer(torch.nn.Linear(shape[1], shape[0], bias=False), tq, torch.float32)
    assert rel_err(lin(torch.from_numpy(x)).numpy(), want) <= 1e-5


def forward(backend: str, source):
    be, dtype = BACKENDS[backend]
    model = be.load_transformer(CFG, source, dtype=dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 6, CFG.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((1, 16, CFG.context_in_dim)).astype(np.float32)
    args = (x, prc_img(2, 3), np.array([0.6], np.float32), ctx, prc_txt(16), np.array([3.5], np.float32))
    return model, be.to_numpy(model(*[be.from_numpy(a) for a in args]))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny transformer per type: every matrix of whole super-blocks in that type."""
    tensors = random_transformer(CFG, seed=6)
    d = tmp_path_factory.mktemp("ggml_exact")
    out = {}
    for t in TYPES:
        types = {k: t for k, a in tensors.items() if a.ndim == 2 and a.shape[1] % 256 == 0}
        out[t] = write_gguf(d / f"{t}.gguf", tensors, types), types
    return out


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("backend", BACKENDS)  # MLX first: after torch forwards, MLX ones took 2 s, not 0.15
def test_forward_equals_dense_model_of_gguf_py_values(files, backend, t):
    path, types = files[t]
    entries = transformer_entries(WeightSource(path))
    model, ours = forward(backend, WeightSource(path))
    assert type(model.double_blocks[0].img_attn.qkv).__name__ == "KBlocksLinear"  # blocks, no dense copy
    dense = {k: e.load() for k, e in entries.items()}
    dense = {k: dequantize(a.data, GGMLType[t], a.shape) if k in types else a for k, a in dense.items()}
    _, want = forward(backend, {k: Entry(a.shape, lambda a=a: a) for k, a in dense.items()})
    assert rel_err(ours, want) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_planner_bytes_are_the_held_bytes(files, backend):
    """The planner sizes kept blocks at the file's bytes, and that is what each backend holds."""
    path, _ = files["Q3_K"]
    entries = transformer_entries(WeightSource(path))
    planned = memory.component_weights("transformer", entries, ("double_blocks", "single_blocks"), 4).total
    be, dtype = BACKENDS[backend]
    model = be.load_transformer(CFG, WeightSource(path), dtype=dtype)
    if backend == "mlx":
        from mlx.utils import tree_flatten

        held = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    else:
        held = sum(a.numel() * a.element_size() for a in [*model.parameters(), *model.buffers()])
    assert held == planned
