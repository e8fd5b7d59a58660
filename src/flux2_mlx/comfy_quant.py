"""Which layers of a safetensors transformer are quantized the way BFL's and Comfy-Org's quantized files
are (ComfyUI's mixed-precision layers: FP8, MXFP8, NVFP4), read strictly into one Entry per weight.
Numpy only.

A layer is marked by a `<layer>.comfy_quant` uint8 tensor holding JSON (`{"format": "nvfp4"}`), by the
header's `_quantization_metadata` (`{"layers": {layer: {"format": ...}}}`), or, in ComfyUI's older
`scaled_fp8` files (a `scaled_fp8` tensor present), by an F8_E4M3 weight with `scale_weight` /
`scale_input` beside it. Unmarked layers are plain tensors. FP8 and NVFP4 layers keep their activation
scale (`input_scale`) for torch's FP8 / FP4 matmuls; MXFP8's is read over (it runs weight-only).
"""

from __future__ import annotations

import json
import math

import numpy as np

from .entries import Entry
from .quant.scaled import MXFP8, NVFP4, ScaledFP8, scale_grid
from .weights import WeightsError, to_float32

FORMATS = ("float8_e4m3fn", "mxfp8", "nvfp4")
# Per-layer scales under both naming schemes (legacy scaled_fp8 second).
_SCALES = ("weight_scale", "scale_weight")
_INPUT_SCALES = ("input_scale", "scale_input")


def _json(raw: bytes | str, what: str):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise WeightsError(f"{what} is not JSON; the file is damaged") from None


def layer_markers(source, names: dict[str, str], prefix: str) -> dict[str, dict]:
    """layer (canonical name, no `.weight`) → its marker's config; `names`: canonical name → key in `source`,
    `prefix` the wrapper prefix stripped from them."""
    out: dict[str, dict] = {}
    meta = getattr(source, "metadata", {}).get("_quantization_metadata")  # shape-only stand-ins have none
    if meta is not None:
        layers = _json(meta, f"{source.path}: header key _quantization_metadata")
        layers = layers.get("layers") if isinstance(layers, dict) else None
        if not isinstance(layers, dict):
            raise WeightsError(f"{source.path}: _quantization_metadata has no map of \"layers\"")
        out.update({k.removeprefix(prefix): v for k, v in layers.items()})
    for n, k in names.items():
        if n.endswith(".comfy_quant"):
            raw = np.asarray(source.get(k)).view(np.uint8).tobytes()
            out[n.removesuffix(".comfy_quant")] = _json(raw, f"{source.path}: {k}")
    if "scaled_fp8" in names:
        out.update({n.removesuffix(".scale_weight"): {"format": "float8_e4m3fn"} for n in names
                    if n.endswith(".scale_weight")})
    return out


def _scalar(source, key: str, layer: str, where) -> np.float32:
    if math.prod(source.shape(key)) != 1 or source.dtype(key) not in ("F32", "F16", "BF16"):
        raise WeightsError(f"{where}: layer {layer}: {key} is {source.dtype(key)} {list(source.shape(key))}, "
                           f"not one float per tensor")
    return np.float32(to_float32(source.get(key)).reshape(()))


def _grid(source, scale: str, layer: str, where, shape: tuple[int, int], group: int, dtype: str, fmt: str):
    """Refuse block scales that are not `dtype` in whole 128 × 4 tiles over an (n, k) weight."""
    grid = scale_grid(*shape, group)
    if source.dtype(scale) != dtype or tuple(source.shape(scale)) != grid:
        raise WeightsError(f"{where}: layer {layer}: weight_scale is {source.dtype(scale)} "
                           f"{list(source.shape(scale))}, expected {dtype} {list(grid)} (block scales of a "
                           f"{shape[0]} × {shape[1]} {fmt} weight in 128 × 4 tiles)")


def _entry(source, fmt: str, parts: dict[str, str], layer: str, full: bool) -> Entry:
    """The Entry of one marked layer, its tensors (`parts`: role → key) checked from the header."""
    where = source.path
    w = parts["weight"]
    shape, dtype = source.shape(w), source.dtype(w)
    scale = next((parts[s] for s in _SCALES if s in parts), None)
    if scale is None:
        raise WeightsError(f"{where}: layer {layer} is marked {fmt} but has no weight_scale")
    if len(shape) != 2:
        raise WeightsError(f"{where}: layer {layer} is marked {fmt} but its weight {list(shape)} is not a "
                           f"matrix")
    if fmt == "nvfp4":
        n, k = shape[0], shape[1] * 2
        if dtype != "U8" or k % 16:
            raise WeightsError(f"{where}: layer {layer} is marked nvfp4 but its weight is {dtype} "
                               f"{list(shape)}; NVFP4 rows are uint8 pairs of codes, whole blocks of 16")
        if "weight_scale_2" not in parts:
            raise WeightsError(f"{where}: layer {layer} is marked nvfp4 but has no weight_scale_2")
        _grid(source, scale, layer, where, (n, k), 16, "F8_E4M3", "NVFP4")
        s2, act = parts["weight_scale_2"], next((parts[s] for s in _INPUT_SCALES if s in parts), None)
        for s in (s2, act) if act else (s2,):
            _scalar(source, s, layer, where)
        return Entry((n, k), lambda: NVFP4(source.get(w).view(np.uint8), source.get(scale).view(np.uint8),
                                           _scalar(source, s2, layer, where), full,
                                           None if act is None else _scalar(source, act, layer, where)),
                     "NVFP4", full_precision=full)
    if dtype != "F8_E4M3":
        raise WeightsError(f"{where}: layer {layer} is marked {fmt} but its weight is {dtype}")
    if fmt == "mxfp8":
        if shape[1] % 32:
            raise WeightsError(f"{where}: layer {layer} is marked mxfp8 but its rows of {shape[1]} values "
                               f"are not whole blocks of 32")
        _grid(source, scale, layer, where, shape, 32, "F8_E8M0", "MXFP8")
        return Entry(shape, lambda: MXFP8(source.get(w), source.get(scale).view(np.uint8), full), "MXFP8",
                     full_precision=full)
    act = next((parts[s] for s in _INPUT_SCALES if s in parts), None)
    for s in (scale, act) if act else (scale,):
        _scalar(source, s, layer, where)
    return Entry(shape, lambda: ScaledFP8(source.get(w), _scalar(source, scale, layer, where), full,
                                          None if act is None else _scalar(source, act, layer, where)),
                 "FP8", full_precision=full)


def scaled_entries(source, names: dict[str, str], prefix: str) -> tuple[dict[str, Entry], set[str]]:
    """(canonical `<layer>.weight` → Entry loading a ScaledFP8 / NVFP4 / MXFP8, the canonical names these
    layers consume), checked from the header: a marker naming another format, a weight of the wrong dtype
    or shape, a missing or mis-shaped scale are errors naming the layer."""
    out: dict[str, Entry] = {}
    used: set[str] = set()
    for layer, conf in layer_markers(source, names, prefix).items():
        fmt = conf.get("format") if isinstance(conf, dict) else None
        if fmt not in FORMATS:
            raise WeightsError(f"{source.path}: layer {layer} is marked as format {fmt!r}, which flux2-mlx "
                               f"does not run (it runs {', '.join(FORMATS)})")
        parts = {s: names[f"{layer}.{s}"] for s in ("weight", *_SCALES, *_INPUT_SCALES, "comfy_quant",
                                                    "weight_scale_2")
                 if f"{layer}.{s}" in names}
        used.update(f"{layer}.{s}" for s in parts)
        if "weight" not in parts:
            raise WeightsError(f"{source.path}: layer {layer} is marked {fmt} but has no "
                               f"{prefix}{layer}.weight")
        full = bool(conf.get("full_precision_matrix_mult"))
        out[f"{layer}.weight"] = _entry(source, fmt, parts, layer, full)
    if out and "scaled_fp8" in names:
        used.add("scaled_fp8")
    return out, used
