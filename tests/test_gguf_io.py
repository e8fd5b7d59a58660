"""GGUF reading: files written by gguf-py's own GGUFWriter come back with the right names, numpy shapes,
types and bytes; transformer and llama.cpp text-encoder files map to canonical names (Q/K un-permuted
where llama.cpp permuted them); malformed files fail with one-line WeightsErrors."""

import numpy as np
import pytest
from conftest import random_transformer, write_gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf import quants as gq

from flux2_mlx.config import text_encoder_shapes, tiny_spec, transformer_shapes
from flux2_mlx.dit_names import transformer_entries
from flux2_mlx.encoder_names import llama_cpp_to_hf, text_encoder_entries, unpermute_qk
from flux2_mlx.entries import check_keys
from flux2_mlx.weights import BF16, GGMLTensor, GGUFFile, WeightsError, WeightSource

CFG = tiny_spec("klein-4b").transformer
HIPREC = ("img_in.", "txt_in.", "time_in.", "guidance_in.", "final_layer.")  # kept BF16, as city96's files


def city96_type(name: str, a: np.ndarray, i: int) -> T:
    """1-D → F32; embedders / final layer → BF16; other matrices alternate Q8_0 / Q4_0."""
    if a.ndim == 1:
        return T.F32
    if name.startswith(HIPREC):
        return T.BF16
    return (T.Q8_0, T.Q4_0)[i % 2]


@pytest.fixture(scope="module")
def dit():
    return random_transformer(CFG, seed=4)


@pytest.fixture(scope="module")
def dit_types(dit):
    return {n: city96_type(n, a, i) for i, (n, a) in enumerate(dit.items())}


@pytest.fixture(scope="module")
def dit_gguf(dit, dit_types, tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "flux2-klein-Q.gguf", dit, dit_types)


def test_reader_gives_names_numpy_shapes_types_and_bytes(dit, dit_types, dit_gguf):
    f = GGUFFile(dit_gguf)
    assert set(f.keys()) == set(dit)
    assert {T.F32, T.BF16, T.Q8_0, T.Q4_0} <= set(dit_types.values())
    assert f.metadata["general.architecture"] == "flux"
    assert f.metadata["general.file_type"] == 7 and f.metadata["general.quantization_version"] == 2
    for name, a in dit.items():
        t = dit_types[name]
        assert f.shape(name) == a.shape  # numpy order (out, in), not GGUF's ne
        assert f.dtype(name) == t.name
        got = f.get(name)
        if t == T.F32:
            assert got.dtype == np.float32 and np.array_equal(got, a)
        elif t == T.BF16:
            assert got.dtype == BF16 and got.shape == a.shape
            assert np.array_equal(got.view(np.uint16), gq.quantize(a, t).view(np.uint16))
        else:
            assert isinstance(got, GGMLTensor) and got.ggml_type == t.name and got.shape == a.shape
            raw = gq.quantize(a, t)
            assert got.data.dtype == np.uint8 and got.data.shape == raw.shape == (a.shape[0], raw.shape[1])
            assert np.array_equal(got.data, raw)
            assert isinstance(got.data.base, np.memmap) or isinstance(got.data, np.memmap)  # a view, no copy
            assert np.array_equal(got.dequantize(), gq.dequantize(raw, t))


def test_transformer_entries_and_key_check_on_gguf(dit, dit_types, dit_gguf):
    entries = transformer_entries(WeightSource(dit_gguf))
    check_keys(entries, transformer_shapes(CFG), "gguf transformer")
    q = next(n for n, t in dit_types.items() if t == T.Q4_0)
    assert isinstance(entries[q].load(), GGMLTensor)
    assert np.array_equal(entries["double_blocks.0.img_attn.norm.query_norm.scale"].load(),
                          dit["double_blocks.0.img_attn.norm.query_norm.scale"])


@pytest.mark.parametrize("arch, prefix", [(None, ""), ("flux", "model.diffusion_model."),
                                          (None, "model.diffusion_model.")])
def test_prefixed_and_archless_files(dit, dit_types, tmp_path, arch, prefix):
    path = write_gguf(tmp_path / "m.gguf", dit, dit_types, arch=arch, prefix=prefix)
    source = WeightSource(path)
    assert ("general.architecture" in source.metadata) == (arch is not None)
    entries = transformer_entries(source)
    check_keys(entries, transformer_shapes(CFG), "gguf transformer")
    name = "single_blocks.0.linear1.weight"
    assert np.array_equal(entries[name].load().data, gq.quantize(dit[name], dit_types[name]))


def test_flux1_gguf_refused(tmp_path):
    rng = np.random.default_rng(0)
    t = {"double_blocks.0.img_mod.lin.weight": rng.standard_normal((64, 32)),
         "vector_in.in_layer.weight": rng.standard_normal((64, 32)),
         "img_in.weight": rng.standard_normal((64, 32))}
    path = write_gguf(tmp_path / "flux1-dev-Q8_0.gguf", t, {k: T.Q8_0 for k in t})
    with pytest.raises(WeightsError, match="FLUX.1"):
        transformer_entries(WeightSource(path))


def test_text_encoder_gguf_offered_as_transformer(tmp_path):
    t = {"token_embd.weight": np.ones((8, 32)), "blk.0.attn_q.weight": np.ones((32, 32))}
    path = write_gguf(tmp_path / "qwen.gguf", t, {k: T.F32 for k in t}, arch="qwen3")
    with pytest.raises(WeightsError, match="text encoder"):
        transformer_entries(WeightSource(path))


# ---- malformed files ----

def _one_tensor(path, t=T.F32, arch="flux"):
    a = np.arange(64 * 4, dtype=np.float32).reshape(4, 64) / 100
    return write_gguf(path, {"img_in.weight": a}, {"img_in.weight": t}, arch=arch)


def test_bad_magic(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(WeightsError, match="not a GGUF file"):
        WeightSource(tmp_path / "m.gguf")


@pytest.mark.parametrize("keep", [3, 10, 40, -8])
def test_truncated(tmp_path, keep):
    raw = _one_tensor(tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[:keep])
    with pytest.raises(WeightsError, match="truncated|not a GGUF") as e:
        WeightSource(tmp_path / "cut.gguf")
    assert "\n" not in str(e.value)


def test_unknown_type_id(tmp_path):
    raw = bytearray(_one_tensor(tmp_path / "m.gguf").read_bytes())
    name = b"img_in.weight"
    at = raw.index(name) + len(name)
    n_dims = int.from_bytes(raw[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(raw[type_at:type_at + 4], "little") == T.F32
    raw[type_at:type_at + 4] = (99).to_bytes(4, "little")
    (tmp_path / "odd.gguf").write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match=r"type id 99.*Q4_K"):
        WeightSource(tmp_path / "odd.gguf")


def test_unsupported_type_named_on_read(tmp_path):
    path = tmp_path / "iq.gguf"
    w = GGUFWriter(str(path), "flux")
    bs, ts = 32, 18  # IQ4_NL block
    w.add_tensor("img_in.weight", np.zeros((4, 64 // bs * ts), np.uint8), raw_dtype=T.IQ4_NL)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    source = WeightSource(path)
    assert source.dtype("img_in.weight") == "IQ4_NL" and source.shape("img_in.weight") == (4, 64)
    with pytest.raises(WeightsError, match=r"IQ4_NL, which flux2-mlx does not read.*Q8_0"):
        source.get("img_in.weight")


# ---- text encoders with llama.cpp names ----

# HF → llama.cpp, written out independently of encoder_names' table (from gguf-py's TENSOR_NAMES).
HF_TO_LCPP = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TO_LCPP = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def to_lcpp_name(hf: str) -> str:
    if hf in HF_TO_LCPP:
        return HF_TO_LCPP[hf]
    _, _, i, rest = hf.split(".", 3)
    module, param = rest.rsplit(".", 1)
    return f"blk.{i}.{LAYER_TO_LCPP[module]}.{param}"


def lcpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`: HF rotate-half rows → ggml adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state_dict(kind: str):
    """A tiny random transformers Qwen3ForCausalLM / MistralForCausalLM, one layer past the deepest output."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    te = tiny_spec("klein-4b" if kind == "qwen3" else "dev").text_encoder
    conf = {"vocab_size": te.vocab_size, "hidden_size": te.hidden_size,
            "intermediate_size": te.intermediate_size, "num_hidden_layers": max(te.output_layers) + 1,
            "num_attention_heads": te.num_attention_heads, "num_key_value_heads": te.num_key_value_heads,
            "head_dim": te.head_dim, "rms_norm_eps": te.rms_norm_eps}
    torch.manual_seed(0)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**conf, tie_word_embeddings=False))
    else:
        model = MistralForCausalLM(MistralConfig(**conf, sliding_window=None))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape))
    return te, {k: v.numpy().copy() for k, v in model.state_dict().items()}


def write_lcpp(path, te, sd, arch, permute: bool, quant: T = T.F32):
    """HF tensors → llama.cpp names (and Q/K permutation when `permute`), like convert_hf_to_gguf.py."""
    tensors, types = {}, {}
    for k, a in sd.items():
        if permute and k.endswith("self_attn.q_proj.weight"):
            a = lcpp_permute(a, te.num_attention_heads)
        elif permute and k.endswith("self_attn.k_proj.weight"):
            a = lcpp_permute(a, te.num_key_value_heads)
        tensors[to_lcpp_name(k)] = a
        types[to_lcpp_name(k)] = quant if a.ndim == 2 else T.F32
    return write_gguf(path, tensors, types, arch=arch)


@pytest.fixture(scope="module")
def hf():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = hf_state_dict(kind)
        return cache[kind]

    return get


def test_name_map_covers_both_directions():
    for hf_name in ["model.embed_tokens.weight", "model.layers.7.self_attn.q_norm.weight",
                    "model.layers.7.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]:
        assert llama_cpp_to_hf(to_lcpp_name(hf_name)) == hf_name
    assert llama_cpp_to_hf("rope_freqs.weight") is None


def test_permutation_round_trip():
    a = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    assert np.array_equal(unpermute_qk(lcpp_permute(a, 4), 4), a)
    assert not np.array_equal(lcpp_permute(a, 4), a)


CASES = [("qwen3", "qwen3", False), ("qwen3", None, False), ("mistral", "llama", True),
         ("mistral", "mistral3", True), ("mistral", None, True)]


@pytest.mark.parametrize("kind, arch, permute", CASES)
def test_llama_cpp_text_encoder_f32_equals_hf(hf, tmp_path, kind, arch, permute):
    te, sd = hf(kind)
    path = write_lcpp(tmp_path / "te.gguf", te, sd, arch, permute)
    entries = text_encoder_entries(WeightSource(path), te)
    check_keys(entries, text_encoder_shapes(te), "gguf text encoder")
    for name, e in entries.items():
        assert np.array_equal(e.load(), sd[name]), name


@pytest.mark.parametrize("kind, arch, permute", CASES[::2] + CASES[3:4])
def test_llama_cpp_text_encoder_q8_0(hf, tmp_path, kind, arch, permute):
    te, sd = hf(kind)
    path = write_lcpp(tmp_path / "te.gguf", te, sd, arch, permute, quant=T.Q8_0)
    source = WeightSource(path)
    entries = text_encoder_entries(source, te)
    check_keys(entries, text_encoder_shapes(te), "gguf text encoder")
    for name, e in entries.items():
        got = e.load()
        if sd[name].ndim == 1:
            assert np.array_equal(got, sd[name])
            continue
        assert isinstance(got, GGMLTensor) and got.ggml_type == "Q8_0" and got.shape == sd[name].shape
        # Q8_0 blocks lie within rows, so quantizing commutes with moving rows: the un-permuted raw rows
        # are exactly the HF tensor quantized in HF order.
        assert np.array_equal(got.data, gq.quantize(sd[name], T.Q8_0)), name
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            stored = source.get(to_lcpp_name(name))
            n = sd[name].shape[0] // te.head_dim
            # un-permute raw rows, then dequantize == dequantize, then un-permute
            expected = unpermute_qk(stored.dequantize(), n) if permute else stored.dequantize()
            assert np.array_equal(got.dequantize(), expected)
            assert permute == (not np.array_equal(stored.data, got.data))


def test_qwen3_norms_are_not_taken_for_projections(hf, tmp_path):
    te, sd = hf("qwen3")
    entries = text_encoder_entries(WeightSource(write_lcpp(tmp_path / "te.gguf", te, sd, "qwen3", False)), te)
    assert entries["model.layers.0.self_attn.q_norm.weight"].shape == (te.head_dim,)
    assert entries["model.layers.0.self_attn.q_proj.weight"].shape == (te.num_attention_heads * te.head_dim,
                                                                       te.hidden_size)


def test_transformer_gguf_offered_as_text_encoder(dit_gguf):
    with pytest.raises(WeightsError, match="not a text encoder"):
        text_encoder_entries(WeightSource(dit_gguf), tiny_spec("klein-4b").text_encoder)


def test_metadata_arrays_on_request(tmp_path):
    tokens = [f"t{i}" for i in range(200)]
    kv = {"tokenizer.ggml.model": "gpt2", "tokens": lambda w: w.add_token_list(tokens)}
    path = write_gguf(tmp_path / "m.gguf", {"img_in.weight": np.ones((4, 32))}, {"img_in.weight": T.F32},
                      kv=kv)
    f = GGUFFile(path)
    assert f.metadata["tokenizer.ggml.model"] == "gpt2"
    assert "tokenizer.ggml.tokens" not in f.metadata  # long arrays are decoded only when asked
    assert f.field("tokenizer.ggml.tokens") == tokens
    assert f.field("nope", 3) == 3


# ---- tokenizer rebuilt from GGUF metadata ----

PROMPTS = ["A red cat sits on a blue sofa.", "The QUICK brown fox's 123 jumps\n\n  over the lazy dog!!",
           "<|im_start|>user\nA photograph of a mountain lake<|im_end|>\n"
           "<|im_start|>assistant\n<think>\n\n</think>\n\n",
           "émigré ünïcödé 東京 🙂 don't I'll", "[INST]tabs\tand   spaces[/INST]</s>"]


def tokenizer_json_to_gguf(tokenizer_json, path, pre: str):
    """tokenizer.json → GGUF tokenizer metadata, as llama.cpp's converter writes it (gpt2 model, tokens
    by id, "a b" merges, CONTROL for special added tokens, USER_DEFINED for the other added tokens)."""
    import json

    from gguf import TokenType

    j = json.loads(tokenizer_json.read_text())
    vocab = {**j["model"]["vocab"], **{t["content"]: t["id"] for t in j["added_tokens"]}}
    tokens = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    types = [TokenType.NORMAL] * len(tokens)
    for t in j["added_tokens"]:
        types[t["id"]] = TokenType.CONTROL if t["special"] else TokenType.USER_DEFINED
    merges = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]

    def kv(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)

    return write_gguf(path, {"token_embd.weight": np.zeros((4, 32))}, {"token_embd.weight": T.F32},
                      arch="qwen3", kv={"tok": kv})


def test_qwen_test_tokenizer_round_trips_through_gguf(tmp_path):
    from conftest import write_qwen_tokenizer
    from tokenizers import Tokenizer

    from flux2_mlx.tokenizer import tokenizer_from_gguf

    write_qwen_tokenizer(tmp_path / "tokenizer.json")  # GPT-2's ByteLevel regex: pre "gpt2"
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = tokenizer_from_gguf(tokenizer_json_to_gguf(tmp_path / "tokenizer.json", tmp_path / "t.gguf",
                                                      "gpt2"))
    for p in PROMPTS:
        ids = ref.encode(p, add_special_tokens=False).ids
        assert ours.encode(p, add_special_tokens=False).ids == ids, p
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_tekken_tokenizer_round_trips_through_gguf(tmp_path):
    from conftest import write_tekken_tokenizer
    from tokenizers import Tokenizer

    from flux2_mlx.tokenizer import mistral_prompt, tokenizer_from_gguf

    _, tj = write_tekken_tokenizer(tmp_path)
    ref = Tokenizer.from_file(str(tj))
    ours = tokenizer_from_gguf(tokenizer_json_to_gguf(tj, tmp_path / "t.gguf", "tekken"))
    for p in PROMPTS + [mistral_prompt(p) for p in PROMPTS]:
        assert ours.encode(p, add_special_tokens=False).ids == ref.encode(p, add_special_tokens=False).ids, p


def test_tokenizer_from_gguf_refuses_unknown_pre(tmp_path):
    from conftest import write_qwen_tokenizer

    from flux2_mlx.tokenizer import tokenizer_from_gguf

    write_qwen_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(WeightsError, match="pre-tokenizer 'olmo'"):
        tokenizer_from_gguf(tokenizer_json_to_gguf(tmp_path / "tokenizer.json", tmp_path / "t.gguf", "olmo"))


def test_qwen2_pre_tokenizer_matches_qwen2_tokenizer_json(tmp_path):
    """The test vocabulary behind Qwen2/Qwen3's tokenizer.json pre-tokenizer (Split on Qwen2's regex, then
    ByteLevel without its own regex), as `tokenizer.ggml.pre = qwen2` files are tokenized."""
    import json

    from conftest import write_qwen_tokenizer
    from tokenizers import Tokenizer

    from flux2_mlx.tokenizer import tokenizer_from_gguf

    write_qwen_tokenizer(tmp_path / "tokenizer.json")
    j = json.loads((tmp_path / "tokenizer.json").read_text())
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                                               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    (tmp_path / "qwen2.json").write_text(json.dumps(j))
    ref = Tokenizer.from_file(str(tmp_path / "qwen2.json"))
    ours = tokenizer_from_gguf(tokenizer_json_to_gguf(tmp_path / "qwen2.json", tmp_path / "t.gguf", "qwen2"))
    for p in PROMPTS:
        assert ours.encode(p, add_special_tokens=False).ids == ref.encode(p, add_special_tokens=False).ids, p
    gpt2 = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).pre_tokenizer
    assert ours.pre_tokenizer.pre_tokenize_str("x 123") != gpt2.pre_tokenize_str("x 123")  # digits one by one


def test_hf_and_llama_cpp_names_are_inverse():
    from flux2_mlx.encoder_names import hf_to_llama_cpp, llama_cpp_to_hf, permute_qk

    for name in ["token_embd.weight", "output_norm.weight", "output.weight", "blk.7.attn_q_norm.weight",
                 "blk.0.attn_q.weight", "blk.12.ffn_down.weight", "blk.3.attn_output.weight"]:
        assert hf_to_llama_cpp(llama_cpp_to_hf(name)) == name
    a = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
    assert np.array_equal(unpermute_qk(permute_qk(a, 4), 4), a) and not np.array_equal(permute_qk(a, 4), a)
