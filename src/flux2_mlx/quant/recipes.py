"""Per-tensor ggml type policy for `flux2 convert` (docs/quantization.md, 'Type policy of flux2 convert').
Numpy only.

A target name (`Q4_K_M`, `Q8_0`, `BF16`, …) is a default type plus upgrades, as llama.cpp's ftypes are.
Image models follow city96's ComfyUI-GGUF (`tools/convert.py` + `lcpp.patch`), so files match the
published FLUX.2 GGUFs; text encoders follow llama.cpp's `llama_tensor_get_type` for LLMs.
"""

from __future__ import annotations

import numpy as np

from .ggml import GGMLType, block_info

T = GGMLType

# target → (default type, gguf `general.file_type` = llama.cpp LLAMA_FTYPE_MOSTLY_*)
TARGETS: dict[str, tuple[GGMLType, int]] = {
    "Q8_0": (T.Q8_0, 7), "Q6_K": (T.Q6_K, 18), "Q5_K_M": (T.Q5_K, 17), "Q5_K_S": (T.Q5_K, 16),
    "Q4_K_M": (T.Q4_K, 15), "Q4_K_S": (T.Q4_K, 14), "Q4_0": (T.Q4_0, 2), "Q4_1": (T.Q4_1, 3),
    "Q5_0": (T.Q5_0, 8), "Q5_1": (T.Q5_1, 9), "Q3_K_M": (T.Q3_K, 12), "Q2_K": (T.Q2_K, 10),
    "BF16": (T.BF16, 32), "F16": (T.F16, 1),
}
# Image models: city96's lcpp.patch keeps the embedders and the final layer unquantized.
HIGH_PRECISION = ("img_in.", "txt_in.", "time_in.", "guidance_in.", "vector_in.", "final_layer.")
# lcpp.patch `img_tensor_get_type`: `*.attn.qkv.weight` (img_attn.qkv, txt_attn.qkv) one step up in the _M
# mixes. Its other upgrades (v-projections, ffn_down-style names) match no FLUX BFL name, and linear1 (the
# single blocks' fused qkv+mlp) is not upgraded there either, so neither is it here: the sizes then match
# the published city96/orabazes files. _S mixes, Q2_K, Q6_K, Q8_0 and the legacy types are uniform.
IMAGE_QKV_UPGRADE = {"Q5_K_M": T.Q6_K, "Q4_K_M": T.Q5_K, "Q3_K_M": T.Q4_K}
# llama.cpp's fallback when a row is not a whole number of 256-element super-blocks.
SHAPE_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
# Element range over which one fp16 scale `d` spans a block: d ≈ max|w| / DIVISOR (K-quants: sub-block
# scale times the 6-/8-bit super-block code). Used only for the cheap underflow check below.
_DIVISOR = {T.Q8_0: 127, T.Q4_0: 8, T.Q4_1: 15, T.Q5_0: 16, T.Q5_1: 31, T.Q2_K: 3 * 15,
            T.Q3_K: 4 * 32, T.Q4_K: 15 * 63, T.Q5_K: 31 * 63, T.Q6_K: 32 * 128}
# fp16 subnormals step by 2**-24: a scale below 2**-20 is off by more than 3 %, below 2**-25 it is 0.
TINY_SCALE = 2.0 ** -20
UNDERFLOW_FRACTION = 0.01  # more than this share of non-zero blocks at risk → the tensor moves type


# `flux2 convert --type fp8 / nvfp4 / mxfp8`: a safetensors file in ComfyUI's per-layer formats (the
# `comfy_quant` marker's format name), not a GGUF.
SCALED_TARGETS = {"FP8": "float8_e4m3fn", "NVFP4": "nvfp4", "MXFP8": "mxfp8"}
# Rows and columns each format needs whole (comfy-kitchen pads NVFP4 to 16 × 16 and MXFP8 to 32 × 32, which
# a FLUX.2 layer never needs; a layer that would is kept in bf16 instead).
SCALED_ALIGN = {"float8_e4m3fn": 1, "nvfp4": 16, "mxfp8": 32}


def target(name: str) -> tuple[GGMLType, int]:
    try:
        return TARGETS[name.upper()]
    except KeyError:
        raise ValueError(f"unknown type {name!r}; choose one of: {', '.join([*TARGETS, *SCALED_TARGETS])}") \
            from None


def scaled_format(name: str, shape, target_name: str) -> str | None:
    """The comfy format of one transformer tensor (BFL name) under an FP8 / NVFP4 / MXFP8 target, None for
    bf16. Only the blocks' linear layers are quantized (attention qkv / proj, the MLPs, the single blocks'
    linear1 / linear2), as in Comfy-Org's and BFL's mixed files: the embedders, the shared modulations and
    the final layer (a few per cent of the weights, the most sensitive ones) stay bf16."""
    fmt = SCALED_TARGETS[target_name.upper()]
    a = SCALED_ALIGN[fmt]
    if (len(shape) != 2 or not name.endswith(".weight") or not name.startswith(("double_blocks.",
                                                                                   "single_blocks."))):
        return None
    return fmt if shape[0] % a == 0 and shape[1] % a == 0 else None


def _fits(t: GGMLType, shape) -> bool:
    return shape[-1] % block_info(t)[0] == 0


def _shape_ok(t: GGMLType, shape) -> GGMLType:
    """`t`, or llama.cpp's 32-block fallback, or F32 when the row fits no block at all."""
    if _fits(t, shape):
        return t
    t = SHAPE_FALLBACK.get(t, t)
    return t if _fits(t, shape) else T.F32


def tensor_type(name: str, shape, target_name: str) -> GGMLType:
    """ggml type of one image-model tensor (BFL name, numpy shape) under a target."""
    default, _ = target(target_name)
    if len(shape) < 2 or int(np.prod(shape)) <= 1024:
        return T.F32  # norm scales, biases and tiny tensors (city96 convert.py)
    dense = T.F16 if default == T.F16 else T.BF16
    if default in (T.BF16, T.F16) or name.startswith(HIGH_PRECISION):
        return dense
    if name.endswith((".attn.qkv.weight", "_attn.qkv.weight")):
        default = IMAGE_QKV_UPGRADE.get(target_name.upper(), default)
    return _shape_ok(default, shape)


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2  # llama.cpp use_more_bits


def text_tensor_type(name: str, shape, target_name: str, n_layers: int, n_gqa: int = 1) -> GGMLType:
    """ggml type of one text-encoder tensor (llama.cpp name) under a target: llama.cpp's LLM mixes.

    Only `*.weight` matrices are quantized; norms stay F32. The layer-position rules use `n_layers`, the
    layers written (llama.cpp counts the layers of the file it quantizes, too).
    """
    default, _ = target(target_name)
    if len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight"):
        return T.F32
    if default in (T.BF16, T.F16):
        return default
    t, tgt = default, target_name.upper()
    i = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight":
        legacy = default in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
        t = T.Q8_0 if tgt == "Q8_0" else default if legacy else T.Q6_K
    elif ".attn_v." in name:
        if tgt in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n_layers):
            t = T.Q6_K
        elif tgt == "Q4_K_S" and i < 4:
            t = T.Q5_K
        elif tgt == "Q3_K_M":
            t = T.Q5_K if i < 2 else T.Q4_K
        elif tgt == "Q2_K":
            t = T.Q4_K if n_gqa >= 4 else T.Q3_K
    elif ".ffn_down." in name:
        if tgt in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n_layers):
            t = T.Q6_K
        elif tgt == "Q4_K_S" and i < n_layers // 8:
            t = T.Q5_K
        elif tgt == "Q3_K_M":
            t = T.Q5_K if i < n_layers // 16 else T.Q4_K
        elif tgt == "Q2_K":
            t = T.Q3_K
    elif ".attn_output." in name:
        t = {"Q3_K_M": T.Q4_K, "Q2_K": T.Q3_K}.get(tgt, t)
    return _shape_ok(t, shape)


def scale_underflow(a: np.ndarray, t: GGMLType) -> float:
    """Share of non-zero blocks whose fp16 scale would be tiny (< TINY_SCALE) under `t`; 0 for dense types.

    One abs-max reduction over the blocks: a tensor of tiny weights (say |w| < 1e-4 for Q4_K) would lose
    most of its precision, or decode to zeros, because ggml stores each block's scale as fp16.
    F16 itself: the share of non-zero values below fp16's normal range, or 1 when a value overflows it.
    """
    if t == T.F16:
        m = np.abs(a)
        if m.size and float(m.max()) > 65504:
            return 1.0
        nz = m > 0
        return float(np.count_nonzero(nz & (m < 2.0 ** -14)) / max(np.count_nonzero(nz), 1))
    if t not in _DIVISOR:
        return 0.0
    bs = 256 if t in SHAPE_FALLBACK else 32
    amax = np.abs(a.reshape(-1, bs)).max(axis=1)
    nz = amax > 0
    return float(np.count_nonzero(nz & (amax / _DIVISOR[t] < TINY_SCALE)) / max(np.count_nonzero(nz), 1))


def safer_type(t: GGMLType) -> GGMLType:
    """Where a tensor goes when `t`'s fp16 scales underflow: Q8_0's scale spans 127 steps, not ~1000–4000
    (so it holds ~8–30x smaller weights), and BF16 has float32's exponent range."""
    return T.Q8_0 if t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K) else T.BF16
