"""Fuzzing the weight-file readers: seeded mutations of tiny model files in the real layouts (a BFL and a
diffusers safetensors transformer, a quantized GGUF transformer, a llama.cpp Qwen3 GGUF with its vocabulary),
each run through the places a file is read: parsing (every tensor and metadata key), `flux2 info`'s
description, loading as the pipeline does (transformer, or text encoder and tokenizer), and planning a
`flux2 convert`.

A file may be refused, but only with the documented WeightsError / ValueError / OSError naming the file.
Mutations run in a worker process that a supervisor kills and restarts when one runs past the time cap, the
worker's memory grows past the cap, or it dies; each of those is reported with the mutation that caused it.
Mutation i depends only on (seed, i), so any report can be replayed with `scripts/fuzz.py --only I`.

Used by tests/test_fuzz.py (a few thousand mutations) and scripts/fuzz.py (as many as asked).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import queue
import re
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------- writers that record where each field is

STRING, ARRAY, UINT32, INT32, FLOAT32, UINT64 = 8, 9, 4, 5, 6, 10
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
           12: "<d"}


class _Out:
    def __init__(self):
        self.buf, self.fields = bytearray(), []  # fields: (kind, offset, width)

    def put(self, kind: str, fmt: str, value) -> None:
        self.fields.append((kind, len(self.buf), struct.calcsize(fmt)))
        self.buf += struct.pack(fmt, value)

    def string(self, kind: str, s: str | bytes) -> None:
        raw = s.encode() if isinstance(s, str) else s
        self.put(kind + ".len", "<Q", len(raw))
        self.fields.append((kind + ".bytes", len(self.buf), len(raw)))
        self.buf += raw

    def value(self, vtype: int, v, etype: int | None = None) -> None:
        if vtype == STRING:
            self.string("kv.str", v)
        elif vtype == ARRAY:
            self.put("kv.etype", "<I", etype)
            self.put("kv.count", "<Q", len(v))
            for x in v:
                self.value(etype, x)
        else:
            self.put("kv.scalar", _SCALAR[vtype], v)


def write_gguf(spec: dict) -> tuple[bytes, list]:
    """spec: {"kv": [(key, vtype, value, etype)], "tensors": [(name, numpy shape, ggml type id, raw)],
    "align": int} → (file bytes, [(field kind, offset, width)])."""
    o, align = _Out(), spec["align"]
    o.buf += b"GGUF"
    o.put("version", "<I", 3)
    o.put("n_tensors", "<Q", len(spec["tensors"]))
    o.put("n_kv", "<Q", len(spec["kv"]))
    for key, vtype, value, etype in spec["kv"]:
        o.string("kv.key", key)
        o.put("kv.type", "<I", vtype)
        o.value(vtype, value, etype)
    offset = 0
    for name, shape, kind, raw in spec["tensors"]:
        o.string("tensor.name", name)
        o.put("tensor.n_dims", "<I", len(shape))
        for d in reversed(shape):
            o.put("tensor.dim", "<Q", d)
        o.put("tensor.type", "<I", kind)
        o.put("tensor.offset", "<Q", offset)
        offset += len(raw) + (-len(raw)) % align
    o.buf += bytes(-len(o.buf) % align)
    for *_, raw in spec["tensors"]:
        o.buf += raw + bytes(-len(raw) % align)
    return bytes(o.buf), o.fields


def write_safetensors(spec: dict, header: dict | None = None) -> bytes:
    """spec: {"tensors": [(name, dtype, shape, raw)], "meta": {...}}; header: a (mutated) header to write
    instead of the one the tensors describe."""
    if header is None:
        header, offset = ({"__metadata__": spec["meta"]} if spec["meta"] else {}), 0
        for name, dtype, shape, raw in spec["tensors"]:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
            offset += len(raw)
    text = header if isinstance(header, (bytes, str)) else json.dumps(header)
    raw = text.encode() if isinstance(text, str) else text
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(t[3] for t in spec["tensors"])


def safetensors_header(spec: dict) -> dict:
    data = write_safetensors(spec)
    return json.loads(data[8:8 + struct.unpack_from("<Q", data)[0]])


_WRITTEN: dict[int, tuple] = {}  # id(spec) → (spec, bytes, fields): holding the spec keeps its id its own


def written(fmt: str, spec: dict) -> tuple[bytes, list]:
    """The unmutated file of a corpus spec (and a GGUF's fields), serialized once per process: most
    mutations start from it, and writing it took a quarter of the fuzzer's time."""
    hit = _WRITTEN.get(id(spec))
    if hit is None or hit[0] is not spec:
        data, fields = write_gguf(spec) if fmt == "gguf" else (write_safetensors(spec), [])
        hit = _WRITTEN[id(spec)] = (spec, data, fields)
    return hit[1], hit[2]


# ---------------------------------------------------------------- the corpus: tiny files in real layouts

def _dit_config():
    from flux2_mlx.config import TransformerConfig

    # The smallest FLUX.2 DiT: one head of 128 (the RoPE axes), one double and one single block.
    return TransformerConfig(in_channels=128, context_in_dim=96, hidden_size=128, num_heads=1, depth=1,
                             depth_single_blocks=1, use_guidance_embed=False)


def _raw(a: np.ndarray, kind) -> bytes:
    from flux2_mlx.quant.ggml import quantize

    return quantize(a, kind).tobytes()


def build_specs(folder: Path, seed: int = 0) -> dict[str, tuple[str, str, dict]]:
    """name → (format, role, spec) for the four base files."""
    import gguf
    from conftest import random_transformer, write_qwen_tokenizer

    from flux2_mlx.config import tiny_spec
    from flux2_mlx.convert import tokenizer_kv
    from flux2_mlx.dit_names import transformer_to_diffusers
    from flux2_mlx.encoder_names import hf_to_llama_cpp
    from flux2_mlx.quant.ggml import GGMLType as T
    from flux2_mlx.weights import f32_to_bf16

    dit = random_transformer(_dit_config(), seed)
    bf16 = [(n, "BF16", a.shape, f32_to_bf16(a).tobytes()) for n, a in dit.items()]
    diff = transformer_to_diffusers(dit)
    f16 = [(n, "F16", a.shape, a.astype(np.float16).tobytes()) for n, a in diff.items()]
    cycle_k, cycle_32 = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q3_K, T.Q2_K], [T.Q8_0, T.Q4_0, T.Q5_1, T.F16, T.BF16]
    gg = []
    for i, (n, a) in enumerate(dit.items()):
        kind = (T.F32 if a.ndim == 1 else cycle_k[i % 5] if a.shape[1] % 256 == 0 else cycle_32[i % 5])
        gg.append((n, a.shape, int(kind), _raw(a, kind)))
    flux_kv = [("general.architecture", STRING, "flux", None), ("general.alignment", UINT32, 64, None),
               ("general.name", STRING, "fuzz", None)]

    te = tiny_spec("klein-4b").text_encoder
    rng = np.random.default_rng(seed)
    hd, D, F = te.head_dim, te.hidden_size, te.intermediate_size
    hf = {"model.embed_tokens.weight": (te.vocab_size, D)}
    for i in range(max(te.output_layers)):
        p = f"model.layers.{i}."
        hf.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                   p + "self_attn.q_proj.weight": (te.num_attention_heads * hd, D),
                   p + "self_attn.k_proj.weight": (te.num_key_value_heads * hd, D),
                   p + "self_attn.v_proj.weight": (te.num_key_value_heads * hd, D),
                   p + "self_attn.o_proj.weight": (D, te.num_attention_heads * hd),
                   p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                   p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                   p + "mlp.down_proj.weight": (D, F)})
    enc = []
    for n, shape in hf.items():
        a = (rng.standard_normal(shape) * (0.1 if len(shape) == 2 else 1)).astype(np.float32)
        kind = T.F32 if a.ndim == 1 else T.Q8_0
        enc.append((hf_to_llama_cpp(n), shape, int(kind), _raw(a, kind)))
    write_qwen_tokenizer(folder / "tokenizer.json")
    types = {gguf.GGUFValueType.STRING: STRING, gguf.GGUFValueType.UINT32: UINT32}
    tok = []
    for key, value, vtype in tokenizer_kv(folder / "tokenizer.json", te.vocab_size, "qwen2"):
        if vtype == gguf.GGUFValueType.ARRAY:
            tok.append((key, ARRAY, value, STRING if isinstance(value[0], str) else INT32))
        else:
            tok.append((key, types[vtype], value, None))
    a = "qwen3"
    enc_kv = [("general.architecture", STRING, a, None),
              (f"{a}.block_count", UINT32, max(te.output_layers), None),
              (f"{a}.embedding_length", UINT32, D, None), (f"{a}.feed_forward_length", UINT32, F, None),
              (f"{a}.attention.head_count", UINT32, te.num_attention_heads, None),
              (f"{a}.attention.head_count_kv", UINT32, te.num_key_value_heads, None),
              (f"{a}.attention.key_length", UINT32, hd, None),
              (f"{a}.rope.freq_base", FLOAT32, te.rope_theta, None),
              (f"{a}.attention.layer_norm_rms_epsilon", FLOAT32, te.rms_norm_eps, None)] + tok
    return {"dit-bfl.safetensors": ("safetensors", "dit", {"tensors": bf16, "meta": {"format": "pt"}}),
            "dit-diffusers.safetensors": ("safetensors", "dit", {"tensors": f16, "meta": {}}),
            "dit.gguf": ("gguf", "dit", {"kv": flux_kv, "tensors": gg, "align": 64}),
            "encoder.gguf": ("gguf", "encoder", {"kv": enc_kv, "tensors": enc, "align": 32})}


# ---------------------------------------------------------------- mutations

_BOUND8 = [0, 1, 2, 3, 7, 8, 13, 31, 32, 33, 63, 64, 255, 256, 4096, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
           2**32 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
_BOUND4 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 30, 31, 39, 99, 255, 256, 2**31 - 1,
           2**31, 2**32 - 1]
_WEIRD = ["x", "", 1.5, 1e30, float("nan"), None, -1, -4, True, False, [], {}, [1, 2, 3], [-4, 12],
          [2**32, 2**32], [2**64], [2**32, 2**32, 0], "F32", "I8", "BOOL", "F8_E5M2", "F64", [0, 0], [[1]],
          2**70, [1.5, 2], ["1", "2"], [None], {"a": 1}, [0, 2**63]]
_DTYPES = ["F32", "F16", "BF16", "I32", "U8", "BOOL", "F8_E4M3", "F64", "I64", "I8", "F8_E5M2"]
_DTYPE_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F64": 8, "I64": 8,
               "I8": 1, "F8_E5M2": 1}
_FOREIGN_NAMES = ["img_mod.lin.weight", "vector_in.in_layer.weight", "encoder.conv_in.weight",
                  "decoder.conv_in.weight", "token_embd.weight", "model.embed_tokens.weight",
                  "blk.0.attn_q.weight", "double_blocks.7.img_attn.qkv.weight",
                  "single_blocks.x.linear1.weight", "", "a" * 300]


def _pos(rng, n: int, header: int) -> int:
    """A byte position, nine times in ten inside the header (where a flipped bit changes structure)."""
    return int(rng.integers(min(header, n))) if rng.random() < 0.9 or header >= n else int(rng.integers(n))


def _generic(rng, data: bytes, header: int) -> tuple[bytes, str]:
    b = bytearray(data)
    pick = rng.integers(5)
    if pick == 0:
        flips = [(_pos(rng, len(b), header), int(rng.integers(8))) for _ in range(int(rng.integers(1, 9)))]
        for p, bit in flips:
            b[p] ^= 1 << bit
        return bytes(b), f"flip bits {flips}"
    if pick == 1:
        width = int(rng.choice([1, 2, 4, 8]))
        p = _pos(rng, len(b) - width, header)
        v = int(rng.choice(_BOUND8)) % (1 << 8 * width)
        b[p:p + width] = v.to_bytes(width, "little")
        return bytes(b), f"{width} bytes at {p} = {v}"
    if pick == 2:
        cut = _pos(rng, len(b), header) if rng.random() < 0.7 else int(rng.integers(len(b)))
        return bytes(b[:cut]), f"truncate to {cut}"
    if pick == 3:
        p, n = _pos(rng, len(b), header), int(rng.integers(1, 64))
        return bytes(b[:p] + b[p + n:]), f"delete {n} bytes at {p}"
    p, n = _pos(rng, len(b), header), int(rng.integers(1, 64))
    return bytes(b[:p] + b[p:p + n] + b[p:]), f"repeat {n} bytes at {p}"


def _gguf_struct(rng, spec: dict) -> tuple[bytes, str]:
    data, fields = written("gguf", spec)
    b = bytearray(data)
    pick = rng.integers(4)
    names = [f for f in fields if f[0] in ("tensor.name.bytes", "kv.key.bytes")]
    if pick == 0:  # one name written over another of the same length
        same = [(x, y) for x in names for y in names if x != y and x[0] == y[0] and x[2] == y[2]]
        if same:
            (_, src, w), (_, dst, _) = same[int(rng.integers(len(same)))]
            b[dst:dst + w] = b[src:src + w]
            return bytes(b), f"name at {dst} = name at {src}"
    offsets = [f for f in fields if f[0] == "tensor.offset"]
    if pick == 1 and len(offsets) > 1:  # a tensor's data moved onto another's, or off alignment
        (_, a, _), (_, c, _) = (offsets[i] for i in rng.choice(len(offsets), 2, replace=False))
        delta = int(rng.choice([0, 1, 8, 32, -32]))
        v = (struct.unpack_from("<Q", b, c)[0] + delta) % 2**64
        b[a:a + 8] = struct.pack("<Q", v)
        return bytes(b), f"offset at {a} = offset at {c} + {delta}"
    kind, p, w = fields[int(rng.integers(len(fields)))]
    if w not in (4, 8):
        return _generic(rng, data, fields[-1][1])
    old = int.from_bytes(b[p:p + w], "little")
    choices = (_BOUND8 if w == 8 else _BOUND4) + [old + 1, max(old - 1, 0), old * 2]
    v = int(rng.choice(choices)) % (1 << 8 * w)
    b[p:p + w] = v.to_bytes(w, "little")
    return bytes(b), f"{kind} at {p}: {old} -> {v}"


def _json_edit(rng, spec: dict) -> tuple[bytes, str]:
    h = safetensors_header(spec)
    names = [n for n in h if n != "__metadata__"]
    name = names[int(rng.integers(len(names)))]
    weird = _WEIRD[int(rng.integers(len(_WEIRD)))]
    pick = rng.integers(9)
    if pick == 0:
        key = str(rng.choice(["dtype", "shape", "data_offsets"]))
        h[name][key] = weird
        desc = f"{name}.{key} = {weird!r}"
    elif pick == 1:
        h[name] = weird
        desc = f"{name} = {weird!r}"
    elif pick == 2:
        h["__metadata__"] = weird if rng.random() < 0.8 else {"k": "v"}
        desc = f"__metadata__ = {h['__metadata__']!r}"
    elif pick == 3:
        n = int(rng.choice([50, 1000, 100000]))
        opener = str(rng.choice(["[", '{"a":']))
        closer = "]" if opener == "[" else "}"
        return write_safetensors(spec, opener * n + "1" + closer * n), f"nested {opener} x{n}"
    elif pick == 4:
        return write_safetensors(spec, json.dumps(weird)), f"header = {weird!r}"
    elif pick == 5:  # a name twice: json.dumps cannot write that, so splice the text
        text = json.dumps(h)
        first = json.dumps({name: h[name]})[1:-1]
        return write_safetensors(spec, "{" + first + "," + text[1:]), f"{name} twice"
    elif pick == 6:
        other = names[int(rng.integers(len(names)))]
        h[name]["data_offsets"], h[other]["data_offsets"] = h[other]["data_offsets"], h[name]["data_offsets"]
        desc = f"offsets of {name} <-> {other}"
    elif pick == 7:
        shift = int(rng.choice([-8, -4, -1, 1, 4, 2**32, 2**63]))
        h[name]["data_offsets"] = [o + shift for o in h[name]["data_offsets"]]
        desc = f"{name} offsets + {shift}"
    else:
        data = write_safetensors(spec, h)
        n = struct.unpack_from("<Q", data)[0]
        v = int(rng.choice([0, 1, 2, n - 1, n + 1, n + 8, 2**63, 2**64 - 1, len(data), len(data) - 8]))
        return struct.pack("<Q", v % 2**64) + data[8:], f"header length {n} -> {v}"
    return write_safetensors(spec, h), desc


def _semantic(rng, fmt: str, spec: dict) -> tuple[bytes, str]:
    """Well-formed files with the wrong content: shapes, types, names, metadata."""
    from flux2_mlx.quant.ggml import GGMLType as T
    from flux2_mlx.quant.ggml import block_info

    spec = {**spec, "tensors": list(spec["tensors"]), **({"kv": list(spec["kv"])} if fmt == "gguf" else {})}
    ts = spec["tensors"]
    i = int(rng.integers(len(ts)))
    name, shape = ts[i][0], tuple(ts[i][2] if fmt == "safetensors" else ts[i][1])
    pick = int(rng.integers(7 if fmt == "safetensors" else 9))
    new_shape = [(math.prod(shape),), (1,) + shape, shape[:-1] + (0,), shape[::-1], (0,), shape + (2,)][
        int(rng.integers(6))]
    if pick == 0:  # reshape (bytes resized to match, so only the shape is wrong)
        if fmt == "safetensors":
            dt = ts[i][1]
            ts[i] = (name, dt, new_shape, bytes(_DTYPE_SIZE[dt] * math.prod(new_shape)))
        else:
            kind = T.F32 if new_shape and new_shape[-1] % 32 else T(ts[i][2])
            bs, sz = block_info(kind)
            if new_shape and new_shape[-1] % bs:
                kind, bs, sz = T.F32, 1, 4
            ts[i] = (name, new_shape, int(kind), bytes(math.prod(new_shape) // bs * sz))
        desc = f"{name} shape {shape} -> {new_shape}"
    elif pick == 1:  # another type
        if fmt == "safetensors":
            dt = _DTYPES[int(rng.integers(len(_DTYPES)))]
            ts[i] = (name, dt, shape, rng.bytes(_DTYPE_SIZE[dt] * math.prod(shape)))
            desc = f"{name} dtype {dt}"
        else:
            kind = T(int(rng.choice([0, 1, 2, 3, 8, 10, 12, 14, 16, 20, 24, 26, 27, 28, 29, 30, 34, 39])))
            bs, sz = block_info(kind)
            if shape[-1] % bs:
                return _semantic(rng, fmt, spec)
            ts[i] = (name, shape, int(kind), rng.bytes(math.prod(shape) // bs * sz))
            desc = f"{name} type {kind.name}"
    elif pick == 2:
        del ts[i]
        desc = f"drop {name}"
    elif pick == 3:
        new = _FOREIGN_NAMES[int(rng.integers(len(_FOREIGN_NAMES)))]
        ts[i] = (new,) + ts[i][1:]
        desc = f"rename {name} -> {new}"
    elif pick == 4:
        ts.append(("extra." + name,) + ts[i][1:])
        desc = f"extra copy of {name}"
    elif pick == 5:
        ts[i], ts[0] = ts[0], ts[i]
        desc = f"swap order of {name} and {ts[i][0]}"
    elif pick == 6 and fmt == "safetensors":
        spec["meta"] = {"format": "pt", "x": "y" * int(rng.integers(1, 1000))}
        desc = "longer metadata"
    else:  # GGUF metadata: a value of another type, size or content
        kv = spec["kv"]
        j = int(rng.integers(len(kv)))
        key, vtype, value, etype = kv[j]
        options = [(STRING, "x", None), (UINT32, 0, None), (INT32, -1, None), (UINT32, 2**32 - 1, None),
                   (FLOAT32, float("nan"), None), (FLOAT32, float("inf"), None), (FLOAT32, 0.0, None),
                   (UINT64, 2**63, None), (ARRAY, [], STRING), (ARRAY, [1, 2], INT32), (ARRAY, ["a"], STRING),
                   (STRING, "\u00e9" * 3, None), (UINT32, 3, None), (UINT32, 7, None)]
        if vtype == ARRAY and value:
            options += [(ARRAY, value[: len(value) // 2], etype), (ARRAY, value + value[:3], etype),
                        (ARRAY, [value[0]] * len(value), etype)]
            if etype == STRING:
                options += [(ARRAY, [v.replace(" ", "") for v in value], STRING),
                            (ARRAY, [v + " q" for v in value], STRING),
                            (ARRAY, list(range(len(value))), INT32)]
            else:
                options += [(ARRAY, [99] * len(value), etype), (ARRAY, [str(v) for v in value], STRING)]
        if pick == 7:
            vtype, value, etype = options[int(rng.integers(len(options)))]
            kv[j] = (key, vtype, value, etype)
            desc = f"kv {key} = {str(value)[:60]!r} (type {vtype})"
        else:
            del kv[j]
            desc = f"drop kv {key}"
    data = write_safetensors(spec) if fmt == "safetensors" else write_gguf(spec)[0]
    return data, desc


def mutate(seed: int, i: int, specs: dict) -> tuple[str, bytes, str]:
    """(base name, mutated bytes, description) of mutation i: a function of (seed, i) only."""
    rng = np.random.default_rng([seed, i])
    base = sorted(specs)[int(rng.integers(len(specs)))]
    fmt, _, spec = specs[base]
    data = written(fmt, spec)[0]
    header = 8 + struct.unpack_from("<Q", data)[0] if fmt == "safetensors" else \
        len(data) - sum(len(t[3]) for t in spec["tensors"])
    r = rng.random()
    if r < 0.35:
        data, desc = _generic(rng, data, header)
    elif r < 0.7:
        data, desc = _gguf_struct(rng, spec) if fmt == "gguf" else _json_edit(rng, spec)
    else:
        data, desc = _semantic(rng, fmt, spec)
    return base, data, desc


# ---------------------------------------------------------------- the targets

def _parse(path: Path) -> None:
    from flux2_mlx.weights import GGUFFile, SafetensorsFile

    f = GGUFFile(path) if path.suffix == ".gguf" else SafetensorsFile(path)
    for k in f.keys():
        f.shape(k), f.dtype(k), f.nbytes(k)
        a = f.get(k)
        np.asarray(getattr(a, "data", a)).view(np.uint8).sum()  # touch every byte
    if isinstance(f, GGUFFile):
        for k in f.metadata_keys():
            f.field(k)


def _info(path: Path) -> None:
    from flux2_mlx.info import describe

    describe(path)


def _load(path: Path, role: str) -> None:
    import flux2_mlx.mlx_backend as be
    from flux2_mlx.config import KLEIN_4B, QWEN3_4B
    from flux2_mlx.dit_names import transformer_entries
    from flux2_mlx.entries import transformer_config
    from flux2_mlx.pipeline import encoder_config
    from flux2_mlx.tokenizer import PromptTokenizer, tokenizer_from_gguf
    from flux2_mlx.weights import WeightSource

    dtype = be.resolve_dtype("float32")
    if role == "dit":  # as Pipeline.__init__ and Pipeline._load do
        source = WeightSource(path)
        cfg = transformer_config(transformer_entries(source), path, fallback=KLEIN_4B)
        be.load_transformer(cfg, WeightSource(path), dtype=dtype)
    else:  # as Pipeline.encode does for a GGUF encoder without a tokenizer.json
        tok = PromptTokenizer.from_config(tokenizer_from_gguf(path), QWEN3_4B, path)
        tok.encode(["a red fox"])
        source = WeightSource(path, partial=True)
        be.load_text_encoder(encoder_config(source, QWEN3_4B), source, dtype=dtype)


def _convert_plan(path: Path) -> None:
    from flux2_mlx.convert import plan_conversion

    plan_conversion(path, "Q4_K_M")


TARGETS = {"parse": lambda path, role: _parse(path), "info": lambda path, role: _info(path),
           "load": _load, "convert plan": lambda path, role: _convert_plan(path)}


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "flux2_mlx" in f.filename] or frames
    f = ours[-1] if ours else None
    return f"{Path(f.filename).name}:{f.lineno} {f.name}" if f else "?"


def run_targets(path: Path, role: str) -> list[dict]:
    """(problems, refused) reading `path` in every target: problems are undocumented exceptions and
    documented ones whose message does not name the file; refused: some target refused the file."""
    from flux2_mlx.weights import WeightsError

    bad, refused = [], False
    for target, fn in TARGETS.items():
        try:
            fn(path, role)
        except (WeightsError, ValueError, OSError) as e:
            refused = True
            if path.name not in str(e):
                bad.append(dict(target=target, kind="unnamed", exc=type(e).__name__, where=_where(e),
                                msg=str(e)[:300]))
        except Exception as e:
            bad.append(dict(target=target, kind="undocumented", exc=type(e).__name__, where=_where(e),
                            msg=str(e)[:300]))
    return bad, refused


# ---------------------------------------------------------------- worker and supervisor

def _status(key: str, pid: str = "self") -> int:
    m = re.search(rf"{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) * 1024 if m else 0


def worker(corpus: Path, seed: int) -> None:
    """Run the mutations listed as JSON on stdin, one JSON line each on stdout (the supervisor reads them)."""
    import warnings

    indices = json.loads(sys.stdin.readline())
    warnings.simplefilter("ignore")  # a mutated file may warn (NaN image, short vocabulary): not a failure
    specs = pickle.loads((corpus / "specs.pkl").read_bytes())
    for name, (_, role, _) in specs.items():  # warm up: imports, compiled kernels, first allocations
        assert run_targets(corpus / name, role) == ([], False), f"the unmutated {name} does not read cleanly"
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    work = corpus / f"w{os.getpid()}"
    work.mkdir(exist_ok=True)
    # FUZZ_INJECT="hang:I,blowup:J,crash:K" makes mutation I hang, J take memory, K abort (supervisor test).
    inject = {int(i): what
              for what, i in (x.split(":") for x in os.environ.get("FUZZ_INJECT", "").split(",") if x)}
    for i in indices:
        if inject.get(i) == "hang":
            time.sleep(3600)
        elif inject.get(i) == "crash":
            os.abort()
        base, data, desc = mutate(seed, i, specs)
        path = work / f"m{i}{Path(base).suffix}"
        path.write_bytes(data)
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak-RSS count
        before, start = _status("VmRSS"), time.perf_counter()
        hog = np.ones(400 << 20, np.uint8) if inject.get(i) == "blowup" else None
        del hog
        bad, refused = run_targets(path, specs[base][1])
        secs, grew = time.perf_counter() - start, _status("VmHWM") - before
        path.unlink()
        for b in bad:
            b.update(base=base, mutation=desc)
        out.write(json.dumps({"i": i, "secs": secs, "grew": grew, "base": base, "bad": bad,
                              "refused": refused, "rss": _status("VmRSS")}) + "\n")
        out.flush()


@dataclass
class Report:
    mutations: int = 0
    undocumented: list = field(default_factory=list)
    unnamed: list = field(default_factory=list)
    hangs: list = field(default_factory=list)
    blowups: list = field(default_factory=list)
    crashes: list = field(default_factory=list)
    refused: int = 0  # mutations some target refused with a documented, file-naming error
    seconds: float = 0.0
    slowest: float = 0.0
    most_memory: int = 0

    @property
    def failures(self) -> int:
        return sum(map(len, (self.undocumented, self.unnamed, self.hangs, self.blowups, self.crashes)))

    def summary(self) -> str:
        kinds = Counter((b["exc"], b["where"]) for b in self.undocumented + self.unnamed)
        lines = [f"{self.mutations} mutations ({self.refused} refused) in {self.seconds:.0f} s: "
                 f"{len(self.undocumented)} undocumented "
                 f"exceptions, {len(self.unnamed)} errors not naming the file, {len(self.hangs)} hangs, "
                 f"{len(self.blowups)} memory blow-ups, {len(self.crashes)} crashes; "
                 f"slowest {self.slowest:.2f} s, "
                 f"most memory added {self.most_memory / 2**20:.0f} MB"]
        lines += [f"  {n} x {exc} at {where}" for (exc, where), n in kinds.most_common(20)]
        for what in ("undocumented", "unnamed", "hangs", "blowups", "crashes"):
            for b in getattr(self, what)[:3]:
                lines.append(f"  e.g. {what}: {json.dumps(b)[:400]}")
        return "\n".join(lines)


def _spawn(corpus: Path, seed: int, indices: list[int]) -> subprocess.Popen:
    # gguf imports mistral-common when it is installed (a test dependency), 0.5 s of each worker's start;
    # the workers never use it.
    code = (f"import sys; sys.modules['mistral_common'] = None; sys.path[:0] = [{str(HERE)!r}]; "
            f"import fuzzing; fuzzing.worker(fuzzing.Path({str(corpus)!r}), {seed})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(indices) + "\n")
    proc.stdin.close()
    return proc


def _supervise(corpus: Path, seed: int, indices: list[int], report: Report, lock: threading.Lock,
               time_cap: float, mem_cap: int, startup: float = 300.0) -> None:
    """Run `indices` in worker processes, restarting after each hang, blow-up or crash."""
    todo = list(indices)
    while todo:
        proc = _spawn(corpus, seed, todo)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)],
                         daemon=True).start()
        err: list[str] = []
        threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
        ready, last, base_rss, failed = False, time.monotonic(), 0, None
        while True:
            try:
                line = lines.get(timeout=0.05)
            except queue.Empty:
                line = ""
            now = time.monotonic()
            if line is None:  # the worker ended
                proc.wait()
                if todo and proc.returncode != 0:
                    what = "crashes" if ready else None
                    failed = (what, dict(rc=proc.returncode, stderr="".join(err)[-600:]))
                break
            if line:
                msg = json.loads(line)
                if msg.get("ready"):
                    ready, base_rss = True, _status("VmRSS", str(proc.pid))
                else:  # the next mutation's growth counts from where this one left the worker
                    base_rss = msg["rss"]
                    todo.remove(msg["i"])
                    with lock:
                        _record(report, msg, time_cap, mem_cap)
                last = now
                continue
            limit = time_cap if ready else startup
            rss = _status("VmRSS", str(proc.pid)) if proc.poll() is None else 0
            if now - last > limit:
                failed = ("hangs" if ready else None, dict(seconds=round(now - last, 1)))
            elif ready and rss - base_rss > mem_cap:
                failed = ("blowups", dict(rss_growth=rss - base_rss))
            if failed:
                proc.kill()
                proc.wait()
                break
        if failed is None:
            continue
        what, info = failed
        if what is None:
            raise RuntimeError(f"the fuzz worker did not start: {info} {''.join(err)[-2000:]}")
        i = todo.pop(0)
        base, _, desc = mutate(seed, i, pickle.loads((corpus / "specs.pkl").read_bytes()))
        with lock:
            report.mutations += 1
            getattr(report, what).append(dict(i=i, base=base, mutation=desc, **info))


def _record(report: Report, msg: dict, time_cap: float, mem_cap: int) -> None:
    report.mutations += 1
    report.slowest = max(report.slowest, msg["secs"])
    report.most_memory = max(report.most_memory, msg["grew"])
    report.refused += msg["refused"]
    for b in msg["bad"]:
        getattr(report, b["kind"]).append(dict(i=msg["i"], **b))
    if msg["secs"] > time_cap:
        report.hangs.append(dict(i=msg["i"], base=msg["base"], seconds=msg["secs"]))
    if msg["grew"] > mem_cap:
        report.blowups.append(dict(i=msg["i"], base=msg["base"], grew=msg["grew"]))


def prepare(corpus: Path, seed: int = 0) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    specs = build_specs(corpus, seed)
    for name, (fmt, _, spec) in specs.items():
        (corpus / name).write_bytes(write_safetensors(spec) if fmt == "safetensors" else write_gguf(spec)[0])
    (corpus / "specs.pkl").write_bytes(pickle.dumps(specs))


def fuzz(corpus: Path, seed: int, indices: list[int], jobs: int = 1, time_cap: float = 5.0,
         mem_cap: int = 1 << 30) -> Report:
    """Mutations `indices` of the corpus that `prepare` wrote, over `jobs` supervised workers."""
    report, lock, errors = Report(), threading.Lock(), []
    start = time.perf_counter()

    def run(part):
        try:
            _supervise(corpus, seed, part, report, lock, time_cap, mem_cap)
        except Exception as e:  # re-raised below, in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(indices[k::jobs],))
               for k in range(jobs) if indices[k::jobs]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    report.seconds = time.perf_counter() - start
    return report
