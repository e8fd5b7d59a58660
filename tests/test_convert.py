"""`flux2 convert` / `convert()`: every target type on a tiny random transformer, read back with gguf-py;
text encoders with llama.cpp names and Q/K permutation; quantized GGUF sources; refusal, interruption
(SIGTERM, SIGHUP), CLI."""

import json
import os
import signal
import warnings
from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import random_transformer

from flux2_mlx import convert as conv
from flux2_mlx.cli import main
from flux2_mlx.config import tiny_spec, transformer_shapes
from flux2_mlx.encoder_names import permute_qk, unpermute_qk
from flux2_mlx.quant import ggml, recipes
from flux2_mlx.quant.ggml import GGMLType as T
from flux2_mlx.weights import WeightsError, bf16_to_f32, f32_to_bf16, save_safetensors

# Max rel-RMS error of a quantized tensor vs its float32 source (N(0, 1/in) weights). Measured on this
# model: Q8_0 5.4e-3, Q6_K 1.8e-2, Q5_K 3.6e-2, Q5_0 4.3e-2, Q5_1 3.8e-2, Q4_K 7.2e-2, Q4_0 8.6e-2,
# Q4_1 7.9e-2, Q3_K 0.152, Q2_K 0.299; bounds ~25 % above.
TOL = {T.Q8_0: 7e-3, T.Q6_K: 2.2e-2, T.Q5_K: 4.5e-2, T.Q5_0: 5.4e-2, T.Q5_1: 4.8e-2, T.Q4_K: 9e-2,
       T.Q4_0: 0.11, T.Q4_1: 0.10, T.Q3_K: 0.19, T.Q2_K: 0.37, T.F16: 1e-3}
HIGH = ("img_in.", "txt_in.", "time_in.", "guidance_in.", "final_layer.")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    cfg = tiny_spec("klein-4b").transformer
    assert cfg.hidden_size % 256 == 0 and cfg.mlp_hidden % 256 == 0  # K-quants apply to every block linear
    w = random_transformer(cfg, seed=1)
    path = tmp_path_factory.mktemp("dit") / "flux-2-klein-4b.safetensors"
    save_safetensors(path, {k: f32_to_bf16(v) for k, v in w.items()})  # bf16 like the released files
    return path, {k: bf16_to_f32(f32_to_bf16(v)) for k, v in w.items()}, cfg


def _expected_type(name, shape, target):
    default = recipes.TARGETS[target][0]
    if len(shape) == 1:
        return T.F32
    if default in (T.BF16, T.F16):
        return default
    if name.startswith(HIGH):
        return T.BF16
    if name.endswith("_attn.qkv.weight") and target.endswith("_M"):
        return {T.Q5_K: T.Q6_K, T.Q4_K: T.Q5_K, T.Q3_K: T.Q4_K}[default]
    return default


@pytest.mark.parametrize("target", list(recipes.TARGETS))
def test_each_type_reads_back_in_gguf_py(tiny_dit, tmp_path, target):
    src, weights, cfg = tiny_dit
    out = conv.convert(src, tmp_path / "out.gguf", target, progress=False, jobs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]  # no partial file left
    r = gguf.GGUFReader(out)
    assert r.get_field("general.architecture").contents() == "flux"
    assert r.get_field("general.file_type").contents() == recipes.TARGETS[target][1]
    assert r.get_field("general.quantization_version").contents() == 2
    assert [t.name for t in r.tensors] == list(transformer_shapes(cfg))  # BFL names, canonical order
    for t in r.tensors:
        src_w = weights[t.name]
        assert tuple(reversed([int(x) for x in t.shape])) == src_w.shape
        assert T(t.tensor_type) == _expected_type(t.name, src_w.shape, target), t.name
        got = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(src_w.shape)
        if T(t.tensor_type) in (T.F32, T.BF16):
            np.testing.assert_array_equal(got, src_w)  # the source is bf16: exact
        else:
            err = np.sqrt(((got - src_w) ** 2).mean() / (src_w ** 2).mean())
            assert err <= TOL[T(t.tensor_type)], (t.name, err)


def test_destination_refused_without_force(tiny_dit, tmp_path):
    src, *_ = tiny_dit
    dst = tmp_path / "x.gguf"
    dst.write_bytes(b"keep me")
    with pytest.raises(WeightsError, match="already exists"):
        conv.convert(src, dst, "Q8_0", progress=False)
    assert dst.read_bytes() == b"keep me"
    conv.convert(src, dst, "Q8_0", force=True, progress=False)
    assert gguf.GGUFReader(dst).tensors[0].name == "img_in.weight"
    with pytest.raises(ValueError, match="unknown type"):
        conv.convert(src, tmp_path / "y.gguf", "Q7_K", progress=False)


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing(tiny_dit, tmp_path, monkeypatch, exc):
    src, *_ = tiny_dit
    calls = []
    real = conv.quantize

    def failing(a, t):
        calls.append(t)
        if len(calls) == 5:
            raise exc
        return real(a, t)

    monkeypatch.setattr(conv, "quantize", failing)
    dst = tmp_path / "out.gguf"
    with pytest.raises(type(exc)):
        conv.convert(src, dst, "Q4_K_M", progress=False, jobs=1)
    assert list(tmp_path.iterdir()) == []  # neither the destination nor .out.gguf.partial

    # and an existing destination survives a failed --force run untouched
    dst.write_bytes(b"old")
    calls.clear()
    with pytest.raises(type(exc)):
        conv.convert(src, dst, "Q4_K_M", force=True, progress=False, jobs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"] and dst.read_bytes() == b"old"


@pytest.mark.parametrize("target", ["Q4_K_M", "Q5_0"])
def test_parallel_output_is_byte_identical(tiny_dit, tmp_path, monkeypatch, target):
    src, *_ = tiny_dit
    monkeypatch.setattr(conv, "CHUNK_BYTES", 16384)  # many chunks per tensor, several in flight
    one = conv.convert(src, tmp_path / "one.gguf", target, progress=False, jobs=1)
    two = conv.convert(src, tmp_path / "two.gguf", target, progress=False, jobs=2)
    assert one.read_bytes() == two.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.gguf", "two.gguf"]


def _fail_in_worker(a, t):
    if t == T.Q4_K:
        raise RuntimeError("disk on fire")
    return ggml.quantize(a, t)


@pytest.mark.parametrize("exc", [OSError("input/output error"), KeyboardInterrupt()])
def test_interrupted_parallel_conversion_leaves_nothing(tiny_dit, tmp_path, monkeypatch, exc):
    """The main thread stops (a source read fails, or Ctrl-C) while workers have chunks in flight."""
    src, *_ = tiny_dit
    monkeypatch.setattr(conv, "CHUNK_BYTES", 4096)
    quantized, read = [], conv.to_float32

    def quantize(a, t):  # in the workers
        quantized.append(t)
        return ggml.quantize(a, t)

    def to_float32(a):  # in the main thread: the underflow pre-pass reads every chunk before any worker
        if len(quantized) >= 6:
            raise exc
        return read(a)

    monkeypatch.setattr(conv, "quantize", quantize)
    monkeypatch.setattr(conv, "to_float32", to_float32)
    with pytest.raises(type(exc)):
        conv.convert(src, tmp_path / "out.gguf", "Q4_K_M", progress=False, jobs=2)
    assert len(quantized) >= 6 and list(tmp_path.iterdir()) == []


def test_worker_failure_leaves_nothing(tiny_dit, tmp_path, monkeypatch):
    src, *_ = tiny_dit
    monkeypatch.setattr(conv, "quantize", _fail_in_worker)
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        conv.convert(src, dst, "Q4_K_M", force=True, progress=False, jobs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"] and dst.read_bytes() == b"old"


def test_verification_failure_removes_partial(tiny_dit, tmp_path, monkeypatch):
    src, *_ = tiny_dit

    def bad_verify(path, plan):
        raise WeightsError("read back wrong")

    monkeypatch.setattr(conv, "verify_conversion", bad_verify)
    with pytest.raises(WeightsError):
        conv.convert(src, tmp_path / "out.gguf", "Q8_0", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_verify_reads_back_with_the_projects_reader(tiny_dit, tmp_path):
    src, *_ = tiny_dit
    out = conv.convert(src, tmp_path / "out.gguf", "Q8_0", progress=False)
    p, _ = conv.plan_conversion(src, "Q8_0")
    conv.verify_conversion(out, p)
    p.tensors[3].type = T.Q4_0
    with pytest.raises(WeightsError, match="does not read back as planned"):
        conv.verify_conversion(out, p)
    p, _ = conv.plan_conversion(src, "Q8_0")
    p.arch = "llama"
    with pytest.raises(WeightsError, match="general.architecture"):
        conv.verify_conversion(out, p)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_interrupt_like_ctrl_c(tiny_dit, tmp_path, monkeypatch, sig):
    src, *_ = tiny_dit
    calls, real = [], conv.quantize

    def signalled(a, t):
        calls.append(t)
        if len(calls) == 5:
            os.kill(os.getpid(), sig)
        return real(a, t)

    monkeypatch.setattr(conv, "quantize", signalled)
    before = signal.getsignal(sig)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(src, tmp_path / "out.gguf", "Q4_K_M", progress=False, jobs=1)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(sig) is before


def test_convert_off_the_main_thread_leaves_signals_alone(tiny_dit, tmp_path):
    src, *_ = tiny_dit
    before = signal.getsignal(signal.SIGTERM)
    with ThreadPoolExecutor(1) as ex:  # signal.signal would raise ValueError here
        out = ex.submit(conv.convert, src, tmp_path / "out.gguf", "Q8_0", progress=False).result()
    assert out.exists() and signal.getsignal(signal.SIGTERM) is before


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _values(t) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
        tuple(reversed([int(x) for x in t.shape])))


def _assert_holds(out, ref: dict) -> None:
    """Every tensor of `out` holds the values of `ref`'s (gguf-py's readings of the source): the same
    blocks where the type is unchanged, the exact values in F32, rounded ones in BF16, and within the
    type's tolerance where re-quantized."""
    for name, t in _tensors(out).items():
        src, kind = ref[name], T(t.tensor_type)
        want, got = _values(src), _values(t)
        if kind == T(src.tensor_type):
            np.testing.assert_array_equal(t.data, src.data)
        elif kind == T.F32:
            np.testing.assert_array_equal(got, want)
        elif kind == T.BF16:
            np.testing.assert_array_equal(got, bf16_to_f32(f32_to_bf16(want)))
        else:
            err = np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean())
            assert err <= TOL[kind], (name, kind, err)


def test_quantized_gguf_transformer_source(tiny_dit, tmp_path):
    src, *_ = tiny_dit
    q4 = conv.convert(src, tmp_path / "m-Q4_K_M.gguf", "Q4_K_M", progress=False)
    ref = _tensors(q4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same types: blocks copied, nothing re-quantized, no warning
        same = conv.convert(q4, tmp_path / "same.gguf", "Q4_K_M", progress=False)
    assert list(_tensors(same)) == list(ref)
    _assert_holds(same, ref)

    with pytest.warns(UserWarning, match="already quantized"):
        dense = conv.convert(q4, tmp_path / "bf16.gguf", "BF16", progress=False)
    assert {T(t.tensor_type) for t in _tensors(dense).values()} == {T.BF16, T.F32}
    _assert_holds(dense, ref)  # decoded exactly: BF16 holds the rounded source values

    r = run("convert", q4, tmp_path / "out-Q8_0.gguf", "--type", "Q8_0")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("already quantized") == 1 and "a second time" in r.stderr
    assert T.Q8_0 in {T(t.tensor_type) for t in _tensors(tmp_path / "out-Q8_0.gguf").values()}
    _assert_holds(tmp_path / "out-Q8_0.gguf", ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16.gguf", "m-Q4_K_M.gguf", "out-Q8_0.gguf",
                                                          "same.gguf"]


@pytest.mark.parametrize("kind", ["qwen3", "mistral"])
def test_quantized_gguf_text_encoder_source(tmp_path, kind):
    _tiny_text_encoder(tmp_path, kind)
    q8 = conv.convert(tmp_path / "text_encoder", tmp_path / "te-Q8_0.gguf", "Q8_0", progress=False)
    ref = _tensors(q8)

    def fields(path):
        return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = conv.convert(q8, tmp_path / "same.gguf", "Q8_0", progress=False)
    assert fields(same) == fields(q8)  # architecture, hyper-parameters and tokenizer carried over
    assert list(_tensors(same)) == list(ref)
    _assert_holds(same, ref)  # Mistral's permuted Q/K rows too: un-permuted on load, permuted back

    with pytest.warns(UserWarning, match="already quantized"):
        q4 = conv.convert(q8, tmp_path / "te-Q4_K_M.gguf", "Q4_K_M", progress=False)
    assert T.Q5_0 in {T(t.tensor_type) for t in _tensors(q4).values()}  # Q4_K's fallback at these widths
    _assert_holds(q4, ref)
    meta = fields(q4)
    assert meta["tokenizer.ggml.tokens"] == fields(q8)["tokenizer.ggml.tokens"]
    assert meta["general.file_type"] == recipes.TARGETS["Q4_K_M"][1]


def test_tiny_weights_fall_back_to_a_safer_type(tiny_dit, tmp_path):
    _, weights, _ = tiny_dit
    w = dict(weights)
    w["single_blocks.0.linear2.weight"] = w["single_blocks.0.linear2.weight"] * 1e-5  # |w| ~ 1e-6
    path = tmp_path / "tiny.safetensors"
    save_safetensors(path, w)
    with pytest.warns(UserWarning, match="single_blocks.0.linear2.weight.*written as"):
        out = conv.convert(path, tmp_path / "out.gguf", "Q4_K_S", progress=False)
    types = {t.name: T(t.tensor_type) for t in gguf.GGUFReader(out).tensors}
    assert types["single_blocks.0.linear2.weight"] in (T.Q8_0, T.BF16)
    assert types["single_blocks.1.linear2.weight"] == T.Q4_K


def test_recipe_shape_fallback_and_text_mix():
    assert recipes.tensor_type("single_blocks.0.linear1.weight", (768, 96), "Q4_K_M") == T.Q5_0
    assert recipes.tensor_type("x.weight", (8, 200), "Q6_K") == T.F32
    assert recipes.tensor_type("double_blocks.0.img_attn.norm.query_norm.scale", (128,), "Q2_K") == T.F32
    n = 40
    q6 = [i for i in range(n)
          if recipes.text_tensor_type(f"blk.{i}.ffn_down.weight", (5120, 32768), "Q4_K_M", n) == T.Q6_K]
    assert len(q6) == 20 and q6[:5] == [0, 1, 2, 3, 4]  # llama.cpp's use_more_bits on 40 layers
    assert recipes.text_tensor_type("blk.3.attn_q.weight", (4096, 5120), "Q4_K_M", n) == T.Q4_K
    assert recipes.text_tensor_type("blk.3.attn_norm.weight", (5120,), "Q4_K_M", n) == T.F32


def _tiny_text_encoder(root, kind):
    import torch
    from conftest import _randomize, write_qwen_tokenizer
    from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    te = tiny_spec("klein-4b" if kind == "qwen3" else "dev").text_encoder
    common = dict(vocab_size=te.vocab_size, hidden_size=te.hidden_size,
                  intermediate_size=te.intermediate_size, num_hidden_layers=te.num_hidden_layers + 2,
                  num_attention_heads=te.num_attention_heads, num_key_value_heads=te.num_key_value_heads,
                  head_dim=te.head_dim, rms_norm_eps=te.rms_norm_eps,
                  rope_parameters={"rope_type": "default", "rope_theta": te.rope_theta},
                  tie_word_embeddings=False)
    model = (Qwen3ForCausalLM(Qwen3Config(**common)) if kind == "qwen3"
             else MistralForCausalLM(MistralConfig(**common)))
    _randomize(model, seed=3).save_pretrained(root / "text_encoder")
    write_qwen_tokenizer(root / "tokenizer" / "tokenizer.json")
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                          "pad_token": "<|endoftext|>"}))
    return te, {k: v.float().numpy() for k, v in model.state_dict().items()}, torch


@pytest.mark.parametrize("kind", ["qwen3", "mistral"])
def test_text_encoder_llama_cpp_names_and_qk_permutation(tmp_path, kind):
    te, sd, _ = _tiny_text_encoder(tmp_path, kind)
    out = conv.convert(tmp_path / "text_encoder", tmp_path / "te.gguf", "BF16", progress=False)
    r = gguf.GGUFReader(out)
    arch = "qwen3" if kind == "qwen3" else "llama"
    field = lambda k: r.get_field(k).contents()
    assert field("general.architecture") == arch
    depth = max(te.output_layers)
    assert field(f"{arch}.block_count") == depth  # only the layers FLUX.2 uses
    assert field(f"{arch}.attention.head_count") == te.num_attention_heads
    assert field(f"{arch}.attention.head_count_kv") == te.num_key_value_heads
    assert field(f"{arch}.embedding_length") == te.hidden_size
    assert field(f"{arch}.feed_forward_length") == te.intermediate_size
    assert field(f"{arch}.rope.freq_base") == pytest.approx(te.rope_theta)
    assert field("tokenizer.ggml.model") == "gpt2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == te.vocab_size and tokens[field("tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    names = {t.name: t for t in r.tensors}
    assert f"blk.{depth - 1}.ffn_down.weight" in names and f"blk.{depth}.ffn_down.weight" not in names
    assert "output.weight" not in names and "output_norm.weight" in names  # llama.cpp needs the norm
    assert ("blk.0.attn_q_norm.weight" in names) == (kind == "qwen3")

    def read(name):
        t = names[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
            tuple(reversed([int(x) for x in t.shape])))

    bf = lambda a: bf16_to_f32(f32_to_bf16(a))
    np.testing.assert_array_equal(read("token_embd.weight"), bf(sd["model.embed_tokens.weight"]))
    for proj, heads in (("q", te.num_attention_heads), ("k", te.num_key_value_heads)):
        hf = bf(sd[f"model.layers.3.self_attn.{proj}_proj.weight"])
        got = read(f"blk.3.attn_{proj}.weight")
        if kind == "qwen3":  # NEOX RoPE in llama.cpp: no permutation
            np.testing.assert_array_equal(got, hf)
        else:
            assert not np.array_equal(got, hf)
            np.testing.assert_array_equal(got, permute_qk(hf, heads))
            np.testing.assert_array_equal(unpermute_qk(got, heads), hf)  # un-permute on load restores HF
    np.testing.assert_array_equal(read("blk.3.ffn_down.weight"),
                                  bf(sd["model.layers.3.mlp.down_proj.weight"]))

    full = conv.convert(tmp_path / "text_encoder", tmp_path / "all.gguf", "Q8_0", all_layers=True,
                        progress=False)
    r = gguf.GGUFReader(full)
    assert r.get_field(f"{arch}.block_count").contents() == te.num_hidden_layers + 2
    assert {"output.weight", "output_norm.weight"} <= {t.name for t in r.tensors}


def test_permutation_matches_llama_cpp_formula():
    # llama.cpp: HF row h·d + i·(d/2) + j is stored as GGUF row h·d + 2j + i (LlamaModel.permute)
    n_head, d = 3, 8
    w = np.arange(n_head * d, dtype=np.float32)[:, None]
    p = permute_qk(w, n_head)
    for h in range(n_head):
        for i in range(2):
            for j in range(d // 2):
                assert p[h * d + 2 * j + i, 0] == w[h * d + i * d // 2 + j, 0]


def test_cli_convert_and_info(tiny_dit, tmp_path):
    src, *_ = tiny_dit
    dst = tmp_path / "q.gguf"
    r = run("convert", src, dst, "--type", "q4_k_m", "--jobs", "2")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.stdout and dst.exists()
    r = run("convert", src, dst, "--type", "Q4_K_M")
    assert r.exit_code == 2 and "already exists" in r.stderr and "Traceback" not in r.output
    r = run("convert", src, tmp_path / "z.gguf", "--type", "Q9")
    assert r.exit_code == 2 and "unknown type" in r.stderr
    r = run("convert", tmp_path / "missing", tmp_path / "z.gguf", "--type", "Q8_0")
    assert r.exit_code == 2 and "no such file" in r.stderr
    assert not (tmp_path / "z.gguf").exists()

    r = run("info", dst)
    assert r.exit_code == 0, r.output
    assert "architecture flux" in r.stdout and "FLUX.2 transformer" in r.stdout and "tensors: 41" in r.stdout
    assert "Q4_K" in r.stdout and "Q5_K" in r.stdout and "on MLX about" in r.stdout
    r = run("info", src)
    assert r.exit_code == 0 and "BF16" in r.stdout and "FLUX.2 transformer" in r.stdout
    r = run("info", src.parent)
    assert r.exit_code == 0 and "tensors: 41" in r.stdout
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope" * 10)
    r = run("info", bad)
    assert r.exit_code == 2 and r.stderr.startswith("error:")


def test_convert_modules_import_neither_mlx_nor_torch():
    import ast
    from pathlib import Path

    for f in (Path(conv.__file__), Path(recipes.__file__)):
        mods = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods.add(node.module.split(".")[0])
        assert not mods & {"mlx", "torch"}, f
