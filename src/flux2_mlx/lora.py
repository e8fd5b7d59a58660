"""LoRA files → updates of the BFL-named transformer weights. Numpy only.

Reads diffusers/PEFT, BFL (ai-toolkit, BFL's trainer), kohya/musubi and LyCORIS (LoKr, LoHa) files, with
the format detected from the keys (docs/file-formats.md, 'LoRA files'). Each update targets one BFL weight
and a range of its rows: diffusers' separate Q, K and V land in row thirds of the fused `qkv`. Plain LoRA
stays low-rank (`LowRank`, for an unmerged branch on quantized weights); LoKr and LoHa are formed densely
on demand (`Dense`); either may carry a DoRA magnitude (`Dora`). `Lora.add_to` adds the update into a float32
dense weight; `merged_entries` merges LoRAs into a dense transformer's entries as they load, and puts them
beside a quantized (GGUF) weight as a `LoraQuant` branch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from .dit_names import transformer_to_diffusers
from .entries import Entry
from .quant.scaled import MXFP8, NVFP4, SCALED_TYPES, ScaledFP8
from .weights import GGML_QUANTIZED, GGMLTensor, SafetensorsFile, WeightsError, to_float32

# Module-path prefixes written by the trainers (PEFT wrappers, ai-toolkit, ComfyUI, kohya, LyCORIS).
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_",
             "lycoris_", "lora_transformer_")
_TEXT_ENCODER = ("lora_te", "text_encoder", "te.", "te_")
# module path, then the tensor's role; PEFT's adapter name `.default` is dropped before matching
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<role>lora_[AB]\.weight|lora_down\.weight|lora_up\.weight"
                  r"|alpha|lokr_w[12](?:_[ab])?|hada_w[12]_[ab]|dora_scale|lora_magnitude_vector(?:\.weight)?)$")


@dataclass(frozen=True)
class Dora:
    """A DoRA term's magnitudes, applied as its trainer runs it (W the file's weight, sΔW the term's update
    at the user's scale s, norms per row):
    - PEFT (`lora_magnitude_vector`, per row): the rows so far, this update added, are rescaled by
      m / ‖W + sΔW‖. That is PEFT's unmerged forward, where an adapter's DoRA rescales the output of the
      adapters before it; its merge instead takes the norm of the already merged weight.
    - LyCORIS (`dora_scale`, per row (out, 1), or per input column (1, in) when trained with
      wd_on_out=False): (W + ΔW)·k − W is added, k = s·(m / (‖W + ΔW‖ + ε) − 1) + 1, the user's scale
      blending the rescale rather than scaling ΔW."""

    magnitude: np.ndarray  # (rows,), or (in,) when `columns`
    peft: bool
    columns: bool = False

    def factor(self, base: np.ndarray, update: np.ndarray, user_scale: float) -> np.ndarray:
        """The term's rescale: r = m / ‖W + sΔW‖ (PEFT, `update` = sΔW) or k (LyCORIS, `update` = ΔW), from
        the base rows it covers."""
        norms = np.linalg.norm(base + update, axis=0 if self.columns else 1)
        if self.peft:
            return self.magnitude / norms
        k = self.magnitude / (norms + np.finfo(np.float32).eps)
        return np.float32(user_scale) * (k - 1) + 1


@dataclass(frozen=True)
class LowRank:
    """ΔW[row:row + up.shape[0]] += scale · up @ down; `scale` includes alpha / rank."""

    up: np.ndarray  # (rows, r) float32
    down: np.ndarray  # (r, in) float32
    row: int
    scale: float
    dora: Dora | None = None


@dataclass(frozen=True)
class Dense:
    """A LoKr or LoHa update, formed on demand because it is as large as the rows it updates."""

    make: Callable[[], np.ndarray]
    row: int
    scale: float
    dora: Dora | None = None

    def matrix(self) -> np.ndarray:
        return self.make()


def _delta_scale(t: LowRank | Dense, user_scale: float) -> np.float32:
    """The factor on a term's ΔW: the user's scale times alpha / rank, except for a LyCORIS DoRA, whose
    user scale blends its rescale instead (see Dora)."""
    lycoris = t.dora is not None and not t.dora.peft
    return np.float32(t.scale if lycoris else user_scale * t.scale)


@dataclass
class Lora:
    path: str
    format: str
    terms: dict[str, list[LowRank | Dense]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)  # keys for no layer of this model: warn
    text_encoder: list[str] = field(default_factory=list)  # not applied: warn

    @property
    def dora(self) -> bool:
        return any(t.dora is not None for ts in self.terms.values() for t in ts)

    def add_to(self, w: np.ndarray, name: str, user_scale: float = 1.0,
               base: np.ndarray | None = None) -> None:
        """w += ΔW in place, term by term into its rows: no full-size ΔW or scaled copy (a klein-4B linear1
        is 340 MB in float32). DoRA terms (see Dora) take their norms from `base`, the file's weight, which
        is w itself when not given."""
        if base is None and self.dora:
            base = w.copy()
        for t in self.terms[name]:
            s = _delta_scale(t, user_scale)
            m = (s * t.up) @ t.down if isinstance(t, LowRank) else s * t.matrix()  # scaled on the small side
            rows = w[t.row:t.row + m.shape[0]]
            if t.dora is None:
                rows += m
                continue
            b = base[t.row:t.row + m.shape[0]]
            k = t.dora.factor(b, m, user_scale)
            k = k if t.dora.columns else k[:, None]
            if t.dora.peft:
                rows += m
                rows *= k
            else:
                rows += b * (k - 1) + m * k


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


def _dora(path, module: str, t: dict, shape: tuple[int, int]) -> Dora | None:
    """The module's DoRA magnitudes, checked against the (rows, in) shape of its update."""
    magnitude = t.get("lora_magnitude_vector", t.get("lora_magnitude_vector.weight"))
    if magnitude is not None:
        if "lora_B.weight" not in t:  # PEFT writes DoRA with lora_A/B only
            raise WeightsError(f"{path}: {module} has a DoRA magnitude vector without PEFT's lora_A/lora_B")
        dora = Dora(magnitude.reshape(-1), peft=True)
    elif "dora_scale" in t:  # LyCORIS keeps the norm's axis in the shape: (out, 1) or (1, in)
        scale = t["dora_scale"]
        dora = Dora(scale.reshape(-1), peft=False, columns=scale.ndim == 2 and scale.shape[1] != 1)
    else:
        return None
    if dora.magnitude.size != shape[1 if dora.columns else 0]:
        raise WeightsError(f"{path}: {module}: its DoRA magnitudes ({dora.magnitude.size}) do not fit its "
                           f"update of shape {list(shape)}")
    return dora


def _term(path, module: str, t: dict, peft: tuple) -> tuple[LowRank | Dense, tuple]:
    """One module's tensors → its term and the (rows, in) shape of its update (checked by the caller)."""
    term, shape = _update(path, module, t, peft)
    return replace(term, dora=_dora(path, module, t, shape)), shape


def _update(path, module: str, t: dict, peft: tuple) -> tuple[LowRank | Dense, tuple]:
    alpha = float(t["alpha"].reshape(-1)[0]) if "alpha" in t else None
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
    if up is None or down is None or up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
        raise WeightsError(f"{path}: {module}: incomplete or mismatched LoRA tensors "
                           f"({', '.join(sorted(t))})")
    rslora = False
    if alpha is None and "lora_A.weight" in t:  # PEFT keeps alpha in the adapter config, not per layer
        alpha, rslora = peft
    return LowRank(up, down, 0, _alpha_scale(alpha, down.shape[0], rslora)), (up.shape[0], down.shape[1])


def _place(term: LowRank | Dense, rows: np.ndarray) -> LowRank | Dense:
    """Put a term onto the BFL rows its module covers: an offset, or a permutation (the final adaLN's
    swapped halves) applied to the up matrix or the dense product."""
    lo = int(rows.min())
    order = rows - lo

    def permuted(a: np.ndarray) -> np.ndarray:
        out = np.empty_like(a)
        out[order] = a
        return out

    dora = term.dora
    if dora is not None and not dora.columns:
        dora = replace(dora, magnitude=permuted(dora.magnitude))
    if isinstance(term, LowRank):
        return LowRank(permuted(term.up), term.down, lo, term.scale, dora)
    make = term.make
    return Dense(lambda: permuted(make()), lo, term.scale, dora)


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


def split_spec(value: str) -> tuple[str, str | None]:
    """"FILE[:SCALE]" → (FILE, the scale's text or None). A colon belongs to the file name when the whole
    names a file (a Windows drive, a name with a colon in it)."""
    name, colon, tail = value.rpartition(":")
    return (value, None) if not colon or Path(value).exists() else (name, tail)


def sha256_prefix(path) -> str:
    """The first 16 hex digits of the file's sha256: what generated images record of a LoRA."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:16]


# The stored types a LoRA runs beside, never merged into: GGUF blocks, FP8 / MXFP8 / NVFP4 layers.
QUANTIZED = (*GGML_QUANTIZED, *SCALED_TYPES)


def _merged(load, name: str, loras: list[tuple[Lora, float]]) -> np.ndarray:
    stored = load()
    base = to_float32(stored)
    # Added into in place: a copy only when base is the file itself (a float32 view) or a DoRA needs W.
    dora = any(lora.dora for lora, _ in loras)
    w = base.copy() if dora or np.may_share_memory(base, stored) else base
    for lora, scale in loras:
        if name in lora.terms:
            lora.add_to(w, name, scale, base)
    return w


@dataclass(frozen=True)
class LoraQuant:
    """A quantized weight with its LoRAs beside it, never re-quantized into it: y = base_scale ⊙ (Wq·x) +
    up @ (down @ x) + dense @ x. The low-rank terms are stacked along the rank, each scale folded into its up
    columns, which are zero outside the term's rows (a q, k or v slice of a fused qkv); LoKr and LoHa terms,
    as large as the rows they update anyway, are summed into `dense`; DoRA's per-row rescales of the base
    output are in `base_scale`. None: no such terms. The backends' `base` is the GGMLTensor in their host or
    device form."""

    base: GGMLTensor | ScaledFP8 | NVFP4 | MXFP8
    down: np.ndarray | None  # (rank, in) float32
    up: np.ndarray | None  # (out, rank) float32
    dense: np.ndarray | None  # (out, in) float32
    base_scale: np.ndarray | None = None  # (out,) float32

    def factors(self) -> tuple:
        return self.down, self.up, self.dense, self.base_scale

    def merged(self, w: np.ndarray) -> np.ndarray:
        """base_scale ⊙ W + up @ down + dense in float32: the branch folded into the weight, for a backend
        that holds this base decoded (MLX: a layer marked for a full-precision matmul)."""
        out = np.array(w, np.float32) if self.base_scale is None else w * self.base_scale[:, None]
        if self.up is not None:
            out += self.up @ self.down
        if self.dense is not None:
            out += self.dense
        return out


def _branched(load, name: str, loras: list[tuple[Lora, float]]) -> LoraQuant:
    base = load()
    out = base.shape[0]
    downs, ups, dense, base_scale, w = [], [], None, None, None
    for lora, scale in loras:
        for t in lora.terms.get(name, ()):
            s = _delta_scale(t, scale)
            m = t.matrix() if isinstance(t, Dense) else None
            rows = slice(t.row, t.row + (m if m is not None else t.up).shape[0])
            k = np.ones((rows.stop - rows.start, 1), np.float32)
            if t.dora is not None:
                # for the norms only (see Dora): the values both backends multiply by, which they decode
                # bit for bit as dequantize() does
                w = base.dequantize() if w is None else w
                update = s * (m if m is not None else t.up @ t.down)
                k = t.dora.factor(w[rows], update, scale)[:, None]
                base_scale = np.ones(out, np.float32) if base_scale is None else base_scale
                if t.dora.peft:  # rescales the base output and every term before it on these rows
                    base_scale[rows] *= k[:, 0]
                    for u in ups:
                        u[rows] *= k
                    if dense is not None:
                        dense[rows] *= k
                else:
                    base_scale[rows] += k[:, 0] - 1
            if m is None:
                up = np.zeros((out, t.up.shape[1]), np.float32)
                up[rows] = (s * t.up) * k
                downs.append(t.down)
                ups.append(up)
            else:
                dense = np.zeros(base.shape, np.float32) if dense is None else dense
                dense[rows] += (s * m) * k
    return LoraQuant(base, np.concatenate(downs) if downs else None, np.concatenate(ups, 1) if ups else None,
                     dense, base_scale)


def merged_entries(entries: dict[str, Entry], loras: list[tuple[Lora, float]]) -> dict[str, Entry]:
    """The transformer's entries with each weight a LoRA targets loading as float32 W + Σ scale·ΔW, or, for a
    quantized (GGUF, FP8, MXFP8, NVFP4) weight, as a LoraQuant. Per entry when it loads, so a streamed block
    carries its LoRAs; always from the file's W."""
    out = dict(entries)
    for name in dict.fromkeys(name for lora, _ in loras for name in lora.terms):
        e = entries[name]
        quantized = e.stored in QUANTIZED
        for lora, _ in loras:
            if quantized and any(t.dora is not None and t.dora.columns for t in lora.terms.get(name, ())):
                # its rescale would apply to the input of the quantized matmul: a second pass over Wq
                raise WeightsError(f"{lora.path}: {name} is a LyCORIS DoRA trained per input column "
                                   f"(wd_on_out=False), which cannot run beside a quantized weight; "
                                   f"use the bf16/fp16 transformer file")
        make = _branched if quantized else _merged
        out[name] = replace(e, load=partial(make, e.load, name, loras),
                             beside=_branch_size(e.shape, name, loras) if quantized else 0)
    return out


def _branch_size(shape: tuple[int, int], name: str, loras: list[tuple[Lora, float]]) -> int:
    """How many values _branched puts beside a quantized weight: the stacked factors, one dense matrix
    for all LoKr/LoHa terms, the DoRA rescale."""
    terms = [t for lora, _ in loras for t in lora.terms.get(name, ())]
    rank = sum(t.up.shape[1] for t in terms if isinstance(t, LowRank))
    dense = any(isinstance(t, Dense) for t in terms)
    dora = any(t.dora is not None for t in terms)
    return rank * (shape[0] + shape[1]) + dense * shape[0] * shape[1] + dora * shape[0]
