"""Lazy, memory-mapped weight sources: safetensors files, sharded folders, GGUF files, a safetensors writer.

Numpy only. bf16 has no numpy dtype, so bf16 tensors come back as the structured dtype `BF16`
(raw uint16 bits) which survives reshapes, slices and concatenation and tells backends what it is.
FP8 (`F8_E4M3`, `F8_E5M2`, as in Qwen3-*-FP8 checkpoints) works the same way with one byte per value.
The dtype decoders (to_float32, FP8Blocks.dequantize for block-scaled FP8 weights) return float32.
GGUF files are memory-mapped (the header parsed here); quantized tensors come back as `GGMLTensor`
(raw ggml blocks, never dequantized here) and their numpy shapes are GGUF's `ne` reversed (out, in).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BF16 = np.dtype([("bf16", "<u2")])
F8_E4M3 = np.dtype([("f8_e4m3", "u1")])  # torch.float8_e4m3fn: bias 7, no inf, 0x7F/0xFF = NaN
F8_E5M2 = np.dtype([("f8_e5m2", "u1")])  # torch.float8_e5m2: the high byte of an IEEE float16
F8_E8M0 = np.dtype([("f8_e8m0", "u1")])  # torch.float8_e8m0fnu: 2^(bits - 127), MXFP8's block scales

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BF16,
    "F8_E4M3": F8_E4M3, "F8_E5M2": F8_E5M2, "F8_E8M0": F8_E8M0,
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


class WeightsError(ValueError):
    """A weights file or folder that cannot be used as asked; the message says what to do."""


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_round_bits(u):
    """float32 bit patterns (uint32) rounded to the nearest bfloat16, ties to even as torch rounds; the low
    16 bits come back zero. Plain arithmetic on numpy uint32 constants, so that the compiled quantization
    kernels run this same function (quant/jit.py compiles it)."""
    return (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)


def f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 → `BF16`, rounded to nearest even."""
    u = bf16_round_bits(np.ascontiguousarray(a, dtype=np.float32).view(np.uint32))
    return (u >> np.uint32(16)).astype(np.uint16).view(BF16)


def _e4m3_table() -> np.ndarray:
    code = np.arange(256)
    sign = np.where(code & 0x80, -1.0, 1.0)
    exp, man = (code >> 3) & 0xF, code & 0x7
    mag = np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp - 7))  # subnormals at exp 0
    table = (sign * mag).astype(np.float32)  # exact: every e4m3 value is a float32
    table[(code & 0x7F) == 0x7F] = np.copysign(np.nan, sign[(code & 0x7F) == 0x7F])
    return table


_E4M3_TO_F32 = _e4m3_table()


def fp8_e4m3_to_f32(a: np.ndarray) -> np.ndarray:
    """Exact decode of `F8_E4M3` (or raw uint8) bits to a new float32 array of the same shape."""
    return _E4M3_TO_F32[np.asarray(a).view(np.uint8)]


def fp8_e5m2_to_f32(a: np.ndarray) -> np.ndarray:
    """Exact decode of `F8_E5M2` (or raw uint8) bits: e5m2 is the upper byte of a float16."""
    return (np.asarray(a).view(np.uint8).astype(np.uint16) << 8).view(np.float16).astype(np.float32)


def to_float32(a: np.ndarray) -> np.ndarray:
    if a.dtype == BF16:
        return bf16_to_f32(a)
    if a.dtype == F8_E4M3:
        return fp8_e4m3_to_f32(a)
    if a.dtype == F8_E5M2:
        return fp8_e5m2_to_f32(a)
    return np.asarray(a, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class FP8Blocks:
    """A block-scaled FP8 matrix as stored: `codes` (F8_E4M3 / F8_E5M2 bits, (n, k)) and `scale_inv`
    (float32, one per block of `block` rows × columns; the last block of an axis may be short). The MLX
    backend decodes it on load; torch keeps the codes, one byte per weight, and decodes a layer just
    before its matmul."""

    codes: np.ndarray
    scale_inv: np.ndarray
    block: tuple[int, int]

    def __post_init__(self):
        if self.codes.ndim != 2:
            raise WeightsError(f"an FP8 weight of shape {list(self.codes.shape)} is not a matrix")
        (n, k), (bn, bk) = self.codes.shape, self.block
        if self.scale_inv.shape != (-(-n // bn), -(-k // bk)):  # ceil(n / bn), ceil(k / bk)
            raise WeightsError(f"FP8 scale grid {list(self.scale_inv.shape)} does not fit weight {[n, k]} in "
                               f"blocks of {list(self.block)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        """float32: each block times its scale_inv (exact decode, one rounding per product). Allocates
        the float32 result only (scales are expanded over rows)."""
        out = to_float32(self.codes)
        (n, _), (bn, bk) = out.shape, self.block
        rows = np.repeat(to_float32(self.scale_inv), bn, axis=0)[:n]  # (n, column blocks)
        for j in range(rows.shape[1]):
            out[:, j * bk:(j + 1) * bk] *= rows[:, j:j + 1]
        return out


def _pread(path: Path, offset: int, nbytes: int) -> np.ndarray:
    """`nbytes` bytes at `offset`, read into a fresh array; a short read (the file shrank) is an error."""
    out = np.empty(nbytes, np.uint8)
    view, done = memoryview(out), 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise WeightsError(f"{path}: the file ended {nbytes - done} bytes early while reading "
                                   f"weights; it was truncated or replaced during the run; download it again")
            done += n
    return out


def _fail(path, what: str) -> WeightsError:
    return WeightsError(f"{path}: {what}; the file is damaged or not what it claims to be (download it "
                        f"again)")


_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers


def _unique_pairs(pairs: list) -> dict:
    """json object hook: a name given twice is an error (json.loads would keep the last silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


class _Duplicate(Exception):
    pass


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _too_large(shape) -> bool:
    """A shape numpy cannot even describe: its size must fit an index, zero-length axes aside (an empty
    tensor takes no bytes, so the file size alone does not bound its other axes)."""
    return math.prod(max(int(d), 1) for d in shape) > 2**59


class SafetensorsFile:
    """One .safetensors file: a JSON header parsed and checked up front, tensors as views of one np.memmap.

    Checked as the safetensors library does before anything is mapped: a JSON object of entries with a
    known dtype, a shape of non-negative ints and [start, end] offsets whose length is dtype × shape
    (counted in Python ints, so no count can wrap), laid end to end over the whole data section with no
    gap or overlap; no name twice; `__metadata__` a str → str map."""

    def __init__(self, path: str | os.PathLike):
        self.path = path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or 8 + n > size or n > _SAFETENSORS_MAX_HEADER:
                raise WeightsError(f"{path}: not a safetensors file, or truncated (bad header length)")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_pairs)
        except _Duplicate as e:
            raise _fail(path, f"the header names {e.args[0]!r} twice") from None
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deep
            raise WeightsError(f"{path}: not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise _fail(path, f"the header is a JSON {type(header).__name__}, not an object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise _fail(path, "__metadata__ is not a map of strings")
        self.metadata = meta
        data_len = size - 8 - n
        self._info: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, t in header.items():
            self._info[name] = self._entry(name, t, 8 + n)
        end = 8 + n
        for name, (_dt, _shape, start, stop) in sorted(self._info.items(), key=lambda kv: kv[1][2:]):
            if start != end:
                raise _fail(path, f"tensor {name!r} starts at data byte {start - 8 - n}, expected "
                                  f"{end - 8 - n} (tensors overlap or leave a gap)")
            end = stop
        if end > size:
            raise WeightsError(f"{path}: truncated (its tensors need {end - 8 - n} data bytes, the file has "
                               f"{data_len}); download it again")
        if end < size:
            raise _fail(path, f"{size - end} bytes follow the last tensor")
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size else None
        self.pread = False  # True: get() copies with read calls instead of returning memmap views

    def _entry(self, name: str, t, base: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
        if not isinstance(t, dict):
            raise _fail(self.path, f"tensor {name!r} is described by a JSON {type(t).__name__}, not an "
                                   f"object")
        dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise WeightsError(f"{self.path}: tensor {name!r} has dtype {dtype!r}, which flux2-mlx does not "
                               f"read ({', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _fail(self.path, f"tensor {name!r} has shape {shape!r}, not a list of non-negative "
                                   f"integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _fail(self.path, f"tensor {name!r} has data_offsets {offsets!r}, not [start, end] with "
                                   f"0 <= start <= end")
        if _too_large(shape):
            raise _fail(self.path, f"tensor {name!r} has shape {shape}, too large for any array")
        start, end = offsets
        want = _DTYPES[dtype].itemsize * math.prod(shape)
        if end - start != want:
            raise _fail(self.path, f"tensor {name!r} ({dtype} {shape}) needs {want} bytes but its offsets "
                                   f"span {end - start}")
        return _DTYPES[dtype], tuple(shape), base + start, base + end

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def dtype(self, name: str) -> str:
        return _NAMES[self._info[name][0]]

    def nbytes(self, name: str) -> int:
        _dtype, _shape, start, end = self._info[name]
        return end - start

    def get(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self._info[name]
        data = _pread(self.path, start, end - start) if self.pread else self._mm[start:end]
        return data.view(dtype).reshape(shape)


# ggml block types flux2-mlx runs; F32/F16/BF16 (and the integer types) come back as plain arrays. Anything
# else gguf-py knows (IQ*, TQ*, MXFP4, ...) is refused when read.
GGML_QUANTIZED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_GGML_DENSE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"), "BF16": BF16,
               "I8": np.dtype("i1"), "I16": np.dtype("<i2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8")}
_GGML_SUPPORTED = ", ".join(["F32", "F16", "BF16", *GGML_QUANTIZED])
_METADATA_ARRAY_MAX = 64  # longer arrays (tokenizer vocabularies) are decoded only on request


@dataclass(frozen=True, eq=False)
class GGMLTensor:
    """A quantized GGUF tensor, undecoded: `data` is a read-only memmap view (rows, row_bytes) of whole
    ggml blocks along the last (input) axis, `shape` the numpy shape (out, in), `ggml_type` e.g. "Q4_K"."""

    data: np.ndarray
    ggml_type: str
    shape: tuple[int, ...]

    def dequantize(self) -> np.ndarray:
        """float32 values, decoded by gguf-py's reference codec: what the backends' repacked and block
        layers multiply by, bit for bit. The loaders never call it; a DoRA beside the blocks takes its
        norms from it."""
        from gguf import GGMLQuantizationType, quants

        return np.asarray(quants.dequantize(self.data, GGMLQuantizationType[self.ggml_type]),
                          dtype=np.float32).reshape(self.shape)


_GGUF_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                 11: "<i8", 12: "<f8"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_UINT32 = 4
_GGML_MAX_DIMS = 4  # ggml's limit; llama.cpp refuses tensors with more


class _Corrupt(Exception):
    """A GGUF header field that is out of range; the message says which."""


def _gguf_string(buf, off: int, what: str, decode: bool = True) -> tuple[str | None, int]:
    if off + 8 > len(buf):
        raise _Corrupt(f"the file ends inside {what}")
    (n,) = struct.unpack_from("<Q", buf, off)
    if n > len(buf) - off - 8:
        raise _Corrupt(f"{what} is {n} bytes long, past the end of the file")
    if not decode:
        return None, off + 8 + n
    try:
        return bytes(buf[off + 8:off + 8 + n]).decode("utf-8"), off + 8 + n
    except UnicodeDecodeError:
        raise _Corrupt(f"{what} is not valid UTF-8") from None


def _gguf_strings(buf, off: int, count: int, what: str, decode: bool) -> tuple[list[str] | None, int]:
    """`count` GGUF strings from `off`, checked as _gguf_string checks one. A tokenizer's vocabulary and
    merges hold ~150k each: one tight loop over a memoryview (slicing the memmap itself makes an array
    object per string) takes a fifth of the time."""
    mv, end, unpack = memoryview(buf), len(buf), struct.Struct("<Q").unpack_from
    out = [] if decode else None
    for i in range(count):
        if off + 8 > end:
            raise _Corrupt(f"the file ends inside {what}[{i}]")
        (n,) = unpack(mv, off)
        off += 8
        if n > end - off:
            raise _Corrupt(f"{what}[{i}] is {n} bytes long, past the end of the file")
        if decode:
            try:
                out.append(str(mv[off:off + n], "utf-8"))
            except UnicodeDecodeError:
                raise _Corrupt(f"{what}[{i}] is not valid UTF-8") from None
        off += n
    return out, off


def _gguf_value(buf, off: int, vtype: int, what: str, decode: bool = True):
    """(value, offset after it) of one GGUF metadata value at `off`; decode=False only skips over it.
    Every count is checked against the bytes left before anything is allocated; arrays of arrays, which
    llama.cpp refuses too, are refused."""
    if vtype == _GGUF_STRING:
        return _gguf_string(buf, off, what, decode)
    if vtype == _GGUF_ARRAY:
        if off + 12 > len(buf):
            raise _Corrupt(f"the file ends inside {what}")
        etype, count = struct.unpack_from("<IQ", buf, off)
        off += 12
        if etype in _GGUF_SCALARS:
            size = np.dtype(_GGUF_SCALARS[etype]).itemsize
            if count > (len(buf) - off) // size:
                raise _Corrupt(f"{what} claims {count} values, more than the file holds")
            values = np.frombuffer(buf, _GGUF_SCALARS[etype], count, off).tolist() if decode else None
            return values, off + size * count
        if etype != _GGUF_STRING:
            raise _Corrupt(f"{what} is an array of value type {etype}, which GGUF does not allow")
        if count > (len(buf) - off) // 8:
            raise _Corrupt(f"{what} claims {count} strings, more than the file holds")
        return _gguf_strings(buf, off, count, what, decode)
    if vtype not in _GGUF_SCALARS:
        raise _Corrupt(f"{what} has value type {vtype}, which GGUF does not define")
    dt = np.dtype(_GGUF_SCALARS[vtype])
    if off + dt.itemsize > len(buf):
        raise _Corrupt(f"the file ends inside {what}")
    return (np.frombuffer(buf, dt, 1, off)[0].item() if decode else None), off + dt.itemsize


@dataclass(frozen=True)
class _GGUFTensor:
    ggml_type: str
    shape: tuple[int, ...]  # numpy order (GGUF's ne reversed)
    offset: int  # absolute, in the file
    n_bytes: int


def _field_ok(value, kind) -> bool:
    if kind is int:
        return _is_int(value)
    if kind is float:
        return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if isinstance(kind, tuple):  # (list, element kind)
        if not isinstance(value, list):
            return False
        if kind[1] in (str, int):  # by the set of types (bool is not int here): a 131k vocabulary in 5 ms
            return set(map(type, value)) <= {kind[1]}
        return all(_field_ok(v, kind[1]) for v in value)
    return isinstance(value, kind)


class GGUFFile:
    """One .gguf file (versions 2 and 3), same interface as SafetensorsFile; tensors are memmap views.

    The header is parsed here rather than by gguf-py's GGUFReader, which makes a numpy view per array
    element (~10 s to open a Mistral GGUF for its 131k-token vocabulary; 0.1 s here) and trusts counts
    (an array length of 2^64 - 1 makes it loop until memory runs out). Checked as llama.cpp's loader does:
    every count and length against the bytes left, UTF-8 names, no key or tensor name twice, a power-of-two
    `general.alignment`, 1-4 dims whose rows are whole ggml blocks, tensor data aligned, in order, not
    overlapping and inside the file. `metadata` holds every scalar and short array; `field(key)` decodes
    any key on request, long arrays (tokenizer tokens, merges) included."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise WeightsError(f"{self.path}: not a GGUF file (bad magic {magic!r}); is the download "
                               f"complete?")
        self._mm = buf = np.memmap(self.path, np.uint8, "r")
        self.pread = False
        self.metadata, self._fields, self._tensors = {}, {}, {}
        if buf.size < 24:
            raise WeightsError(f"{self.path}: truncated GGUF header ({buf.size} bytes); download it again")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version in (2 << 24, 3 << 24):
            raise WeightsError(f"{self.path}: a big-endian GGUF file; flux2-mlx reads little-endian files "
                               f"only")
        if version not in (2, 3):
            raise WeightsError(f"{self.path}: GGUF version {version}; flux2-mlx reads versions 2 and 3")
        try:
            self._parse(memoryview(buf), n_tensors, n_kv)  # a memmap slice would make an array per string
        except _Corrupt as e:
            raise _fail(self.path, str(e)) from None

    def _parse(self, buf, n_tensors: int, n_kv: int) -> None:
        from .quant.ggml import GGMLType, block_info

        # The smallest key-value pair takes 13 bytes and the smallest tensor record 32.
        if n_kv > (len(buf) - 24) // 13 or n_tensors > (len(buf) - 24) // 32:
            raise _Corrupt(f"the header counts {n_kv} metadata keys and {n_tensors} tensors, more than the "
                           f"file can hold")
        off = 24
        for i in range(n_kv):
            key, off = _gguf_string(buf, off, f"metadata key {i}")
            if key in self._fields:
                raise _Corrupt(f"metadata key {key!r} appears twice")
            if off + 4 > len(buf):
                raise _Corrupt(f"the file ends inside metadata key {key!r}")
            (vtype,) = struct.unpack_from("<I", buf, off)
            self._fields[key] = (vtype, off + 4)
            long = vtype == _GGUF_ARRAY and off + 16 <= len(buf) and \
                struct.unpack_from("<Q", buf, off + 8)[0] > _METADATA_ARRAY_MAX
            value, off = _gguf_value(buf, off + 4, vtype, f"metadata key {key!r}", decode=not long)
            if not long:
                self.metadata[key] = value
        align = 32
        if "general.alignment" in self._fields:
            align = self.metadata["general.alignment"]
            if self._fields["general.alignment"][0] != _GGUF_UINT32 or align <= 0 or align & (align - 1):
                raise _Corrupt(f"general.alignment is {align!r}, not a power of two stored as uint32")
        infos = []
        for i in range(n_tensors):
            name, off = _gguf_string(buf, off, f"the name of tensor {i}")
            if off + 4 > len(buf):
                raise _Corrupt(f"the file ends inside tensor {name!r}")
            (n_dims,) = struct.unpack_from("<I", buf, off)
            if not 1 <= n_dims <= _GGML_MAX_DIMS:
                raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (1 to {_GGML_MAX_DIMS} allowed)")
            if off + 16 + 8 * n_dims > len(buf):
                raise _Corrupt(f"the file ends inside tensor {name!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
            kind, rel = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
            off += 16 + 8 * n_dims
            infos.append((name, dims, kind, rel))
        start = off + (-off) % align
        end = start
        for name, dims, kind, rel in infos:
            if name in self._tensors:
                raise _Corrupt(f"tensor {name!r} appears twice")
            try:
                t = GGMLType(kind)
                bs, ts = block_info(t)
            except (ValueError, KeyError):
                raise WeightsError(f"{self.path}: tensor {name!r} has ggml type id {kind}, which gguf-py "
                                   f"does not know; flux2-mlx reads {_GGML_SUPPORTED}") from None
            if _too_large(dims):
                raise _Corrupt(f"tensor {name!r} has dims {list(dims)}, too large for any array")
            if dims[0] % bs:
                raise _Corrupt(f"tensor {name!r} has rows of {dims[0]} values, not whole {t.name} blocks of "
                               f"{bs}")
            n_bytes = math.prod(dims) // bs * ts  # Python ints: a huge dim cannot wrap the count
            if rel % align or start + rel < end:
                raise _Corrupt(f"tensor {name!r} starts at data byte {rel}, which is not aligned to {align} "
                               f"or overlaps the tensor before it")
            end = start + rel + n_bytes
            if end > len(buf):
                raise WeightsError(f"{self.path}: truncated (tensor {name!r} lies outside the file); "
                                   f"download it again")
            shape = tuple(int(d) for d in reversed(dims))
            self._tensors[name] = _GGUFTensor(t.name, shape, start + rel, n_bytes)

    def field(self, key: str, default=None, kind=None):
        """Any metadata value, decoded now (lists of str for tokenizer vocabularies and merges). kind: the
        Python type the value must have (int, float, str, or (list, element type)); another is an error."""
        if key not in self._fields:
            return default
        vtype, off = self._fields[key]
        try:
            value = _gguf_value(self._mm, off, vtype, f"metadata key {key!r}")[0]
        except _Corrupt as e:
            raise _fail(self.path, str(e)) from None
        if kind is not None and not _field_ok(value, kind):
            name = f"a list of {kind[1].__name__}" if isinstance(kind, tuple) else kind.__name__
            raise _fail(self.path, f"metadata key {key!r} should be {name}")
        return value

    def metadata_keys(self) -> list[str]:
        """Every metadata key, long arrays included (decode one with `field`)."""
        return list(self._fields)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def dtype(self, name: str) -> str:
        return self._tensors[name].ggml_type

    def nbytes(self, name: str) -> int:
        return self._tensors[name].n_bytes

    def get(self, name: str) -> np.ndarray | GGMLTensor:
        t = self._tensors[name]
        kind, shape = t.ggml_type, t.shape
        if kind not in _GGML_DENSE and kind not in GGML_QUANTIZED:
            raise WeightsError(f"{self.path}: tensor {name!r} is {kind}, which flux2-mlx does not read; "
                               f"supported types: {_GGML_SUPPORTED}")
        data = (_pread(self.path, t.offset, t.n_bytes) if self.pread
                else self._mm[t.offset:t.offset + t.n_bytes])
        if kind in _GGML_DENSE:
            return data.view(_GGML_DENSE[kind]).reshape(shape)
        rows = math.prod(shape[:-1])  # rows of whole blocks (a tensor may have none)
        return GGMLTensor(data.reshape(rows, t.n_bytes // rows if rows else 0), kind, shape)


class WeightSource:
    """Tensors of one model component from a file, a list of shards, or a folder of shards."""

    def __init__(self, path: str | os.PathLike, *, partial: bool = False, pread: bool = False):
        """partial: accept an index whose shards are not all there (the text encoder is downloaded
        without the shards FLUX.2 never reads); the strict key check still names what is needed.
        pread: tensors are copied out with read calls rather than memmap views. Streaming uses it: a file
        truncated mid-run then gives a short read (a WeightsError), where a memmap would crash on SIGBUS."""
        self.path = Path(path)
        if not self.path.exists():
            raise WeightsError(f"{self.path}: no such file or folder")
        self.files = [GGUFFile(p) if p.suffix == ".gguf" else SafetensorsFile(p)
                      for p in _shards(self.path, partial)]
        for f in self.files:
            f.pread = pread
        # GGUF key-value pairs or safetensors' __metadata__ (first file's keys win).
        self.metadata: dict = {}
        for f in reversed(self.files):
            self.metadata.update(f.metadata)
        self._where: dict[str, SafetensorsFile | GGUFFile] = {}
        for f in self.files:
            for k in f.keys():
                if k in self._where:
                    raise WeightsError(f"tensor {k!r} is in both {self._where[k].path} and {f.path}; the "
                                       f"shards are from different downloads")
                self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> str:
        return self._where[name].dtype(name)

    def get(self, name: str) -> np.ndarray | GGMLTensor:
        return self._where[name].get(name)


def _shards(path: Path, partial: bool = False) -> list[Path]:
    if path.is_file():
        return [path]
    for index_name in INDEX_NAMES:
        index = path / index_name
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                raise WeightsError(f"{index}: malformed shard index") from None
            if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
                # no ../ escapes
                raise WeightsError(f"{index}: the shard index names files outside its folder")
            missing = [n for n in names if not (path / n).exists()]
            if partial and len(missing) < len(names):
                return [path / n for n in names if n not in missing]
            if missing:
                raise WeightsError(f"{index} lists shards that are not there: {', '.join(missing)}; "
                                   f"finish the download")
            return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files and len(ggufs := sorted(path.glob("*.gguf"))) == 1:
        return ggufs
    if not files:
        raise WeightsError(f"{path}: no .safetensors files (or a single .gguf file) in this folder")
    return files


def safetensors_header(tensors: dict[str, tuple[str, tuple[int, ...]]],
                       metadata: dict[str, str] | None = None) -> tuple[bytes, int]:
    """(the first bytes of a safetensors file, the bytes of tensor data after them) for tensors given as
    name → (safetensors dtype name, shape), their data to follow in this order."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offset


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                     metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (bf16 via `BF16` arrays) atomically: a crash leaves no partial file."""
    path = Path(path)
    head, _ = safetensors_header({name: (_NAMES[a.dtype], a.shape) for name, a in tensors.items()}, metadata)
    from .atomic import atomic_write

    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # closed before atomic_write renames it
        f.write(head)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())
