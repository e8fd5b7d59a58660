"""Canonical tensor entries and the strict checks every loader runs on them. Numpy only.

Every checkpoint layout is read into one set of canonical names (the name maps: dit_names, vae_names,
encoder_names): BFL's for the transformer and the VAE, HF's `model.…` for text encoders. An Entry knows its
shape up front and reads its data only when loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .config import (
    MODELS,
    TransformerConfig,
    text_encoder_shapes,
    transformer_config_from_shapes,
    transformer_shapes,
    vae_shapes,
)
from .quant.scaled import SCALED_TYPES
from .weights import GGML_QUANTIZED, GGMLTensor, WeightsError


@dataclass(frozen=True)
class Entry:
    """A canonical tensor: its shape known up front, its data read only when `load()` is called
    (a numpy array, or a `GGMLTensor` for a quantized GGUF tensor)."""

    shape: tuple[int, ...]
    load: Callable[[], np.ndarray | GGMLTensor]
    stored: str = ""  # the file's type name ("BF16", "Q4_K", ...) when known: the memory planner sizes by it
    beside: int = 0  # values loaded beside the stored tensor in the compute dtype (a LoRA branch)
    full_precision: bool = False  # a scaled layer marked full_precision_matrix_mult: MLX holds it decoded


def stored_type(source, key: str) -> str:
    """The type `key` is stored as in `source`, for Entry.stored; "" for shape-only stand-ins."""
    dtype = getattr(source, "dtype", None)
    return dtype(key) if dtype is not None else ""


# What a FLUX.2 weight may be stored as. FP8 only where the name map pairs it with its block scales
# (text encoders: FP8Blocks); elsewhere it is refused like any other type flux2-mlx does not run.
_DENSE_WEIGHTS = ("F32", "F16", "BF16")
FP8_BLOCKS = ("F8_E4M3", "F8_E5M2")


def check_stored(entries: dict[str, Entry], where, quantized: bool = True,
                 fp8: bool = False) -> dict[str, Entry]:
    """Refuse, naming the file and the tensor, what no layer can take: an empty tensor, a type flux2-mlx
    does not run, a quantized type where the layer must be dense (a norm, a bias, a conv; `quantized`
    False: anywhere). `fp8`: the entries' FP8 matrices load as FP8Blocks. Runs before configs or layers
    are built from the shapes."""
    for name, e in entries.items():
        if 0 in e.shape:
            raise WeightsError(f"{where}: tensor {name} has shape {list(e.shape)}, with no values; the file "
                               f"is damaged")
        if not e.stored or e.stored in _DENSE_WEIGHTS:
            continue
        if e.stored not in GGML_QUANTIZED + SCALED_TYPES + (FP8_BLOCKS if fp8 else ()):
            raise WeightsError(f"{where}: tensor {name} is stored as {e.stored}, which flux2-mlx does not "
                               f"run as a weight (it runs {', '.join(_DENSE_WEIGHTS + GGML_QUANTIZED)})")
        if not quantized or len(e.shape) != 2 or not name.endswith(".weight"):
            raise WeightsError(f"{where}: tensor {name} {list(e.shape)} is stored as {e.stored}, but only "
                               f"the matrices of linear layers can be quantized; convert the file again")
    return entries


def block_key(name: str, block_lists: tuple[str, ...]) -> tuple[int, int, str] | None:
    """`single_blocks.3.linear1.weight` in ("double_blocks", "single_blocks") → (1, 3, "linear1.weight"):
    which block list, which block, the name inside it; None outside the blocks."""
    for k, prefix in enumerate(block_lists):
        if name.startswith(prefix + "."):
            head, dot, rest = name[len(prefix) + 1:].partition(".")
            if dot and head.isdigit():
                return k, int(head), rest
    return None


def transformer_config(entries: dict[str, Entry], where, fallback: TransformerConfig | None = None
                       ) -> TransformerConfig:
    """The DiT config these entries' shapes describe. fallback: returned when a tensor the config is read
    from is absent, so that check_keys can name everything missing; without one, that is an error."""
    try:
        return transformer_config_from_shapes({k: tuple(e.shape) for k, e in entries.items()})
    except KeyError as e:
        if fallback is None:
            raise WeightsError(f"{where}: no FLUX.2 transformer tensors found ({e.args[0]} is "
                               f"missing)") from None
        return fallback
    except ValueError as e:
        raise WeightsError(f"{where}: {e}") from None


def _listing(names, limit=6) -> str:
    names = sorted(names)
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_keys(entries: dict[str, Entry], expected: dict[str, tuple[int, ...]], what: str,
               hint: str = "") -> None:
    """Raise WeightsError naming every missing, unexpected and mis-shaped tensor."""
    missing = expected.keys() - entries.keys()
    unexpected = entries.keys() - expected.keys()
    misshaped = [f"{k} {list(entries[k].shape)} (expected {list(expected[k])})"
                 for k in sorted(expected.keys() & entries.keys())
                 if tuple(entries[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if misshaped:
        parts.append(f"{len(misshaped)} with the wrong shape: {_listing(misshaped, 3)}")
    raise WeightsError(f"{what} does not match: " + "; ".join(parts) + (f". {hint}" if hint else ""))


def guess_transformer(entries: dict[str, Entry], candidates: dict[str, TransformerConfig]) -> str | None:
    """Name of the first candidate config whose full tensor set matches these shapes, if any."""
    shapes = {k: tuple(e.shape) for k, e in entries.items()}
    for name, cfg in candidates.items():
        if transformer_shapes(cfg) == shapes:
            return name
    return None


def check_transformer(entries: dict[str, Entry], cfg: TransformerConfig, where) -> None:
    """check_keys for a DiT, naming the registered model whose shapes these are when it is another."""
    name = guess_transformer(entries, {n: s.transformer for n, s in MODELS.items()})
    hint = f"These weights have the shapes of {name}: choose that model." if name else ""
    check_keys(entries, transformer_shapes(cfg), f"transformer {where}", hint)


def checked_entries(component: str, source, cfg) -> tuple[dict[str, Entry], object]:
    """(canonical entries, where they come from) of a "transformer", "vae" or "text_encoder" in `source`
    (a WeightSource, or canonical entries already built), checked strictly against `cfg`: what both
    backends' loaders start from."""
    # Imported here because the name maps build their entries on this module.
    from .dit_names import transformer_entries
    from .encoder_names import text_encoder_entries
    from .vae_names import vae_entries

    where = getattr(source, "path", "weights")
    if component == "transformer":
        entries = source if isinstance(source, dict) else transformer_entries(source)
        check_transformer(entries, cfg, where)
    elif component == "vae":
        entries = source if isinstance(source, dict) else vae_entries(source)
        check_keys(entries, vae_shapes(cfg), f"autoencoder {where}")
    else:
        entries = source if isinstance(source, dict) else text_encoder_entries(source, cfg)
        shapes = {k: tuple(e.shape) for k, e in entries.items()}
        repo = next((s.text_encoder.repo_id for s in MODELS.values()
                     if s.text_encoder != cfg and text_encoder_shapes(s.text_encoder) == shapes), None)
        hint = f"These weights have the shapes of {repo}: choose a model that uses it." if repo else ""
        check_keys(entries, text_encoder_shapes(cfg), f"text encoder {where}", hint)
    return entries, where
