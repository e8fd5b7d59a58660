"""Lazy, memory-mapped weight sources: safetensors files, sharded folders, GGUF files, a safetensors writer.

Numpy only. bf16 has no numpy dtype, so bf16 tensors come back as the structured dtype `BF16`
(raw uint16 bits) which survives reshapes, slices and concatenation and tells backends what it is.
FP8 (`F8_E4M3`, `F8_E5M2`, as in Qwen3-*-FP8 checkpoints) works the same way with one byte per value.
GGUF files are memory-mapped (the header parsed here); quantized tensors come back as `GGMLTensor`
(raw ggml blocks, never dequantized here) and their numpy shapes are GGUF's `ne` reversed (out, in).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BF16 = np.dtype([("bf16", "<u2")])
F8_E4M3 = np.dtype([("f8_e4m3", "u1")])  # torch.float8_e4m3fn: bias 7, no inf, 0x7F/0xFF = NaN
F8_E5M2 = np.dtype([("f8_e5m2", "u1")])  # torch.float8_e5m2: the high byte of an IEEE float16

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BF16,
    "F8_E4M3": F8_E4M3, "F8_E5M2": F8_E5M2,
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


class WeightsError(ValueError):
    """A weights file or folder that cannot be used as asked; the message says what to do."""


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even, as torch does."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16).view(BF16)


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


def _pread(path: Path, offset: int, nbytes: int) -> np.ndarray:
    """`nbytes` bytes at `offset`, read into a fresh array; a short read (the file shrank) is an error."""
    out = np.empty(nbytes, np.uint8)
    view, done = memoryview(out), 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise WeightsError(f"{path}: the file ended {nbytes - done} bytes early while reading weights; "
                                   f"it was truncated or replaced during the run; download it again")
            done += n
    return out


class SafetensorsFile:
    """One .safetensors file: a JSON header parsed up front, tensors as views of one np.memmap."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise WeightsError(f"{self.path}: not a safetensors file, or truncated (bad header length)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise WeightsError(f"{self.path}: not a safetensors file (header is not JSON)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        data_len = size - 8 - n
        self._info: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, t in header.items():
            try:
                dtype, shape, (start, end) = _DTYPES[t["dtype"]], tuple(t["shape"]), t["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise WeightsError(
                    f"{self.path}: tensor {name!r} has an unsupported dtype or a malformed entry "
                    f"({t!r})") from None
            if end > data_len or end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise WeightsError(f"{self.path}: truncated or corrupt (tensor {name!r} lies outside "
                                   f"the file); download it again")
            self._info[name] = (dtype, shape, 8 + n + start, 8 + n + end)
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None
        self.pread = False  # True: get() copies with read calls instead of returning memmap views

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


# ggml block types flux2-mlx runs (gguf-and-quantization.md §2, §3); F32/F16/BF16 (and the integer types)
# come back as plain arrays. Anything else gguf-py knows (IQ*, TQ*, MXFP4, ...) is refused when read.
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
        """float32 values through gguf-py's reference codec (tests, dense fallbacks)."""
        from gguf import GGMLQuantizationType, quants

        return np.asarray(quants.dequantize(self.data, GGMLQuantizationType[self.ggml_type]),
                          dtype=np.float32).reshape(self.shape)


_GGUF_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                 11: "<i8", 12: "<f8"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Truncated(Exception):
    pass


def _gguf_value(buf, off: int, vtype: int, decode: bool = True):
    """(value, offset after it) of one GGUF metadata value at `off`; decode=False only skips over it."""
    if vtype == _GGUF_STRING:
        (n,) = struct.unpack_from("<Q", buf, off)
        if off + 8 + n > len(buf):
            raise _Truncated
        return (bytes(buf[off + 8:off + 8 + n]).decode("utf-8", errors="replace") if decode else None), off + 8 + n
    if vtype == _GGUF_ARRAY:
        etype, count = struct.unpack_from("<IQ", buf, off)
        off += 12
        if etype in _GGUF_SCALARS:
            end = off + np.dtype(_GGUF_SCALARS[etype]).itemsize * count
            if end > len(buf):
                raise _Truncated
            return (np.frombuffer(buf, _GGUF_SCALARS[etype], count, off).tolist() if decode else None), end
        out = []
        for _ in range(count):
            v, off = _gguf_value(buf, off, etype, decode)
            out.append(v)
        return (out if decode else None), off
    if vtype not in _GGUF_SCALARS:
        raise _Truncated
    dt = np.dtype(_GGUF_SCALARS[vtype])
    if off + dt.itemsize > len(buf):
        raise _Truncated
    return (np.frombuffer(buf, dt, 1, off)[0].item() if decode else None), off + dt.itemsize


@dataclass(frozen=True)
class _GGUFTensor:
    ggml_type: str
    shape: tuple[int, ...]  # numpy order (GGUF's ne reversed)
    offset: int  # absolute, in the file
    n_bytes: int


class GGUFFile:
    """One .gguf file (versions 2 and 3), same interface as SafetensorsFile; tensors are memmap views.

    The header is parsed here rather than by gguf-py's GGUFReader, which makes a numpy view per array
    element: ~10 s to open a Mistral GGUF for its 131k-token vocabulary (0.1 s here). `metadata` holds every scalar
    and short array; `field(key)` decodes any key on request, long arrays (tokenizer tokens, merges)
    included."""

    def __init__(self, path: str | os.PathLike):
        from .quant.ggml import GGMLType, block_info

        self.path = Path(path)
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise WeightsError(f"{self.path}: not a GGUF file (bad magic {magic!r}); is the download complete?")
        self._mm = buf = np.memmap(self.path, np.uint8, "r")
        self.pread = False
        self.metadata, self._fields, self._tensors = {}, {}, {}
        try:
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
            if version in (2 << 24, 3 << 24):
                raise WeightsError(f"{self.path}: a big-endian GGUF file; flux2-mlx reads little-endian files only")
            if version not in (2, 3):
                raise WeightsError(f"{self.path}: GGUF version {version}; flux2-mlx reads versions 2 and 3")
            off = 24
            for _ in range(n_kv):
                key, off = _gguf_value(buf, off, _GGUF_STRING)
                (vtype,) = struct.unpack_from("<I", buf, off)
                self._fields[key] = (vtype, off + 4)
                long = vtype == _GGUF_ARRAY and struct.unpack_from("<Q", buf, off + 8)[0] > _METADATA_ARRAY_MAX
                value, off = _gguf_value(buf, off + 4, vtype, decode=not long)
                if not long:
                    self.metadata[key] = value
            infos = []
            for _ in range(n_tensors):
                name, off = _gguf_value(buf, off, _GGUF_STRING)
                (n_dims,) = struct.unpack_from("<I", buf, off)
                dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
                kind, rel = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
                off += 16 + 8 * n_dims
                infos.append((name, dims, kind, rel))
        except (struct.error, _Truncated, OverflowError, MemoryError) as e:
            raise WeightsError(f"{self.path}: truncated or corrupt GGUF header ({type(e).__name__}); "
                               f"download it again") from None
        align = int(self.metadata.get("general.alignment", 32))
        start = off + (-off) % align
        for name, dims, kind, rel in infos:
            try:
                t = GGMLType(kind)
            except ValueError:
                raise WeightsError(f"{self.path}: tensor {name!r} has ggml type id {kind}, which gguf-py does not "
                                   f"know; flux2-mlx reads {_GGML_SUPPORTED}") from None
            bs, ts = block_info(t)
            n = int(np.prod(dims, dtype=np.int64))
            info = _GGUFTensor(t.name, tuple(int(d) for d in reversed(dims)), start + rel, n // bs * ts)
            if info.offset + info.n_bytes > buf.size:
                raise WeightsError(f"{self.path}: truncated (tensor {name!r} lies outside the file); "
                                   f"download it again")
            self._tensors[name] = info

    def field(self, key: str, default=None):
        """Any metadata value, decoded now (lists of str for tokenizer vocabularies and merges)."""
        if key not in self._fields:
            return default
        vtype, off = self._fields[key]
        return _gguf_value(self._mm, off, vtype)[0]

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
        return GGMLTensor(data.reshape(int(np.prod(shape[:-1], dtype=np.int64)), -1), kind, shape)  # rows of blocks


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
    for index_name in _INDEX_NAMES:
        index = path / index_name
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise WeightsError(f"{index}: malformed shard index") from None
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


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                     metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (bf16 via `BF16` arrays) atomically: a crash leaves no partial file."""
    path = Path(path)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, a in tensors.items():
        nbytes = a.dtype.itemsize * a.size
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())
    os.replace(tmp, path)
