"""`flux2 info` on model files: what a .gguf / .safetensors file or a folder of shards holds, checked as
`flux2 generate` checks it before loading (so a file info describes is one generate accepts).

Reads headers only, through the project's own readers: gguf-py's GGUFReader trusts the counts in a file
and can loop until memory runs out on a damaged one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from .config import MODELS, VAEConfig, text_encoder_shapes, transformer_shapes, vae_config_from, vae_shapes
from .dit_names import transformer_entries
from .encoder_names import text_encoder_entries
from .entries import check_keys, transformer_config
from .filekind import encoder_base, file_kind
from .memory import tensor_bytes
from .pipeline import component_config, encoder_config
from .quant.scaled import SCALED_TYPES
from .vae_names import vae_entries
from .weights import INDEX_NAMES, GGUFFile, WeightsError, WeightSource

__all__ = ["describe"]

# Bits per weight once loaded on MLX: quantized types as repacked (16-bit scales and biases, i.e. bits +
# 32/group), Q3_K, Q6_K and Q2_K as the file's blocks, dense tensors in a 16-bit compute dtype.
MLX_BITS = {"Q4_0": 5, "Q4_1": 5, "Q5_0": 6, "Q5_1": 6, "Q8_0": 9, "Q4_K": 5, "Q5_K": 6, "Q3_K": 3.4375,
            "Q6_K": 6.5625, "Q2_K": 2.625}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def _transformer(source: WeightSource, entries: dict) -> str:
    cfg = transformer_config(entries, source.path)
    check_keys(entries, transformer_shapes(cfg), f"transformer {source.path}")
    same = [n for n, s in MODELS.items() if s.transformer == cfg]
    if same:
        return f"FLUX.2 transformer: {' / '.join(same)} (tensors cannot tell distilled, base and kv apart)"
    return (f"FLUX.2 transformer: no registered variant (hidden {cfg.hidden_size}, {cfg.depth} double + "
            f"{cfg.depth_single_blocks} single blocks)")


def _scaled(entries: dict) -> tuple[list[str], int, int] | None:
    """For a transformer with FP8 / MXFP8 / NVFP4 layers (ComfyUI markers): lines giving the format of each
    layer kind, and its bytes on MLX and on torch (those layers as stored, except the full-precision-matmul
    ones MLX decodes; the rest in bfloat16). None for other files."""
    if not any(e.stored in SCALED_TYPES for e in entries.values()):
        return None
    full = any(e.full_precision for e in entries.values())
    kinds: dict[str, Counter] = {}
    mlx = held = 0
    for name, e in entries.items():
        mlx += tensor_bytes(e.stored, tuple(e.shape), 2, full_precision=e.full_precision)
        held += tensor_bytes(e.stored, tuple(e.shape), 2, fp8_kept=True)
        if len(e.shape) == 2:
            kind = re.sub(r"\.\d+\.", ".*.", name.removesuffix(".weight"))
            full_mm = " full-precision matmul" * e.full_precision
            fmt = e.stored + full_mm if e.stored in SCALED_TYPES else "BF16"
            kinds.setdefault(kind, Counter())[fmt] += 1
    count = Counter(f for c in kinds.values() for f in c.elements())
    lines = ["linear layers: " + ", ".join(f"{n} {f}" for f, n in count.most_common())
             + ("; MLX decodes the full-precision-matmul ones once to the compute dtype" if full else "")]
    lines += [f"  {kind:44} " + ", ".join(f"{n} {f}" for f, n in kinds[kind].most_common())
              for kind in sorted(kinds)]
    return lines, mlx, held


def _text_encoder(source: WeightSource) -> str:
    cfg = encoder_config(source, encoder_base(source.keys()))
    entries = text_encoder_entries(source, cfg)
    check_keys(entries, text_encoder_shapes(cfg), f"text encoder {source.path}")
    f = source.files[0]
    if isinstance(f, GGUFFile) and f.field("tokenizer.ggml.model") is not None:
        from .tokenizer import PromptTokenizer, tokenizer_from_gguf

        PromptTokenizer.from_config(tokenizer_from_gguf(f.path), cfg, f.path)  # generate builds the same
    family = "Qwen3" if cfg.kind == "qwen3" else "Mistral (llama)"
    return f"text encoder: {family}, {max(cfg.output_layers)} layers used, hidden {cfg.hidden_size}"


def _vae(source: WeightSource) -> str:
    entries = vae_entries(source)
    folder = source.path if source.path.is_dir() else source.path.parent
    cfg = component_config(vae_config_from, folder, VAEConfig()) if source.path.is_dir() else VAEConfig()
    check_keys(entries, vae_shapes(cfg), f"autoencoder {source.path}")
    return "autoencoder (VAE)"


def _parts(folder: Path) -> list[Path]:
    """What a folder holds: itself when it is one sharded component (it has an index), else each weight file
    at its root and each diffusers component folder (a repo such as FLUX.2-dev holds both layouts)."""
    if any((folder / n).exists() for n in INDEX_NAMES):
        return [folder]
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf") and p.is_file())
    components = [folder / c for c in ("transformer", "text_encoder", "vae") if (folder / c).is_dir()]
    return files + components or [folder]


def describe(path) -> list[str]:
    """Lines for `flux2 info`: what the file (or each component in a folder) holds, tensors and bytes per
    type, estimated MLX memory. WeightsError with generate's own message when generate would refuse it."""
    path = Path(path)
    if path.is_dir():
        return [line for part in _parts(path) for line in _describe(part)]
    return _describe(path)


def _describe(path: Path) -> list[str]:
    source = WeightSource(path, partial=True)
    keys = source.keys()
    if not keys:
        raise WeightsError(f"{path}: holds no tensors")
    kind = file_kind(keys)
    entries = None
    if kind == "text_encoder":
        model = _text_encoder(source)
    elif kind == "vae":
        model = _vae(source)
    else:
        entries = transformer_entries(source)
        model = _transformer(source, entries)
    f = source.files[0]
    if isinstance(f, GGUFFile):
        arch = f.metadata.get("general.architecture")
        head = f"{path}: GGUF, architecture {arch if isinstance(arch, str) else '(none)'}"
    else:
        head = f"{path}: safetensors, {len(source.files)} file(s)"
    per_type: dict[str, list[int]] = {}  # type → [tensors, bytes, elements]
    for f in source.files:
        for k in f.keys():
            acc = per_type.setdefault(f.dtype(k), [0, 0, 0])
            acc[0] += 1
            acc[1] += f.nbytes(k)
            acc[2] += math.prod(f.shape(k))
    lines = [head, f"model: {model}", f"tensors: {len(keys)}"]
    for name, (count, nbytes, _) in sorted(per_type.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {name:8} {count:5} tensors  {_gib(nbytes)}")
    mlx = sum(elems * MLX_BITS.get(name, 16) / 8 for name, (_, _, elems) in per_type.items())
    scaled = _scaled(entries) if entries is not None else None
    how = "quantized weights as repacked with 16-bit scales or as their blocks, dense weights in bfloat16"
    if scaled:
        lines += scaled[0]
        mlx = scaled[1]
        how = f"FP8 / MXFP8 / NVFP4 layers as stored, the rest in bfloat16; on torch about {_gib(scaled[2])}"
    total = sum(v[1] for v in per_type.values())
    lines.append(f"size: {_gib(total)}; on MLX about {_gib(mlx)} ({how})")
    return lines
