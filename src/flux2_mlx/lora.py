"""LoRA files → updates of the BFL-named transformer weights. Numpy only.

Reads diffusers/PEFT, BFL (ai-toolkit, BFL's trainer), kohya/musubi and LyCORIS (LoKr, LoHa) files, with
the format detected from the keys (docs/file-formats.md, 'LoRA files'). Each update targets one BFL weight
and a range of its rows: diffusers' separate Q, K and V land in row thirds of the fused `qkv`. Plain LoRA
stays low-rank (`LowRank`, for an unmerged branch on quantized weights); LoKr and LoHa are formed densely
on demand (`Dense`). `Lora.add_to` adds the update into a float32 dense weight;
`merged_entries` merges LoRAs into a dense transformer's entries as they load, and puts them beside a
quantized (GGUF) weight as a `LoraQuant` branch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .dit_names import transformer_to_diffusers
from .entries import Entry
from .weights import GGML_QUANTIZED, GGMLTensor, SafetensorsFile, WeightsError, to_float32

# Module-path prefixes written by the trainers (PEFT wrappers, ai-toolkit, ComfyUI, kohya, LyCORIS).
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_",
             "lycoris_", "lora_transformer_")
_TEXT_ENCODER = ("lora_te", "text_encoder", "te.", "te_")
# module path, then the tensor's role; PEFT's adapter name `.default` is dropped before matching
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<role>lora_[AB]\.weight|lora_down\.weight|lora_up\.weight"
                  r"|alpha|lokr_w[12](?:_[ab])?|hada_w[12]_[ab]|dora_scale|lora_magnitude_vector(?:\.weight)?)$")


@dataclass(frozen=True)
class LowRank:
    """ΔW[row:row + up.shape[0]] += scale · up @ down; `scale` includes alpha / rank."""

    up: np.ndarray  # (rows, r) float32
    down: np.ndarray  # (r, in) float32
    row: int
    scale: float
    # PEFT's DoRA `lora_magnitude_vector` (rows,): the merged rows are rescaled to these norms
    magnitude: np.ndarray | None = None


@dataclass(frozen=True)
class Dense:
    """A LoKr or LoHa update, formed on demand because it is as large as the rows it updates."""

    make: Callable[[], np.ndarray]
    row: int
    scale: float
    magnitude: None = None  # DoRA comes as PEFT's LowRank only

    def matrix(self) -> np.ndarray:
        return self.make()


@dataclass
class Lora:
    path: str
    format: str
    terms: dict[str, list[LowRank | Dense]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)  # keys for no layer of this model: warn
    text_encoder: list[str] = field(default_factory=list)  # not applied: warn

    @property
    def dora(self) -> bool:
        return any(t.magnitude is not None for ts in self.terms.values() for t in ts)

    def add_to(self, w: np.ndarray, name: str, user_scale: float = 1.0) -> None:
        """w += ΔW in place, term by term into its rows: no full-size ΔW or scaled copy (a klein-4B linear1
        is 340 MB in float32). A DoRA term then scales each of its rows to its magnitude, as PEFT merges:
        W' = m / ‖W + sΔW‖_row · (W + sΔW), the user scale inside the norm, m not scaled."""
        for t in self.terms[name]:
            if isinstance(t, LowRank):  # the scale on the small factor, not on the product
                m = (np.float32(user_scale * t.scale) * t.up) @ t.down
            else:
                m = np.float32(user_scale * t.scale) * t.matrix()
            rows = w[t.row:t.row + m.shape[0]]
            rows += m
            if t.magnitude is not None:
                rows *= (t.magnitude / np.linalg.norm(rows, axis=1))[:, None]


def _modules(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, np.ndarray]]:
    """Every module path a LoRA may name (BFL and diffusers, dotted and kohya's underscored) → (BFL weight,
    the BFL rows it covers, in its own row order). dit_names' splits and swaps are run on row numbers."""
    out = {}
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        try:
            parts = transformer_to_diffusers({name: np.arange(shape[0])})
        except KeyError:
            parts = {}
        for module, rows in [(name, np.arange(shape[0])), *parts.items()]:
            module = module.removesuffix(".weight")
            out[module] = out[module.replace(".", "_")] = (name, rows)
    return out


def _strip(key: str) -> str:
    key = key.replace(".default.", ".").removesuffix(".default")
    for p in _PREFIXES:
        key = key.removeprefix(p)
    return key


def _guess(keys) -> str:
    for part, name in (("lokr_", "LyCORIS LoKr"), ("hada_", "LyCORIS LoHa"), ("lora_down", "kohya"),
                       ("lora_A", "diffusers/PEFT")):
        if any(part in k for k in keys):
            return name
    return "none recognised"


def _peft_alpha(meta: dict) -> tuple[float | None, bool]:
    """diffusers' `lora_adapter_metadata` (PEFT's LoraConfig, keys bare or prefixed `transformer.`)."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None, False
    cfg = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    if cfg.get("alpha_pattern"):
        raise WeightsError("LoRA metadata has a per-layer alpha_pattern, which is not supported")
    return cfg.get("lora_alpha"), bool(cfg.get("use_rslora"))


def _alpha_scale(alpha, rank: int, rslora: bool = False) -> float:
    """alpha / rank (rsLoRA: alpha / √rank); no alpha stored means alpha = rank (kohya, LyCORIS, PEFT)."""
    if alpha is None:
        return 1.0
    return float(alpha) / (np.sqrt(rank) if rslora else rank)


def _term(path, module: str, t: dict, peft: tuple) -> tuple[LowRank | Dense, tuple]:
    """One module's tensors → its term and the (rows, in) shape of its update (checked by the caller)."""
    alpha = float(t["alpha"].reshape(-1)[0]) if "alpha" in t else None
    if "dora_scale" in t:  # kohya/LyCORIS DoRA: its norm axis and scaling are not checked against a reference
        raise WeightsError(f"{path}: {module} is a kohya/LyCORIS DoRA layer (dora_scale), not supported yet")
    magnitude = t.get("lora_magnitude_vector", t.get("lora_magnitude_vector.weight"))
    if magnitude is not None and "lora_B.weight" not in t:  # PEFT writes DoRA with lora_A/B only
        raise WeightsError(f"{path}: {module} has a DoRA magnitude vector without PEFT's lora_A/lora_B")
    if "lokr_w1" in t or "lokr_w1_a" in t:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        # LyCORIS scales by alpha / rank only when a factor is itself low-rank
        low = t.get("lokr_w2_b", t.get("lokr_w1_b"))
        scale = _alpha_scale(alpha, low.shape[0]) if low is not None else 1.0
        shape = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
        return Dense(lambda: np.kron(w1, w2), 0, scale), shape
    if "hada_w1_a" in t:
        a1, b1, a2, b2 = (t[f"hada_w{i}_{j}"] for i in "12" for j in "ab")
        return (Dense(lambda: (a1 @ b1) * (a2 @ b2), 0, _alpha_scale(alpha, b1.shape[0])),
                (a1.shape[0], b1.shape[1]))
    up = t.get("lora_B.weight", t.get("lora_up.weight"))
    down = t.get("lora_A.weight", t.get("lora_down.weight"))
    if (up is None or down is None or up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]
            or (magnitude is not None and magnitude.size != up.shape[0])):
        raise WeightsError(f"{path}: {module}: incomplete or mismatched LoRA tensors "
                           f"({', '.join(sorted(t))})")
    rslora = False
    if alpha is None and "lora_A.weight" in t:  # PEFT keeps alpha in the adapter config, not per layer
        alpha, rslora = peft
    if magnitude is not None:
        magnitude = magnitude.reshape(-1)
    scale = _alpha_scale(alpha, down.shape[0], rslora)
    return LowRank(up, down, 0, scale, magnitude), (up.shape[0], down.shape[1])


def _place(term: LowRank | Dense, rows: np.ndarray) -> LowRank | Dense:
    """Put a term onto the BFL rows its module covers: an offset, or a permutation (the final adaLN's
    swapped halves) applied to the up matrix or the dense product."""
    lo = int(rows.min())
    order = rows - lo
    if isinstance(term, LowRank):
        up = np.empty_like(term.up)
        up[order] = term.up
        magnitude = None
        if term.magnitude is not None:
            magnitude = np.empty_like(term.magnitude)
            magnitude[order] = term.magnitude
        return LowRank(up, term.down, lo, term.scale, magnitude)
    make = term.make

    def permuted():
        m = make()
        out = np.empty_like(m)
        out[order] = m
        return out

    return Dense(permuted, lo, term.scale)


def read_lora(path, shapes: dict[str, tuple[int, ...]]) -> Lora:
    """Read a LoRA file for the transformer whose BFL weight shapes are `shapes`
    (config.transformer_shapes). Errors (WeightsError, one line): unknown format, a layer whose shapes do
    not fit, a file that names no layer of this model."""
    f = SafetensorsFile(path)
    keys = f.keys()
    fmt = _guess(keys)
    modules = _modules(shapes)
    peft = _peft_alpha(f.metadata)
    out = Lora(str(path), fmt)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key in keys:
        if key.startswith(_TEXT_ENCODER):
            out.text_encoder.append(key)
            continue
        m = _KEY.match(_strip(key))
        if not m:
            raise WeightsError(f"{path}: not a LoRA format this reader knows (format guess: {fmt}); first "
                               f"unknown key {key!r}")
        if m["module"] not in modules:
            out.unmatched.append(key)
            continue
        groups.setdefault(m["module"], {})[m["role"]] = to_float32(f.get(key))
    if not groups and not out.text_encoder:
        first = out.unmatched[0] if out.unmatched else "(none)"
        raise WeightsError(f"{path}: no key of this LoRA ({fmt}) names a layer of this FLUX.2 transformer "
                           f"(first key {first!r}); is it for another model?")
    for module, t in groups.items():
        target, rows = modules[module]
        term, shape = _term(path, module, t, peft)
        want = (len(rows), shapes[target][1])
        if shape != want:
            raise WeightsError(f"{path}: LoRA layer {module} has shape {list(shape)} but the model's "
                               f"{target} needs {list(want)}; is this LoRA for another model (FLUX.1)?")
        out.terms.setdefault(target, []).append(_place(term, rows))
    return out


def sha256_prefix(path) -> str:
    """The first 16 hex digits of the file's sha256: what generated images record of a LoRA."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:16]


def _merged(load, name: str, loras: list[tuple[Lora, float]]) -> np.ndarray:
    # A copy: a float32 file's load() is a view of the file, which must stay the original weights.
    w = np.array(to_float32(load()), np.float32)
    for lora, scale in loras:
        if name in lora.terms:
            lora.add_to(w, name, scale)
    return w


@dataclass(frozen=True)
class LoraQuant:
    """A quantized weight with its LoRAs beside it, never re-quantized into it: y = Wq·x + up @ (down @ x)
    + dense @ x. The low-rank terms are stacked along the rank, each scale folded into its up columns, which
    are zero outside the term's rows (a q, k or v slice of a fused qkv); LoKr and LoHa terms, as large as
    the rows they update anyway, are summed into `dense`. None: no such terms. The backends' `base` is the
    GGMLTensor in their host or device form."""

    base: GGMLTensor
    down: np.ndarray | None  # (rank, in) float32
    up: np.ndarray | None  # (out, rank) float32
    dense: np.ndarray | None  # (out, in) float32


def _branched(load, name: str, loras: list[tuple[Lora, float]]) -> LoraQuant:
    base = load()
    out = base.shape[0]
    downs, ups, dense = [], [], None
    for lora, scale in loras:
        for t in lora.terms.get(name, ()):
            s = np.float32(scale * t.scale)
            if isinstance(t, LowRank):
                up = np.zeros((out, t.up.shape[1]), np.float32)
                up[t.row:t.row + t.up.shape[0]] = s * t.up
                downs.append(t.down)
                ups.append(up)
            else:
                m = t.matrix()
                dense = np.zeros(base.shape, np.float32) if dense is None else dense
                dense[t.row:t.row + m.shape[0]] += s * m
    return LoraQuant(base, np.concatenate(downs) if downs else None, np.concatenate(ups, 1) if ups else None,
                     dense)


def merged_entries(entries: dict[str, Entry], loras: list[tuple[Lora, float]]) -> dict[str, Entry]:
    """The transformer's entries with each weight a LoRA targets loading as float32 W + Σ scale·ΔW, or, for a
    quantized (GGUF) weight, as a LoraQuant. Per entry when it loads, so a streamed block carries its LoRAs;
    always from the file's W."""
    dora = [lora for lora, _ in loras if lora.dora]
    # PEFT's stacked DoRA adapters merge in turn but run additively: two references that disagree
    if dora and len(loras) > 1:
        raise WeightsError(f"{dora[0].path} is a DoRA LoRA, which cannot be stacked with other LoRAs yet")
    out = dict(entries)
    for name in dict.fromkeys(name for lora, _ in loras for name in lora.terms):
        e = entries[name]
        if dora and e.stored in GGML_QUANTIZED:
            raise WeightsError("DoRA on a quantized (GGUF) transformer is not supported yet; use the "
                               "bf16/fp16 file")
        make = _branched if e.stored in GGML_QUANTIZED else _merged
        out[name] = Entry(e.shape, partial(make, e.load, name, loras), e.stored)
    return out
