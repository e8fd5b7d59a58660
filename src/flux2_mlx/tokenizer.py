"""Prompt templates and 512-token padded tokenization for the FLUX.2 text encoders (architecture §3.2-3.4).

Uses only the `tokenizers` package on the encoder's `tokenizer.json`; transformers is a test-time reference.
"""

from __future__ import annotations

import warnings

import numpy as np
from tokenizers import Tokenizer

from .config import TextEncoderConfig

SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)

# kind -> (pad token, padding side)
_PADDING = {"mistral": ("<pad>", "left"), "qwen3": ("<|endoftext|>", "right")}


def mistral_prompt(prompt: str) -> str:
    """FLUX.2 [dev] chat string; the template carries BOS, and `[IMG]` is stripped from the user text."""
    prompt = prompt.replace("[IMG]", "")
    return f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{prompt}[/INST]"


def qwen3_prompt(prompt: str) -> str:
    """FLUX.2 [klein] chat string (generation prompt, thinking disabled, no system message)."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


_TEMPLATES = {"mistral": mistral_prompt, "qwen3": qwen3_prompt}


class PromptTokenizer:
    """Renders prompts with the encoder's chat template and tokenizes them to fixed-length id/mask arrays."""

    def __init__(self, path: str, kind: str, max_length: int = 512):
        if kind not in _PADDING:
            raise ValueError(f"unknown text encoder kind {kind!r}; expected one of {sorted(_PADDING)}")
        self.kind = kind
        self.max_length = max_length
        self.tokenizer = Tokenizer.from_file(str(path))
        pad_token, self.padding_side = _PADDING[kind]
        self.pad_id = self.tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"{path}: pad token {pad_token!r} is not in the vocabulary; "
                             f"is this the {kind} tokenizer.json?")

    @classmethod
    def from_config(cls, path: str, cfg: TextEncoderConfig) -> PromptTokenizer:
        return cls(path, cfg.kind, cfg.max_length)

    def render(self, prompt: str) -> str:
        return _TEMPLATES[self.kind](prompt)

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, mask)`, both int32 (B, max_length); mask is 1 on real tokens, 0 on pads."""
        if isinstance(prompts, str):
            prompts = [prompts]
        n = self.max_length
        ids = np.full((len(prompts), n), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(prompts), n), dtype=np.int32)
        for row, prompt in enumerate(prompts):
            tokens = self.tokenizer.encode(self.render(prompt), add_special_tokens=False).ids
            if len(tokens) > n:
                cut = " (the closing [/INST] was cut)" if self.kind == "mistral" else ""
                warnings.warn(f"prompt {row} is {len(tokens)} tokens; truncated to {n}, "
                              f"dropping {len(tokens) - n} tokens{cut}", stacklevel=2)
                tokens = tokens[:n]
            start = n - len(tokens) if self.padding_side == "left" else 0
            ids[row, start:start + len(tokens)] = tokens
            mask[row, start:start + len(tokens)] = 1
        return ids, mask
