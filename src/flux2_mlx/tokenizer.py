"""Prompt templates and 512-token padded tokenization for the FLUX.2 text encoders.

Uses only the `tokenizers` package on the encoder's `tokenizer.json`; transformers is a test-time reference.
Templates, padding sides and truncation: docs/architecture.md, 'Text encoders'.
"""

from __future__ import annotations

import warnings

import numpy as np
from tokenizers import Tokenizer

from .config import TEXT_TOKENS, TextEncoderConfig

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

    def __init__(self, path: str | Tokenizer, kind: str, max_length: int = TEXT_TOKENS, where=None):
        """path: a tokenizer.json, or an already built `tokenizers.Tokenizer` (e.g. from a GGUF, whose
        file `where` names in errors)."""
        from .weights import WeightsError

        if kind not in _PADDING:
            raise ValueError(f"unknown text encoder kind {kind!r}; expected one of {sorted(_PADDING)}")
        self.kind = kind
        self.max_length = max_length
        where = where or path
        if isinstance(path, Tokenizer):
            self.tokenizer = path
        else:
            try:
                self.tokenizer = Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises bare Exceptions for files it cannot parse
                raise WeightsError(f"{path}: not a tokenizer.json that the tokenizers library reads ({e}); "
                                   f"download it again") from None
        pad_token, self.padding_side = _PADDING[kind]
        self.pad_id = self.tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise WeightsError(f"{where}: pad token {pad_token!r} is not in the vocabulary; "
                               f"is this the {kind} tokenizer?")

    @classmethod
    def from_config(cls, path: str | Tokenizer, cfg: TextEncoderConfig, where=None) -> PromptTokenizer:
        return cls(path, cfg.kind, cfg.max_length, where)

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


# GGUF `tokenizer.ggml.pre` → (split regex or None for GPT-2's own ByteLevel regex, BPE ignore_merges), as
# llama.cpp's llama-vocab.cpp pre-tokenizes; the regexes are the ones in the models' tokenizer.json files.
_GGUF_PRE = {
    "default": (None, False),
    "gpt2": (None, False),
    "qwen2": ((r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+"), False),
    "tekken": ((r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"), True),
}
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType


def tokenizer_from_gguf(path) -> Tokenizer:
    """A `tokenizers.Tokenizer` rebuilt from a GGUF's byte-level BPE metadata (`tokenizer.ggml.model` "gpt2":
    tokens, merges, token types, `tokenizer.ggml.pre` in gpt2 / qwen2 / tekken), for GGUF-only encoders."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    from .weights import GGUFFile, WeightsError

    f = GGUFFile(path)
    kind, pre = f.field("tokenizer.ggml.model", kind=str), f.field("tokenizer.ggml.pre", "default", kind=str)
    if kind != "gpt2":
        raise WeightsError(f"{path}: tokenizer model {kind!r} is not a byte-level BPE ('gpt2'); pass the "
                           f"model's tokenizer.json instead")
    if pre not in _GGUF_PRE:
        raise WeightsError(f"{path}: pre-tokenizer {pre!r} is not one flux2-mlx knows "
                           f"({', '.join(_GGUF_PRE)}); pass the model's tokenizer.json instead")
    tokens = f.field("tokenizer.ggml.tokens", [], kind=(list, str))
    merges = f.field("tokenizer.ggml.merges", [], kind=(list, str))
    types = f.field("tokenizer.ggml.token_type", kind=(list, int)) or [1] * len(tokens)
    bad = next((m for m in merges if len(m.split(" ")) != 2), None)
    if not tokens or len(types) != len(tokens) or bad is not None:
        what = (f"merge {bad!r} is not two tokens" if bad is not None else
                f"{len(tokens)} tokens with {len(types)} token types")
        raise WeightsError(f"{path}: the tokenizer metadata is damaged ({what}); "
                           "pass the model's tokenizer.json")
    regex, ignore_merges = _GGUF_PRE[pre]
    try:
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                                   [tuple(m.split(" ")) for m in merges], ignore_merges=ignore_merges))
    except Exception as e:  # tokenizers raises bare Exceptions (a merge of tokens not in the vocabulary)
        raise WeightsError(f"{path}: the tokenizer metadata is damaged ({e}); pass the model's "
                           f"tokenizer.json") from None
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # ids stay: every added token is already in the vocabulary
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == _CONTROL])
    tok.add_tokens([AddedToken(tokens[i], normalized=False)
                    for i, t in enumerate(types) if t == _USER_DEFINED])
    return tok
