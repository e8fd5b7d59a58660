"""What kind of checkpoint a file is, told from its tensor names alone: the one place that tells a FLUX.2
transformer, an autoencoder, a text encoder (and its family) and a FLUX.1 checkpoint apart. Numpy only.
"""

from __future__ import annotations

from .config import MISTRAL_SMALL_3_2, QWEN3_4B, TextEncoderConfig
from .weights import WeightsError

# Pieces of names that only that kind of file has, under whatever wrapper prefix the file uses.
_FLUX1 = ("vector_in.", "img_mod.lin", "time_text_embed.", ".norm1.linear.", "norm1_context.")
_DIT = ("double_blocks.", "single_blocks.", "transformer_blocks.", "x_embedder.", "img_in.")
_TEXT_ENDINGS = ("embed_tokens.weight", "token_embd.weight")
_VAE_ENDINGS = ("encoder.conv_in.weight", "decoder.conv_in.weight")
_VAE_STARTS = ("encoder.", "decoder.")
_QWEN_ENDINGS = ("self_attn.q_norm.weight", "attn_q_norm.weight")  # HF and llama.cpp names; Mistral has none
_WHAT = {"transformer": ("a transformer", "the transformer"), "vae": ("an autoencoder", "the VAE"),
         "text_encoder": ("a text encoder", "the text encoder")}


def file_kind(keys) -> str:
    """"flux1", "transformer", "text_encoder" or "vae", tried in that order (a FLUX.1 transformer has double
    blocks too); "" when the names say none of them, and the reader's own checks name what is missing."""
    if any(m in k for k in keys for m in _FLUX1):
        return "flux1"
    if any(m in k for k in keys for m in _DIT):
        return "transformer"
    if any(k.endswith(_TEXT_ENDINGS) for k in keys):
        return "text_encoder"
    if any(k.endswith(_VAE_ENDINGS) or k.startswith(_VAE_STARTS) for k in keys):
        return "vae"
    return ""


def refuse_other_kind(path, keys, want: str) -> None:
    """WeightsError when the names say the file is not a `want` ("transformer", "vae" or "text_encoder")."""
    kind = file_kind(keys)
    if kind == "flux1":
        raise WeightsError(f"{path} is a FLUX.1 checkpoint; flux2-mlx runs FLUX.2 only "
                           f"(get the FLUX.2 weights, e.g. black-forest-labs/FLUX.2-klein-4B)")
    if kind and kind != want:
        raise WeightsError(f"{path} holds {_WHAT[kind][0]}, not {_WHAT[want][0]}; "
                           f"pass it as {_WHAT[kind][1]}")


def encoder_base(keys) -> TextEncoderConfig:
    """The registered encoder whose family a text-encoder checkpoint is (Qwen3 has Q/K norms, Mistral none):
    the config its own config.json or GGUF metadata is read over."""
    return QWEN3_4B if any(k.endswith(_QWEN_ENDINGS) for k in keys) else MISTRAL_SMALL_3_2
