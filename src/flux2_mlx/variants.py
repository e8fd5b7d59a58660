"""Which registered FLUX.2 variant a set of files holds, from every signal they carry, strongest first.

klein [base] and klein distilled have the same tensor shapes, and so do klein-9B and klein-9B-KV: the
shapes tell the size only. The repos tell the rest: diffusers' `model_index.json` (pipeline class,
`is_distilled`), BFL's file names, the variant our converter records in a GGUF (`flux2.model`) or a
GGUF's `general.name`, and the Hugging Face repo id in a cache path. Numpy only; reads headers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .config import MODELS, transformer_config_from_shapes
from .weights import GGUFFile, WeightsError, WeightSource

GGUF_VARIANT_KEY = "flux2.model"  # what `flux2 convert` writes: the registered name

# A name part → variant, most specific first (a "klein-base-9b" name also contains "9b").
_NAMES = [(re.compile(p), v) for p, v in [
    (r"klein-base-9b|klein-9b-base", "klein-base-9b"), (r"klein-base-4b|klein-4b-base", "klein-base-4b"),
    (r"klein-9b-kv", "klein-9b-kv"), (r"klein-9b", "klein-9b"), (r"klein-4b", "klein-4b"),
    (r"(^|[^a-z])flux-?2-dev", "dev")]]


@dataclass(frozen=True)
class Detection:
    """variant: the registered name the files are, or None when they say only their size; `candidates`
    the variants their shapes allow (all when unknown); `signal` why, in words; `strong` when a signal
    other than the shapes named the variant."""

    variant: str | None
    candidates: tuple[str, ...]
    signal: str
    strong: bool


def variant_from_name(name: str) -> str | None:
    """A registered variant named in a file, folder or repo name (BFL's, the community GGUFs', the HF
    cache's `models--owner--repo`), or None."""
    s = re.sub(r"flux-?2", "flux-2", re.sub(r"[\s_.]+", "-", name.lower()))
    return next((v for p, v in _NAMES if p.search(s)), None)


def _model_index(folder: Path) -> tuple[str, str] | None:
    """(variant, signal) from a diffusers folder's model_index.json, or None."""
    path = folder / "model_index.json"
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        cls = index["_class_name"]
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{path}: not a diffusers model_index.json ({e}); download it again") from None
    if cls == "Flux2Pipeline":
        return "dev", f"its model_index.json ({cls})"
    if cls == "Flux2KleinKVPipeline":
        return "klein-9b-kv", f"its model_index.json ({cls})"
    if cls == "Flux2KleinPipeline":  # diffusers' default is_distilled is False: a base model
        distilled = bool(index.get("is_distilled", False))
        signal = f"its model_index.json ({cls}, is_distilled {distilled})"
        return ("klein" if distilled else "klein-base"), signal
    return None


def _gguf_variant(path: Path) -> tuple[str, str] | None:
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return None
    f = GGUFFile(path)
    recorded = f.metadata.get(GGUF_VARIANT_KEY)
    if recorded in MODELS:
        return recorded, f"its {GGUF_VARIANT_KEY} = {recorded}"
    name = f.metadata.get("general.name")
    named = variant_from_name(name) if isinstance(name, str) else None
    return (named, f"its general.name {name!r}") if named else None


# What a model_index.json that names no size can be: the shapes pick one.
_FAMILIES = {"klein": ("klein-4b", "klein-9b"), "klein-base": ("klein-base-4b", "klein-base-9b")}


def size_candidates(transformer: Path | None) -> tuple[str, ...]:
    """The variants whose transformer has these shapes; by structure (guidance embedding: dev) when no
    registered size matches (a test model); every variant without a file."""
    if transformer is None:
        return tuple(MODELS)
    from .dit_names import transformer_entries

    try:
        entries = transformer_entries(WeightSource(transformer))
        cfg = transformer_config_from_shapes({k: tuple(e.shape) for k, e in entries.items()})
    except (KeyError, ValueError):  # not a FLUX.2 transformer: the loader says so, naming the tensor
        return tuple(MODELS)
    exact = tuple(n for n, s in MODELS.items() if s.transformer == cfg)
    if exact:
        return exact
    return tuple(n for n, s in MODELS.items() if s.transformer.use_guidance_embed == cfg.use_guidance_embed)


def find_transformer(folder: Path) -> Path | None:
    """A model folder's transformer, whatever the variant: a diffusers transformer/ folder or a BFL file of
    any registered name."""
    if (folder / "transformer").is_dir():
        return folder / "transformer"
    return next((folder / s.transformer_file for s in MODELS.values()
                 if (folder / s.transformer_file).is_file()), None)


def detect(model_path=None, transformer=None) -> Detection:
    """The variant of a downloaded repo folder (`model_path`) and/or a transformer file or folder."""
    folders = [Path(model_path)] if model_path is not None and Path(model_path).is_dir() else []
    if model_path is not None and Path(model_path).is_file() and transformer is None:
        transformer = model_path  # as hub.locate takes it: a single file is the transformer
    transformer = Path(transformer) if transformer is not None else (
        find_transformer(folders[0]) if folders else None)
    candidates = size_candidates(transformer)
    if transformer is not None:
        parent = transformer.absolute().parent
        folders.append(parent.parent if parent.name == "transformer" else parent)
    found = next(filter(None, map(_model_index, dict.fromkeys(folders))), None)
    if found is None and transformer is not None:
        named = variant_from_name(transformer.name)
        found = _gguf_variant(transformer) or (named and (named, f"the file name {transformer.name}"))
    for part in (p for folder in dict.fromkeys(folders) for p in reversed(folder.absolute().parts)):
        named = variant_from_name(part)  # a repo folder, or the HF cache's models--owner--repo
        found = found or (named and (named, f"the folder name {part}"))
    if found is None:
        return Detection(candidates[0] if len(candidates) == 1 else None, candidates, "the tensor shapes",
                         False)
    variant, signal = found
    if variant in _FAMILIES:  # the size from the shapes
        fits = tuple(v for v in _FAMILIES[variant] if v in candidates)
        if len(fits) != 1:
            return Detection(None, fits or candidates, signal, False)
        variant = fits[0]
    if variant not in candidates:
        raise WeightsError(f"{transformer}: {signal} says {variant}, but its tensors have the shapes of "
                           f"{' / '.join(candidates)}; check the files")
    return Detection(variant, candidates, signal, True)


def choose(model: str | None, model_path=None, transformer=None,
           detection: Detection | None = None) -> tuple[str, Detection | None]:
    """The variant to run and what the files said (`detection`, when the caller has already made it):
    `model` when given (refused when a signal stronger than the shapes names another), else the detected
    one; klein-4b when no file is given."""
    if model_path is None and transformer is None:
        return model or "klein-4b", None
    det = detection or detect(model_path, transformer)
    where = transformer if transformer is not None else model_path
    if model is not None:
        if det.strong and det.variant != model:
            raise WeightsError(f"{where}: {det.signal} says this is {det.variant}, not {model}; run it as "
                               f"{det.variant} (or leave the model out: it is detected)")
        return model, det
    if det.variant is None:
        raise WeightsError(f"{where}: nothing in these files says which of {', '.join(det.candidates)} they "
                           f"are ({det.signal} fit all); name the model (-m/--model)")
    return det.variant, det
