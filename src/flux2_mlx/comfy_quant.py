"""Which layers of a safetensors transformer are quantized the way BFL's and Comfy-Org's FP8 / NVFP4 files
are (ComfyUI's mixed-precision layers), read strictly into one Entry per weight. Numpy only.

A layer is marked by a `<layer>.comfy_quant` uint8 tensor holding JSON (`{"format": "nvfp4"}`), by the
header's `_quantization_metadata` (`{"layers": {layer: {"format": ...}}}`), or, in ComfyUI's older
`scaled_fp8` files (a `scaled_fp8` tensor present), by an F8_E4M3 weight with `scale_weight` /
`scale_input` beside it. Unmarked layers are plain tensors. FP8 layers keep their activation scale
(`input_scale`) for torch's FP8 matmuls; NVFP4's is read over (NVFP4 runs weight-only).
"""

from __future__ import annotations

import json
import math

import numpy as np

from .entries import Entry
from .quant.scaled import NVFP4, ScaledFP8, scale_grid
from .weights import WeightsError, to_float32

FORMATS = {"float8_e4m3fn": "FP8", "nvfp4": "NVFP4"}
# Per-layer tensors besides `.weight`, under both naming schemes (legacy scaled_fp8 second).
_SCALES = {"weight_scale": "weight_scale", "scale_weight": "weight_scale"}
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


def scaled_entries(source, names: dict[str, str], prefix: str) -> tuple[dict[str, Entry], set[str]]:
    """(canonical `<layer>.weight` → Entry loading a ScaledFP8 / NVFP4, the canonical names these layers
    consume), checked from the header: a marker naming another format, a weight of the wrong dtype, a
    missing or mis-shaped scale are errors naming the layer."""
    where = source.path
    out: dict[str, Entry] = {}
    used: set[str] = set()
    for layer, conf in layer_markers(source, names, prefix).items():
        fmt = conf.get("format") if isinstance(conf, dict) else None
        if fmt not in FORMATS:
            raise WeightsError(f"{where}: layer {layer} is marked as format {fmt!r}, which flux2-mlx does "
                               f"not run (it runs {', '.join(FORMATS)})")
        parts = {s: names[f"{layer}.{s}"] for s in ("weight", *_SCALES, *_INPUT_SCALES, "comfy_quant",
                                                    "weight_scale_2")
                 if f"{layer}.{s}" in names}
        used.update(f"{layer}.{s}" for s in parts)
        if "weight" not in parts:
            raise WeightsError(f"{where}: layer {layer} is marked {fmt} but has no {prefix}{layer}.weight")
        w = parts["weight"]
        shape, dtype = source.shape(w), source.dtype(w)
        scale = next((parts[s] for s in _SCALES if s in parts), None)
        if scale is None:
            raise WeightsError(f"{where}: layer {layer} is marked {fmt} but has no weight_scale")
        full = bool(conf.get("full_precision_matrix_mult", False))
        if len(shape) != 2:
            raise WeightsError(f"{where}: layer {layer} is marked {fmt} but its weight {list(shape)} is not "
                               f"a matrix")
        if fmt == "float8_e4m3fn":
            if dtype != "F8_E4M3":
                raise WeightsError(f"{where}: layer {layer} is marked {fmt} but its weight is {dtype}")
            act = next((parts[s] for s in _INPUT_SCALES if s in parts), None)
            for s in (scale, act) if act else (scale,):
                _scalar(source, s, layer, where)
            load = lambda w=w, s=scale, a=act, layer=layer, full=full: ScaledFP8(
                source.get(w), _scalar(source, s, layer, where), full,
                None if a is None else _scalar(source, a, layer, where))
            out[f"{layer}.weight"] = Entry(shape, load, "FP8")
            continue
        n, k = shape[0], shape[1] * 2
        if dtype != "U8" or k % 16:
            raise WeightsError(f"{where}: layer {layer} is marked nvfp4 but its weight is {dtype} "
                               f"{list(shape)}; NVFP4 rows are uint8 pairs of codes, whole blocks of 16")
        if "weight_scale_2" not in parts:
            raise WeightsError(f"{where}: layer {layer} is marked nvfp4 but has no weight_scale_2")
        grid = scale_grid(n, k)
        if source.dtype(scale) != "F8_E4M3" or tuple(source.shape(scale)) != grid:
            raise WeightsError(f"{where}: layer {layer}: weight_scale is {source.dtype(scale)} "
                               f"{list(source.shape(scale))}, expected F8_E4M3 {list(grid)} (block scales "
                               f"of a {n} × {k} NVFP4 weight in 128 × 4 tiles)")
        _scalar(source, parts["weight_scale_2"], layer, where)
        load = lambda w=w, s=scale, s2=parts["weight_scale_2"], layer=layer, full=full: NVFP4(
            source.get(w).view(np.uint8), source.get(s).view(np.uint8), _scalar(source, s2, layer, where),
            full)
        out[f"{layer}.weight"] = Entry((n, k), load, "NVFP4")
    if out and "scaled_fp8" in names:
        used.add("scaled_fp8")
    return out, used
