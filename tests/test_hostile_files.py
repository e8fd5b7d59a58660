"""Each hostile or careless file of the robustness issue: refused at once with a WeightsError that names the
file (and the tensor or key), through the readers, `flux2 info` and loading; never a hang, a bare exception
or corrupt data accepted. Files are written byte by byte with tests/fuzzing.py's writers."""

import json
import re
import struct
import time

import numpy as np
import pytest
from click.testing import CliRunner
from fuzzing import (
    ARRAY,
    FLOAT32,
    INT32,
    STRING,
    UINT32,
    UINT64,
    build_specs,
    safetensors_header,
    write_gguf,
    write_safetensors,
)

from flux2_mlx.cli import main
from flux2_mlx.config import KLEIN_4B, QWEN3_4B
from flux2_mlx.dit_names import transformer_entries
from flux2_mlx.entries import transformer_config
from flux2_mlx.info import describe
from flux2_mlx.pipeline import encoder_config
from flux2_mlx.tokenizer import tokenizer_from_gguf
from flux2_mlx.weights import GGUFFile, SafetensorsFile, WeightsError, WeightSource


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    return build_specs(tmp_path_factory.mktemp("specs"))


def _st(specs):
    return specs["dit-bfl.safetensors"][2]


def _edit_header(spec, edit):
    h = safetensors_header(spec)
    edit(h)
    return write_safetensors(spec, h)


def _twice(spec, name="img_in.weight"):
    """The header text with `name` given twice (json.dumps cannot write that)."""
    h = safetensors_header(spec)
    return write_safetensors(spec, "{" + json.dumps({name: h[name]})[1:-1] + "," + json.dumps(h)[1:])


def _set(name, key, value):
    def edit(h):
        h[name][key] = value
    return edit


def _refused(path, match: str, reader=None):
    """The file's reader refuses it with one line naming the file, in well under a second."""
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=match) as e:
        (reader or (GGUFFile if path.suffix == ".gguf" else SafetensorsFile))(path)
    assert time.perf_counter() - start < 1 and path.name in str(e.value) and "\n" not in str(e.value)


SAFETENSORS_CASES = {
    "nested": (lambda s: write_safetensors(s, "[" * 100000 + "]" * 100000), "not JSON"),
    "list": (lambda s: write_safetensors(s, "[1, 2]"), "JSON list"),
    "string": (lambda s: write_safetensors(s, '"x"'), "JSON str"),
    "null": (lambda s: write_safetensors(s, "null"), "JSON NoneType"),
    "offsets as string": (lambda s: _edit_header(s, _set("img_in.weight", "data_offsets", "x")),
                          "data_offsets"),
    "offsets as floats": (lambda s: _edit_header(s, _set("img_in.weight", "data_offsets", [0.0, 1.5])),
                          "data_offsets"),
    "offset 1e30": (lambda s: _edit_header(s, _set("img_in.weight", "data_offsets", [0, 1e30])),
                    "data_offsets"),
    "offsets null": (lambda s: _edit_header(s, _set("img_in.weight", "data_offsets", None)), "data_offsets"),
    "negative offset": (lambda s: _edit_header(s, _set("img_in.weight", "data_offsets", [-4, 12])),
                        "data_offsets"),
    "shape as string": (lambda s: _edit_header(s, _set("img_in.weight", "shape", "x")), "shape"),
    "shape null": (lambda s: _edit_header(s, _set("img_in.weight", "shape", None)), "shape"),
    "shape floats": (lambda s: _edit_header(s, _set("img_in.weight", "shape", [1.5, 2])), "shape"),
    "shape that wraps int64": (lambda s: _edit_header(s, _set("img_in.weight", "shape", [2**32, 2**32])),
                               "too large"),
    "empty but huge": (lambda s: _edit_header(s, _set("img_in.weight", "shape", [2**62, 0])), "too large"),
    "metadata true": (lambda s: _edit_header(s, lambda h: h.update(__metadata__=True)), "__metadata__"),
    "metadata of ints": (lambda s: _edit_header(s, lambda h: h.update(__metadata__={"a": 1})),
                         "__metadata__"),
    "unknown dtype": (lambda s: _edit_header(s, _set("img_in.weight", "dtype", "F7")), "dtype 'F7'"),
    "entry not an object": (lambda s: _edit_header(s, lambda h: h.update({"img_in.weight": [1]})),
                            "JSON list"),
    "overlapping tensors": (lambda s: _edit_header(s, lambda h: h["txt_in.weight"].update(
        data_offsets=[h["img_in.weight"]["data_offsets"][0],
                      h["img_in.weight"]["data_offsets"][0] + 128 * 96 * 2])),
        "overlap"),
    "a gap": (lambda s: _edit_header(s, lambda h: [v.update(data_offsets=[o + 2 for o in v["data_offsets"]])
                                                  for k, v in h.items() if k != "__metadata__"]), "gap"),
    "name twice": (_twice, "twice"),
    "header length past the end": (lambda s: struct.pack("<Q", 2**63) + write_safetensors(s)[8:],
                                   "header length"),
    "bytes after the last tensor": (lambda s: write_safetensors(s) + b"junk", "follow the last tensor"),
    "truncated data": (lambda s: write_safetensors(s)[:-100], "truncated"),
    "latin-1 header": (lambda s: write_safetensors(s, '{"\xe9": 1}'.encode("latin-1")), "not JSON"),
}


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_safetensors_header_cases(specs, tmp_path, case):
    make, match = SAFETENSORS_CASES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(_st(specs)))
    _refused(path, match)


def _gguf(spec, kv=None, tensors=None, align=None):
    return write_gguf({"kv": spec["kv"] if kv is None else kv, "tensors": spec["tensors"] if tensors is None
                       else tensors, "align": spec["align"] if align is None else align})[0]


def _retyped(spec, key, vtype, value, etype=None):
    return _gguf(spec, kv=[(k, vtype, value, etype) if k == key else (k, t, v, e)
                           for k, t, v, e in spec["kv"]])


def _tensor(spec, which, **change):
    out = []
    for t in spec["tensors"]:
        if t[0] == which:
            shape, kind, raw = change.get("shape", t[1]), change.get("kind", t[2]), change.get("raw", t[3])
            t = (change.get("name", which), shape, kind, raw)
        out.append(t)
    return _gguf(spec, tensors=out)


def _field_bytes(spec, kind, index, value, width=8):
    data, fields = write_gguf(spec)
    at = [f for f in fields if f[0] == kind][index][1]
    return data[:at] + int(value).to_bytes(width, "little") + data[at + width:]


def _field_spec(spec):
    """The spec with its first tensor made empty (0 rows), so that its other axis costs no bytes."""
    name, shape, kind, _ = spec["tensors"][0]
    return {**spec, "tensors": [(name, (0, shape[1]), kind, b"")] + spec["tensors"][1:]}


GGUF_CASES = {
    "alignment 0": (lambda s: _retyped(s, "general.alignment", UINT32, 0), "general.alignment"),
    "alignment 3": (lambda s: _retyped(s, "general.alignment", UINT32, 3), "general.alignment"),
    "alignment inf": (lambda s: _retyped(s, "general.alignment", FLOAT32, float("inf")), "general.alignment"),
    "alignment string": (lambda s: _retyped(s, "general.alignment", STRING, ""), "general.alignment"),
    "alignment uint64": (lambda s: _retyped(s, "general.alignment", UINT64, 64), "general.alignment"),
    "empty but huge": (lambda s: _field_bytes(_field_spec(s), "tensor.dim", 1, 2**62), "too large"),
    "dim 2^64-2": (lambda s: _field_bytes(s, "tensor.dim", 0, 2**64 - 2), "too large"),
    "array of 2^64-1": (lambda s: _field_bytes(s, "kv.count", 0, 2**64 - 1), "claims"),
    "value type 99": (lambda s: _field_bytes(s, "kv.type", 0, 99, 4), "value type 99"),
    "string past the end": (lambda s: _field_bytes(s, "kv.str.len", 0, 2**40), "past the end"),
    "key twice": (lambda s: _gguf(s, kv=s["kv"] + s["kv"][:1]), "appears twice"),
    "tensor twice": (lambda s: _gguf(s, tensors=s["tensors"] + s["tensors"][:1]), "appears twice"),
    "overlapping data": (lambda s: _field_bytes(s, "tensor.offset", 1, 0), "overlaps"),
    "misaligned data": (lambda s: _field_bytes(s, "tensor.offset", 1, 1), "not aligned"),
    "five dims": (lambda s: _field_bytes(s, "tensor.n_dims", 0, 5, 4), "5 dimensions"),
    "counts past the file": (lambda s: _field_bytes(s, "n_kv", 0, 2**40), "more than the file can hold"),
    "row not whole blocks": (lambda s: _tensor(s, "img_in.weight", shape=(128, 100), raw=b""),
                             "not whole .* blocks"),
    "key not UTF-8": (lambda s: _gguf(s, kv=[(b"general.\xff", STRING, "x", None)] + s["kv"]), "UTF-8"),
    "truncated at 1000 bytes": (lambda s: _gguf(s)[:1000], "ends|past the end|truncated"),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_header_cases(specs, tmp_path, case):
    make, match = GGUF_CASES[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(make(specs["encoder.gguf" if case == "array of 2^64-1" else "dit.gguf"][2]))
    _refused(path, match)
    r = CliRunner().invoke(main, ["info", str(path)])  # flux2 info says the same, at once
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1


def test_tiny_gguf_with_an_endless_array(tmp_path):
    """A file of a few dozen bytes on which gguf-py's reader loops until memory runs out."""
    key = b"a"
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack(
        "<IIQ", ARRAY, INT32, 2**64 - 1)
    path = tmp_path / "tiny.gguf"
    path.write_bytes(data)
    _refused(path, "claims")
    start = time.perf_counter()
    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code == 2 and "claims" in r.stderr and time.perf_counter() - start < 1


def _loads_as_pipeline(path):
    source = WeightSource(path)
    cfg = transformer_config(transformer_entries(source), path, fallback=KLEIN_4B)
    import flux2_mlx.mlx_backend as be

    be.load_transformer(cfg, source, dtype=be.resolve_dtype("float32"))


ARCH_CASES = {  # well-formed files, wrong for FLUX.2: (tensor, change, message)
    "1-D img_in": ("img_in.weight", dict(shape=(128 * 128,)), r"img_in.weight (has shape )?\[16384\]"),
    "zero-sized query norm": ("double_blocks.0.img_attn.norm.query_norm.scale", dict(shape=(0,), raw=b""),
                              "query_norm.scale has shape \\[0\\]"),
    "norm stored as Q8_0": ("double_blocks.0.img_attn.norm.key_norm.scale",
                            dict(kind=8, raw=bytes(4 * 34)), "key_norm.scale \\[128\\] is stored as Q8_0"),
    "unsupported type": ("time_in.in_layer.weight", dict(kind=23, raw=bytes(128 * 136)), "stored as IQ4_XS"),
    "heads not 128": ("double_blocks.0.img_attn.norm.query_norm.scale", dict(shape=(64,), raw=bytes(256)),
                      "heads of 64"),
}


@pytest.mark.parametrize("case", ARCH_CASES)
def test_architecture_checks_name_file_and_tensor(specs, tmp_path, case):
    name, change, match = ARCH_CASES[case]
    path = tmp_path / "arch.gguf"
    path.write_bytes(_tensor(specs["dit.gguf"][2], name, **change))
    for fn in (_loads_as_pipeline, describe):
        with pytest.raises(WeightsError, match=match) as e:
            fn(path)
        assert "arch.gguf" in str(e.value)


def _encoder(spec, key, value, vtype=ARRAY, etype=STRING):
    return _gguf(spec, kv=[(k, vtype, value, etype) if k == key else (k, t, v, e)
                           for k, t, v, e in spec["kv"]])


@pytest.mark.parametrize("key,value,etype,match", [
    ("tokenizer.ggml.tokens", [1, 2, 3], INT32, "a list of str"),
    ("tokenizer.ggml.merges", ["nospace"], STRING, "not two tokens"),
    ("tokenizer.ggml.merges", ["zz qq"], STRING, "damaged"),
    ("tokenizer.ggml.token_type", [1, 2], INT32, "token types"),
    ("tokenizer.ggml.token_type", ["a"], STRING, "a list of int"),
])
def test_damaged_gguf_vocabulary(specs, tmp_path, key, value, etype, match):
    path = tmp_path / "enc.gguf"
    path.write_bytes(_encoder(specs["encoder.gguf"][2], key, value, etype=etype))
    with pytest.raises(WeightsError, match=match):
        tokenizer_from_gguf(path)
    with pytest.raises(WeightsError, match=match):
        describe(path)


@pytest.mark.parametrize("key,vtype,value,match", [
    ("qwen3.attention.head_count", UINT32, 0, "positive"),
    ("qwen3.attention.head_count", STRING, "4", "should be int"),
    ("qwen3.rope.freq_base", FLOAT32, float("nan"), "should be float"),
    ("qwen3.attention.head_count_kv", UINT32, 3, "cannot share"),
])
def test_damaged_encoder_hyper_parameters(specs, tmp_path, key, vtype, value, match):
    path = tmp_path / "enc.gguf"
    path.write_bytes(_encoder(specs["encoder.gguf"][2], key, value, vtype=vtype, etype=None))
    with pytest.raises(WeightsError, match=match) as e:
        encoder_config(WeightSource(path, partial=True), QWEN3_4B)
    assert "enc.gguf" in str(e.value)


def _row_bytes(spec, name):
    from flux2_mlx.quant.ggml import row_bytes

    shape, kind = next((t[1], t[2]) for t in spec["tensors"] if t[0] == name)
    return row_bytes(kind, shape[-1])


def test_info_refuses_what_generate_refuses(specs, tmp_path):
    spec = specs["dit.gguf"][2]
    cases = {
        "missing.gguf": (_gguf(spec, tensors=spec["tensors"][1:]),
                         "1 missing: img_in.weight|img_in.weight is missing"),
        "extra.gguf": (_gguf(spec, tensors=spec["tensors"] + [("extra.weight",) + spec["tensors"][0][1:]]),
                       "1 unexpected: extra.weight"),
        "misshaped.gguf": (_tensor(spec, "double_blocks.0.img_attn.proj.weight", shape=(64, 128), raw=bytes(
            64 * _row_bytes(spec, "double_blocks.0.img_attn.proj.weight"))),
            "img_attn.proj.weight \\[64, 128\\] \\(expected \\[128, 128\\]\\)"),
        "flux1.gguf": (_tensor(spec, "double_blocks.0.img_attn.qkv.weight",
                               name="double_blocks.0.img_mod.lin.weight"), "FLUX.1"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        r = CliRunner().invoke(main, ["info", str(tmp_path / name)])
        assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, (name, r.output)
        assert r.stderr.startswith("error: ") and name in r.stderr
        assert re.search(match, r.stderr), (name, r.stderr)
    (tmp_path / "good.gguf").write_bytes(_gguf(spec))
    r = CliRunner().invoke(main, ["info", str(tmp_path / "good.gguf")])
    assert r.exit_code == 0 and "FLUX.2 transformer" in r.stdout and "Q8_0" in r.stdout


def test_shards_that_disagree(specs, tmp_path):
    spec = _st(specs)
    for n in ("a", "b"):
        (tmp_path / f"{n}.safetensors").write_bytes(write_safetensors(spec))
    with pytest.raises(WeightsError, match="in both"):
        WeightSource(tmp_path)
    (tmp_path / "b.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    with pytest.raises(WeightsError, match="outside its folder"):
        WeightSource(tmp_path)


def test_untouched_files_still_read(specs, tmp_path):
    for name, (fmt, _, spec) in specs.items():
        data = write_safetensors(spec) if fmt == "safetensors" else write_gguf(spec)[0]
        (tmp_path / name).write_bytes(data)
        describe(tmp_path / name)
    np.testing.assert_array_equal(SafetensorsFile(tmp_path / "dit-bfl.safetensors").get("img_in.weight").view(
        np.uint16), np.frombuffer(_st(specs)["tensors"][0][3], np.uint16).reshape(128, 128))


def test_info_on_a_repo_folder_describes_each_component(tiny_repo, tmp_path):
    import shutil

    repo = shutil.copytree(tiny_repo, tmp_path / "repo")  # a copy: its VAE is damaged below
    r = CliRunner().invoke(main, ["info", str(repo)])
    assert r.exit_code == 0, r.output
    assert ("FLUX.2 transformer" in r.stdout and "text encoder: Qwen3" in r.stdout
            and "autoencoder" in r.stdout)
    (repo / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08" + bytes(20))
    r = CliRunner().invoke(main, ["info", str(repo)])
    assert r.exit_code == 2 and "vae" in r.stderr and len(r.stderr.splitlines()) == 1
