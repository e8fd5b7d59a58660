"""`flux2 convert`: a FLUX.2 transformer or text encoder → a GGUF that llama.cpp-family tools read.

No MLX or torch, so conversion runs (and is tested) where neither is installed; the K-quant quantizers are
numba-compiled. Image models get BFL names and arch `flux`; text encoders get llama.cpp names, arch `qwen3`
or `llama` (Mistral, Q/K rows permuted as llama.cpp's converter does) and tokenizer metadata (details:
docs/file-formats.md, 'GGUF files written by flux2 convert'). One tensor at a
time, in row chunks: peak memory is one quantized tensor plus one chunk's float32 bytes (with `jobs` worker
threads, that chunk is split 2 × jobs ways, two pieces per worker; the bytes written do not depend on
`jobs`). The file is written beside the destination as `.NAME.PID.partial`, read back and checked, and only
then renamed; any failure or interrupt (Ctrl-C, SIGTERM, SIGHUP) removes it and cancels the queued chunks,
and the next conversion into that folder removes partials whose writer was killed outright.
A quantized GGUF source is decoded exactly; tensors planned as their source's ggml type are copied unchanged.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

from .atomic import atomic_write
from .config import MODELS, get_spec, text_encoder_config_from, transformer_shapes
from .dit_names import transformer_entries
from .encoder_names import gguf_encoder_config, hf_to_llama_cpp, permute_qk, text_encoder_entries
from .entries import check_keys, transformer_config
from .filekind import encoder_base, file_kind
from .quant import recipes
from .quant.ggml import GGMLType, quantize, row_bytes
from .quant.scaled import (
    SCALED,
    SCALED_TYPES,
    comfy_marker,
    fp8_tensor_scale,
    nvfp4_tensor_scale,
    quantize_fp8_rows,
    quantize_mxfp8_rows,
    quantize_nvfp4_rows,
    scale_grid,
    swizzle,
)
from .variants import GGUF_VARIANT_KEY, detect
from .weights import (
    BF16,
    GGML_QUANTIZED,
    FP8Blocks,
    GGMLTensor,
    GGUFFile,
    WeightsError,
    WeightSource,
    f32_to_bf16,
    safetensors_header,
    to_float32,
)

__all__ = ["ConversionPlan", "convert", "plan_conversion"]

T = GGMLType
CHUNK_BYTES = 64 << 20  # float32 bytes in flight at once (split among the jobs): the working memory
_CONTEXT = {"qwen3": 40960, "mistral": 131072}  # max_position_embeddings when config.json lacks it


@dataclass
class Tensor:
    name: str  # as written
    shape: tuple[int, ...]  # numpy order
    type: GGMLType
    load: Callable[[], np.ndarray | GGMLTensor]
    note: str = ""
    src_type: str = ""  # as stored in the source ("BF16", "Q4_K"); quantized types load as raw ggml blocks

    @property
    def copy(self) -> bool:  # planned as the source's own quantized type: its blocks are copied unchanged
        return self.src_type in GGML_QUANTIZED and self.src_type == self.type.name

    @property
    def src_bytes(self) -> int:  # as float32: the progress bar's MB/s is the quantizers' throughput unit
        return math.prod(self.shape) * 4

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape[:-1]) * row_bytes(self.type, self.shape[-1])


@dataclass
class ConversionPlan:
    kind: str  # "transformer" | "text_encoder"
    arch: str
    tensors: list[Tensor]
    kv: list[tuple[str, object, gguf.GGUFValueType]]


def _resolve(src) -> tuple[Path, str | None]:
    """A path, or a model name resolved to its transformer (HF cache first, else a download)."""
    if isinstance(src, str) and src in MODELS and not Path(src).exists():
        from . import hub

        spec = get_spec(src)
        located = hub.locate(spec)
        return hub.fetch(spec, {"transformer": located["transformer"]})["transformer"], src
    path = Path(src)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder, and not a model name ({', '.join(MODELS)})")
    return path, None


def _transformer_plan(source: WeightSource, target: str, model: str | None) -> ConversionPlan:
    entries = transformer_entries(source)
    cfg = transformer_config(entries, source.path)
    expected = transformer_shapes(cfg)
    check_keys(entries, expected, f"transformer {source.path}")
    tensors = []
    for name in expected:  # canonical (BFL) order
        e = entries[name]
        tensors.append(Tensor(name, tuple(e.shape), recipes.tensor_type(name, e.shape, target), e.load,
                              src_type=e.stored))
    kv = [("general.name", model or source.path.stem, gguf.GGUFValueType.STRING)]
    if model is None:  # converted from files: the variant they say they are (model_index.json, names)
        found = detect(transformer=source.path)
        model = found.variant if found.strong else None
    if model:
        # distilled, base and kv variants have the same tensors: only this key tells them apart
        kv.append((GGUF_VARIANT_KEY, model, gguf.GGUFValueType.STRING))
    return ConversionPlan("transformer", "flux", tensors, kv)


def _read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when there is none (missing, unreadable or not an object)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _text_plan(source: WeightSource, target: str, all_layers: bool) -> ConversionPlan:
    folder = source.path if source.path.is_dir() else source.path.parent
    gguf_file = source.files[0] if isinstance(source.files[0], GGUFFile) else None
    if gguf_file:
        hf = {**gguf_encoder_config(gguf_file), "_name_or_path": gguf_file.metadata.get("general.name")}
    else:
        hf = _read_json(folder / "config.json") or {}
    hf_text = hf.get("text_config", hf)
    try:
        cfg = text_encoder_config_from(hf, encoder_base(source.keys()))
        ctx = int(hf_text.get("max_position_embeddings") or _CONTEXT[cfg.kind])
    except (ValueError, TypeError, AttributeError) as e:
        where = source.path if gguf_file else folder / "config.json"
        raise WeightsError(f"{where}: {e}" if isinstance(e, ValueError) else f"{where}: a malformed config") \
            from None
    n_layers = cfg.num_hidden_layers if all_layers else min(max(cfg.output_layers), cfg.num_hidden_layers)
    entries = text_encoder_entries(source, replace(cfg, output_layers=(n_layers,)))
    unexpected = [k for k in entries if not k.startswith("model.")]
    if unexpected:
        raise WeightsError(f"{source.path}: tensors a Qwen3/Mistral text encoder does not have: "
                           f"{', '.join(sorted(unexpected)[:4])}")
    qwen = cfg.kind == "qwen3"
    arch = "qwen3" if qwen else "llama"
    names: dict[str, tuple[str, Callable]] = {}
    for hf_name, e in entries.items():
        name = hf_to_llama_cpp(hf_name)
        if name is None:
            raise WeightsError(f"{source.path}: no llama.cpp name for {hf_name}")
        load = e.load
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if name.endswith("attn_q.weight") else cfg.num_key_value_heads
            load = lambda f=e.load, h=heads: permute_qk(f(), h)
        names[name] = (hf_name, load)
    # text_encoder_entries drops the final norm and the LM head. The norm (a few KB) is always written:
    # without it llama.cpp refuses the file; the head only in a full model. A llama.cpp GGUF source has
    # no embed_tokens and names them as written.
    embed = "embed_tokens.weight"
    prefix = next((k[: -len(embed)] for k in source.keys() if k.endswith(embed)), "model.")
    for hf_name, name in ((prefix + "norm.weight", "output_norm.weight"),
                          ("lm_head.weight", "output.weight")):
        if all_layers or name == "output_norm.weight":
            for k in (hf_name, hf_name.replace("model.", "", 1), "language_model." + hf_name, name):
                if k in source:
                    names[name] = (k, lambda k=k: source.get(k))
                    break
    order = lambda n: (n != "token_embd.weight", int(n.split(".")[1]) if n.startswith("blk.") else 1 << 30, n)
    tensors = []
    for name in sorted(names, key=order):
        key, load = names[name]
        shape, stored = (entries[key].shape, entries[key].stored) if key in entries else (
            source.shape(key), source.dtype(key))
        t = recipes.text_tensor_type(name, shape, target, n_layers,
                                     cfg.num_attention_heads // cfg.num_key_value_heads)
        tensors.append(Tensor(name, tuple(shape), t, load, src_type=stored))
    U, F = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    name = hf.get("_name_or_path")
    name = name if isinstance(name, str) and name else folder.name
    kv = [("general.name", name, gguf.GGUFValueType.STRING),
          (f"{arch}.context_length", ctx, U), (f"{arch}.embedding_length", cfg.hidden_size, U),
          (f"{arch}.block_count", n_layers, U), (f"{arch}.feed_forward_length", cfg.intermediate_size, U),
          (f"{arch}.attention.head_count", cfg.num_attention_heads, U),
          (f"{arch}.attention.head_count_kv", cfg.num_key_value_heads, U),
          (f"{arch}.attention.key_length", cfg.head_dim, U),
          (f"{arch}.attention.value_length", cfg.head_dim, U),
          (f"{arch}.rope.freq_base", float(cfg.rope_theta), F),
          (f"{arch}.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps), F),
          (f"{arch}.vocab_size", cfg.vocab_size, U)]
    if arch == "llama":
        kv.append((f"{arch}.rope.dimension_count", cfg.head_dim, U))
    if gguf_file:
        kv += _gguf_tokenizer_kv(gguf_file)
    elif (tok := _find_tokenizer(folder)) is not None:
        kv += tokenizer_kv(tok, cfg.vocab_size, "qwen2" if qwen else "tekken")
    return ConversionPlan("text_encoder", arch, tensors, kv)


_GGUF_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def _gguf_tokenizer_kv(f: GGUFFile) -> list[tuple[str, object, gguf.GGUFValueType]]:
    """The tokenizer a GGUF source embeds, copied key by key (the long arrays are decoded only here)."""
    V = gguf.GGUFValueType
    # bool before int: a bool is an int too
    kinds = ((bool, V.BOOL), (int, V.UINT32), (float, V.FLOAT32), (str, V.STRING), (list, V.ARRAY))
    kv = [(k, v, next(t for cls, t in kinds if isinstance(v, cls)))
          for k, v in f.metadata.items() if k.startswith("tokenizer.")]
    return kv + [(k, f.field(k), V.ARRAY) for k in _GGUF_TOKENIZER_ARRAYS
                 if k not in f.metadata and f.field(k) is not None]


def _find_tokenizer(folder: Path) -> Path | None:
    for p in (folder / "tokenizer.json", folder.parent / "tokenizer" / "tokenizer.json",
              folder.parent / "tokenizer.json"):
        if p.is_file():
            return p
    return None


def tokenizer_kv(path: Path, vocab_size: int, pre: str) -> list[tuple[str, object, gguf.GGUFValueType]]:
    """gpt2-style BPE metadata from a tokenizer.json, as llama.cpp's converter writes it: tokens by id
    (padded with [PADn] to the embedding's rows), token types, merges, bos/eos/pad ids."""
    try:
        return _tokenizer_kv(path, vocab_size, pre)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{path}: not a tokenizer.json flux2 can embed ({type(e).__name__}: {e}); "
                           f"download it again") from None


def _tokenizer_kv(path: Path, vocab_size: int, pre: str) -> list[tuple[str, object, gguf.GGUFValueType]]:
    tj = json.loads(path.read_text())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise WeightsError(f"{path}: a {model.get('type')} tokenizer; only BPE tokenizers can be embedded")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for content, i in vocab.items():
        tokens[i] = content
        types[i] = gguf.TokenType.NORMAL
    for content, t in added.items():
        types[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    S, A, U = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32
    kv = [("tokenizer.ggml.model", "gpt2", S), ("tokenizer.ggml.pre", pre, S),
          ("tokenizer.ggml.tokens", tokens, A), ("tokenizer.ggml.token_type", [int(t) for t in types], A),
          ("tokenizer.ggml.merges", merges, A)]
    conf = _read_json(path.parent / "tokenizer_config.json") or {}
    ids = {"bos": conf.get("bos_token"), "eos": conf.get("eos_token"), "padding": conf.get("pad_token")}
    for what, tok in ids.items():
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in vocab:
            kv.append((f"tokenizer.ggml.{what}_token_id", vocab[tok], U))
    if "<|endoftext|>" in vocab and ids["eos"] is None:  # Qwen without a tokenizer_config.json
        kv.append(("tokenizer.ggml.eos_token_id", vocab["<|endoftext|>"], U))
    return kv


def plan_conversion(src, target: str, *, all_layers: bool = False) -> tuple[ConversionPlan, WeightSource]:
    """What `convert` will write: tensors with their types, and the metadata. Reads no tensor data."""
    target = target.upper()
    recipes.target(target)
    path, model = _resolve(src)
    source = WeightSource(path, partial=True)
    if file_kind(source.keys()) == "text_encoder":
        return _text_plan(source, target, all_layers), source
    return _transformer_plan(source, target, model), source


def _loaded(t: Tensor) -> np.ndarray | GGMLTensor:
    """The source tensor: an array (a view of the file), raw ggml blocks, or an FP8 / MXFP8 / NVFP4 weight
    decoded exactly to float32."""
    a = t.load()
    return a.dequantize() if isinstance(a, (FP8Blocks, *SCALED)) else a


def _chunks(t: Tensor, parts: int = 1, a: np.ndarray | GGMLTensor | None = None):
    """float32 row chunks of at most CHUNK_BYTES / parts bytes (at least one row each) of `a`, by default
    `_loaded(t)`. Raw ggml blocks are decoded a chunk at a time by gguf-py's reference codec: exactly the
    values the source holds."""
    a = _loaded(t) if a is None else a
    step = max(1, CHUNK_BYTES // (4 * t.shape[-1] * parts))
    if isinstance(a, GGMLTensor):
        kind = gguf.GGMLQuantizationType[a.ggml_type]
        for r in range(0, len(a.data), step):
            yield gguf.quants.dequantize(a.data[r:r + step], kind)
        return
    rows = a.reshape(-1, t.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)
    for r in range(0, rows.shape[0], step):
        yield to_float32(rows[r:r + step])


def _quantized_chunks(t: Tensor, pool: ThreadPoolExecutor | None, jobs: int):
    """(rows, uint8 bytes) per chunk, in order. With a pool, 2 × `jobs` chunks of CHUNK_BYTES / (2 × jobs)
    are in flight (the same float32 bytes as one chunk in this thread; two per worker so that a worker never
    waits while this thread reads and converts its next chunk). Threads suffice: the K-quant kernels and
    numpy's array loops release the GIL."""
    window = 2 * jobs if pool is not None else 1

    def rows(chunk):
        return len(chunk), quantize(chunk, t.type).reshape(len(chunk), -1)

    yield from _pooled(_chunks(t, parts=window), rows, pool, window)


def _settle_types(p: ConversionPlan) -> list[str]:
    """Move tensors whose fp16 block scales would underflow to a safer type (a pre-pass over the data)."""
    notes = []
    for t in p.tensors:
        if t.type in (T.F32, T.BF16) or t.copy:
            continue
        while True:
            bad = max((recipes.scale_underflow(c, t.type) for c in _chunks(t)), default=0.0)
            if bad <= recipes.UNDERFLOW_FRACTION:
                break
            new = recipes.safer_type(t.type)
            t.note = f"{t.name}: {bad:.0%} of its blocks have weights too small for {t.type.name}'s fp16 " \
                     f"scales; written as {new.name}"
            t.type = new
        if t.note:
            notes.append(t.note)
    return notes


def verify_conversion(path: Path, p: ConversionPlan) -> None:
    """WeightsError unless the GGUF at `path` holds the tensors of plan `p` (names, types, shapes, sizes)
    and its architecture. Read with the project's own GGUF reader: gguf-py's can loop on a corrupt file."""
    f = GGUFFile(path)
    got = [(n, f.dtype(n), f.shape(n), f.nbytes(n)) for n in f.keys()]
    want = [(t.name, t.type.name, t.shape, t.nbytes) for t in p.tensors]
    if got != want:
        bad = next((w, g) for w, g in zip(want, got + [None] * len(want)) if w != g)
        raise WeightsError(f"{path}: the written file does not read back as planned (expected {bad[0]}, "
                           f"read {bad[1]}); nothing was written to the destination")
    if f.metadata.get("general.architecture") != p.arch:
        raise WeightsError(f"{path}: general.architecture did not read back as {p.arch!r}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def _signals_as_interrupt():
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so that the same cleanup runs. Handlers
    can only be set on the main thread; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _write(path: Path, p: ConversionPlan, target: str, jobs: int, progress: bool) -> None:
    """The GGUF file at `path`, one tensor at a time; closed (and the workers stopped) however it ends."""
    writer = gguf.GGUFWriter(None, p.arch)
    pool = None
    try:
        if jobs > 1 and any(t.type not in (T.F32, T.BF16, T.F16) and not t.copy for t in p.tensors):
            pool = ThreadPoolExecutor(jobs, thread_name_prefix="quantize")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(recipes.target(target)[1])
        for key, value, vtype in p.kv:
            V, sub = gguf.GGUFValueType, None
            if vtype == V.ARRAY:
                sub = V.STRING if value and isinstance(value[0], str) else V.INT32
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for t in p.tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.type)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        from tqdm import tqdm

        with tqdm(total=sum(t.src_bytes for t in p.tensors), unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"convert {target}", disable=not progress) as bar:
            for t in p.tensors:
                if t.copy:
                    writer.write_tensor_data(t.load().data)
                    bar.update(t.src_bytes)
                    continue
                out = np.empty((math.prod(t.shape[:-1]), row_bytes(t.type, t.shape[-1])), np.uint8)
                r = 0
                dense = t.type in (T.F32, T.BF16, T.F16)  # a copy, not worth a worker
                for n, q in _quantized_chunks(t, None if dense else pool, jobs):
                    out[r:r + n] = q
                    r += n
                    bar.update(t.src_bytes * n // len(out))
                writer.write_tensor_data(out)
                bar.set_postfix_str(t.name, refresh=False)
    finally:
        if pool is not None:  # after a failure, queued chunks are dropped; a running one ends with its chunk
            pool.shutdown(wait=False, cancel_futures=True)
        writer.close()


def _scaled_layout(tensors: list[Tensor], target: str) -> list[tuple[Tensor, str | None, dict]]:
    """(tensor, comfy format or None for bf16, {name written: (safetensors dtype, shape)}) per tensor."""
    out = []
    for t in tensors:
        fmt = recipes.scaled_format(t.name, t.shape, target)
        n, k = t.shape if fmt else (0, 0)
        layer = t.name.removesuffix(".weight")
        if fmt is None:
            parts = {t.name: ("BF16", t.shape)}
        elif fmt == "nvfp4":
            parts = {t.name: ("U8", (n, k // 2)), f"{layer}.weight_scale": ("F8_E4M3", scale_grid(n, k)),
                     f"{layer}.weight_scale_2": ("F32", ())}
        elif fmt == "mxfp8":
            parts = {t.name: ("F8_E4M3", (n, k)), f"{layer}.weight_scale": ("F8_E8M0", scale_grid(n, k, 32))}
        else:
            parts = {t.name: ("F8_E4M3", (n, k)), f"{layer}.weight_scale": ("F32", ())}
        if fmt:
            parts[f"{layer}.comfy_quant"] = ("U8", (len(comfy_marker(fmt)),))
        out.append((t, fmt, parts))
    return out


def _pooled(chunks, fn, pool: ThreadPoolExecutor | None, window: int):
    """fn(chunk) for each chunk, in order; with a pool, `window` of them in flight."""
    if pool is None:
        yield from map(fn, chunks)
        return
    pending: deque = deque()
    for chunk in chunks:
        if len(pending) >= window:
            yield pending.popleft().result()
        pending.append(pool.submit(fn, chunk))
        del chunk
    while pending:
        yield pending.popleft().result()


def _abs_max(t: Tensor, a: np.ndarray) -> np.float32:
    """The largest magnitude in `a` (`t`'s source array or its float32 decoding), a row chunk at a time;
    bf16 on its bits, whose order with the sign cleared is that of the magnitudes: no float32 copy."""
    if a.dtype != BF16:
        return np.float32(max((np.abs(c).max() for c in _chunks(t, 1, a)), default=0))
    rows = a.reshape(-1, t.shape[-1]).view(np.uint16)
    step = max(1, CHUNK_BYTES // (2 * t.shape[-1]))
    bits = max((int((rows[r:r + step] & 0x7FFF).max()) for r in range(0, len(rows), step)), default=0)
    return np.float32(to_float32(np.array(bits, np.uint16).view(BF16)))


def _scaled_arrays(t: Tensor, fmt: str | None, pool, jobs: int):
    """The arrays of one tensor in `_scaled_layout`'s order, row chunks of the weight first. The source is
    read and decoded once; a per-tensor scale first takes its abs-max (ggml blocks decoded whole for it)."""
    window = 2 * jobs if pool is not None else 1
    a = _loaded(t)
    scale = None
    if fmt in ("float8_e4m3fn", "nvfp4"):
        a = a.dequantize() if isinstance(a, GGMLTensor) else a
        scale = (nvfp4_tensor_scale if fmt == "nvfp4" else fp8_tensor_scale)(_abs_max(t, a))
    chunks = _chunks(t, window, a)
    if fmt is None:
        yield from _pooled(chunks, f32_to_bf16, pool, window)
        return
    if fmt == "float8_e4m3fn":
        yield from _pooled(chunks, lambda c: quantize_fp8_rows(c, scale), pool, window)
        yield np.float32(scale).reshape(())
    else:
        fn = (lambda c: quantize_nvfp4_rows(c, scale)) if fmt == "nvfp4" else quantize_mxfp8_rows
        scales = []
        for q, s in _pooled(chunks, fn, pool, window):
            yield q
            scales.append(s)
        yield swizzle(np.concatenate(scales))
        if fmt == "nvfp4":
            yield np.float32(scale).reshape(())
    yield comfy_marker(fmt)


def _write_scaled(path: Path, layout, target: str, jobs: int, progress: bool) -> None:
    """A safetensors file at `path` as `_scaled_layout` plans it, one tensor (and one chunk) at a time."""
    # the layers' formats in the header too, for readers that look only there
    layers = {t.name.removesuffix(".weight"): {"format": fmt} for t, fmt, _ in layout if fmt}
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    head, data = safetensors_header({name: part for *_, parts in layout for name, part in parts.items()},
                                    meta)
    pool = ThreadPoolExecutor(jobs, thread_name_prefix="quantize") if jobs > 1 else None
    from tqdm import tqdm

    try:
        total = sum(t.src_bytes for t, *_ in layout)
        with open(path, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=f"convert {target}", disable=not progress) as bar:
            f.write(head)
            for t, fmt, _parts in layout:
                for a in _scaled_arrays(t, fmt, pool, jobs):
                    f.write(np.ascontiguousarray(a).tobytes())
                bar.update(t.src_bytes)
                bar.set_postfix_str(t.name, refresh=False)
            if f.tell() != len(head) + data:
                raise WeightsError(f"{path}: wrote {f.tell()} bytes, planned {len(head) + data}")
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def verify_scaled(path: Path, layout) -> None:
    """WeightsError unless the safetensors at `path` reads back, through the project's strict loader, as
    the planned layers: each weight's format (FP8 / NVFP4 / MXFP8 / BF16) and shape."""
    stored = {"float8_e4m3fn": "FP8", "nvfp4": "NVFP4", "mxfp8": "MXFP8", None: "BF16"}
    want = {t.name: (stored[fmt], t.shape) for t, fmt, _ in layout}
    got = {k: (e.stored, tuple(e.shape)) for k, e in transformer_entries(WeightSource(path)).items()}
    if got != want:
        bad = next(k for k in [*want, *got] if want.get(k) != got.get(k))
        raise WeightsError(f"{path}: the written file does not read back as planned ({bad}: expected "
                           f"{want.get(bad)}, read {got.get(bad)}); nothing was written to the destination")


def _convert_scaled(src, dst: Path, target: str, jobs: int, progress: bool) -> Path:
    if dst.suffix.lower() != ".safetensors":
        raise WeightsError(f"{dst}: --type {target.lower()} writes a safetensors file; name it "
                           f"{dst.stem}.safetensors")
    path, model = _resolve(src)
    source = WeightSource(path, partial=True)
    kind = file_kind(source.keys())
    if kind != "transformer":
        what = {"text_encoder": "a text encoder", "vae": "a VAE", "flux1": "a FLUX.1 checkpoint"}.get(
            kind, "not a FLUX.2 transformer")
        raise WeightsError(f"{path}: {what}; --type {target.lower()} converts FLUX.2 transformers only")
    layout = _scaled_layout(_transformer_plan(source, "BF16", model).tensors, target)
    requant = [t for t, _, _ in layout if t.src_type in GGML_QUANTIZED or t.src_type in SCALED_TYPES]
    if requant:  # decoded exactly, then rounded a second time (to the new format, or to bf16)
        warnings.warn(f"{path} is already quantized: {len(requant)} tensors (e.g. {requant[0].name}, "
                      f"{requant[0].src_type}) are decoded and rounded again, losing quality a second time; "
                      f"convert from the original weights where you can", stacklevel=3)
    with atomic_write(dst) as tmp:
        _write_scaled(tmp, layout, target, jobs, progress)
        verify_scaled(tmp, layout)
    return dst


def convert(src, dst, qtype: str, *, force: bool = False, all_layers: bool = False,
            progress: bool = True, jobs: int | None = None) -> Path:
    """Convert `src` (a model name, a BFL .safetensors file, a diffusers transformer folder, a text-encoder
    folder, or a GGUF of either) to a GGUF at `dst` with target type `qtype` (see recipes.TARGETS).

    `jobs` worker threads quantize row chunks of each tensor (default: one per CPU core; 1: in this
    thread). The output bytes do not depend on `jobs`.

    Tensors whose scales would underflow fp16 are moved to a safer type, each with a warning; re-quantizing
    an already quantized source into other types warns once.
    """
    dst = Path(dst)
    if dst.is_dir():
        raise WeightsError(f"{dst} is a folder; give the .gguf file to write")
    if dst.exists() and not force:
        raise WeightsError(f"{dst} already exists; pass --force (force=True) to replace it")
    if not dst.parent.is_dir():
        raise WeightsError(f"folder {dst.parent} does not exist")
    jobs = (os.cpu_count() or 1) if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    if qtype.upper() in recipes.SCALED_TARGETS:  # ComfyUI's FP8 / NVFP4 / MXFP8 safetensors
        with _signals_as_interrupt():
            return _convert_scaled(src, dst, qtype.upper(), jobs, progress)
    recipes.target(qtype)  # an unknown type is refused before anything is read
    with _signals_as_interrupt():
        p, source = plan_conversion(src, qtype, all_layers=all_layers)
        # decoded into float32 is exact; encoded into any other type than its own loses precision again
        requant = [t for t in p.tensors if t.src_type in GGML_QUANTIZED and t.type != T.F32 and not t.copy]
        if requant:
            t = requant[0]
            warnings.warn(f"{source.path} is already quantized: {len(requant)} tensors are re-encoded as "
                          f"other types (e.g. {t.name}, {t.src_type} → {t.type.name}) and lose quality a "
                          f"second time; convert from the original weights where you can", stacklevel=2)
        for note in _settle_types(p):
            warnings.warn(note, stacklevel=2)
        with atomic_write(dst) as tmp:
            _write(tmp, p, qtype.upper(), jobs, progress)
            verify_conversion(tmp, p)
    return dst
