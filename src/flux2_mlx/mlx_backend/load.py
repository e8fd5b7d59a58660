"""Build MLX modules from configs and fill them from canonical weight entries, strictly.

The only MLX file that touches weights (with stream.py later). Tensors are converted one at a
time, so no second full copy of a model is ever held in RAM.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from ..config import MODELS, TextEncoderConfig, TransformerConfig, VAEConfig, text_encoder_shapes, vae_shapes
from ..keymap import (Entry, check_keys, check_transformer, text_encoder_entries, transformer_entries,
                      vae_entries)
from ..weights import BF16, GGMLTensor, WeightSource
from .quant_layers import module_at, quantized_layer, replace_module
from .text_encoder import TextEncoder
from .transformer import Flux2
from .vae import AutoEncoder


def from_numpy(a: np.ndarray, dtype: mx.Dtype | None = None) -> mx.array:
    x = mx.array(a.view(np.uint16)).view(mx.bfloat16) if a.dtype == BF16 else mx.array(a)
    return x if dtype is None else x.astype(dtype)


def _assign(module, entries: dict[str, Entry], dtype: mx.Dtype):
    params = []
    for name, entry in entries.items():
        raw = entry.load()
        if isinstance(raw, GGMLTensor):  # quantized: the layer type follows the tensor's ggml type
            path = name.removesuffix(".weight")
            replace_module(module, path, quantized_layer(module_at(module, path), raw, dtype))
            continue
        a = from_numpy(raw, dtype)
        if a.ndim == 4:  # PyTorch conv [O, I, kh, kw] → MLX channels-last [O, kh, kw, I]
            a = a.transpose(0, 2, 3, 1)
        mx.eval(a)
        params.append((name, a))
    module.update(tree_unflatten(params))
    mx.eval(module.parameters())
    return module


def load_transformer(cfg: TransformerConfig, source: WeightSource | dict, *, dtype: mx.Dtype):
    entries = source if isinstance(source, dict) else transformer_entries(source)
    check_transformer(entries, cfg, getattr(source, "path", "weights"))
    return _assign(Flux2(cfg), entries, dtype)


def load_vae(cfg: VAEConfig, source: WeightSource | dict, *, dtype: mx.Dtype = mx.float32):
    entries = source if isinstance(source, dict) else vae_entries(source)
    check_keys(entries, vae_shapes(cfg), f"autoencoder {getattr(source, 'path', 'weights')}")
    return _assign(AutoEncoder(cfg), entries, dtype)


def load_text_encoder(cfg: TextEncoderConfig, source: WeightSource | dict, *, dtype: mx.Dtype):
    entries = source if isinstance(source, dict) else text_encoder_entries(source, cfg)
    shapes = {k: tuple(e.shape) for k, e in entries.items()}
    repo = next((s.text_encoder.repo_id for s in MODELS.values()
                 if s.text_encoder != cfg and text_encoder_shapes(s.text_encoder) == shapes), None)
    hint = f"These weights have the shapes of {repo}: choose a model that uses it." if repo else ""
    check_keys(entries, text_encoder_shapes(cfg), f"text encoder {getattr(source, 'path', 'weights')}", hint)
    return _assign(TextEncoder(cfg), entries, dtype)
