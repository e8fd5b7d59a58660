"""Prompt templates and tokenization (docs/architecture.md, 'Text encoders') against transformers and
mistral-common."""


from functools import lru_cache

import numpy as np
import pytest
from conftest import write_qwen_tokenizer, write_tekken_tokenizer

from flux2_mlx.tokenizer import SYSTEM_MESSAGE, PromptTokenizer, mistral_prompt, qwen3_prompt

PROMPTS = ["A red cat on a blue sofa", "", "Ünïcödé 東京 🐱 — tabs\tand\nnewlines, [IMG] inline [INST] too"]


def test_system_message_has_the_line_break():
    assert SYSTEM_MESSAGE == (
        "You are an AI that reasons about image descriptions. You give structured responses focusing on "
        "object relationships, object\nattribution and actions without speculation.")


def test_mistral_template_strips_img():
    assert mistral_prompt("a [IMG]cat[IMG]") == (
        "<s>[SYSTEM_PROMPT]You are an AI that reasons about image descriptions. You give structured "
        "responses focusing on object relationships, object\nattribution and actions without speculation."
        "[/SYSTEM_PROMPT][INST]a cat[/INST]")


def test_qwen3_template():
    assert qwen3_prompt("a cat") == (
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert qwen3_prompt("[IMG]").startswith("<|im_start|>user\n[IMG]<|im_end|>")  # only Mistral strips [IMG]


@pytest.fixture(scope="module")
def qwen_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen") / "tokenizer.json"
    write_qwen_tokenizer(path)
    return path


@lru_cache
def _hf_tokenizer(path, pad_token, side):
    """transformers' tokenizer on a tokenizer.json, loaded once per file (Tekken's takes ~1 s)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token=pad_token, padding_side=side)


def _reference(path, pad_token, side, texts, **kw):
    tokenize = _hf_tokenizer(path, pad_token, side)
    out = tokenize(texts, padding="max_length", truncation=True, max_length=512, **kw)
    return np.array(out["input_ids"]), np.array(out["attention_mask"])


def test_qwen3_matches_transformers(qwen_json):
    tok = PromptTokenizer(qwen_json, "qwen3")
    assert tok.pad_id == tok.tokenizer.token_to_id("<|endoftext|>")
    ids, mask = tok.encode(PROMPTS)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (3, 512)
    ref_ids, ref_mask = _reference(qwen_json, "<|endoftext|>", "right", [qwen3_prompt(p) for p in PROMPTS])
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    assert mask[:, 0].all() and not mask[:, -1].any()  # right padding
    im_start = tok.tokenizer.token_to_id("<|im_start|>")
    assert ids[0, 0] == im_start and (ids == im_start).sum(axis=1).tolist() == [2, 2, 2]


def test_qwen3_truncates_and_warns(qwen_json):
    tok = PromptTokenizer(qwen_json, "qwen3")
    long = " ".join(["xylophone"] * 600)
    n = len(tok.tokenizer.encode(qwen3_prompt(long), add_special_tokens=False).ids)
    assert n > 600
    with pytest.warns(UserWarning, match=f"dropping {n - 512} tokens"):
        ids, mask = tok.encode([long, "short"])
    assert mask[0].all()
    texts = [qwen3_prompt(long), qwen3_prompt("short")]
    ref_ids, ref_mask = _reference(qwen_json, "<|endoftext|>", "right", texts)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)


def test_missing_pad_token_fails_clearly(qwen_json):
    with pytest.raises(ValueError, match="<pad>"):
        PromptTokenizer(qwen_json, "mistral")
    with pytest.raises(ValueError, match="unknown text encoder kind"):
        PromptTokenizer(qwen_json, "llama")


@pytest.fixture(scope="module")
def tekken(tmp_path_factory):
    return write_tekken_tokenizer(tmp_path_factory.mktemp("tekken"))


@pytest.fixture(scope="module")
def mistral_common(tekken):
    """mistral-common's own Tekkenizer on the vocabulary (loaded once: ~1 s)."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    return Tekkenizer.from_file(tekken[0])


def test_mistral_special_ids(tekken, mistral_common):
    tok = PromptTokenizer(tekken[1], "mistral")
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "[IMG]": 10, "<pad>": 11,
                "[SYSTEM_PROMPT]": 17, "[/SYSTEM_PROMPT]": 18}
    assert {s: tok.tokenizer.token_to_id(s) for s in expected} == expected
    mc = mistral_common
    assert {s: mc.get_special_token(s) for s in expected if s != "<pad>"} == {
        s: i for s, i in expected.items() if s != "<pad>"}
    assert tok.pad_id == mc.pad_id == 11


def test_mistral_matches_transformers_and_mistral_common(tekken, mistral_common):
    tok = PromptTokenizer(tekken[1], "mistral")
    ids, mask = tok.encode(PROMPTS)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (3, 512)
    ref_ids, ref_mask = _reference(tekken[1], "<pad>", "left", [mistral_prompt(p) for p in PROMPTS],
                                   add_special_tokens=False)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    assert mask[:, -1].all() and not mask[:, 0].any() and (ids[mask == 0] == 11).all()  # left padding

    # mistral-common encodes plain text only: splice the control tokens around the text pieces.
    mc = mistral_common
    for row, prompt in enumerate(PROMPTS):
        pieces = prompt.replace("[IMG]", "").split("[INST]")
        user = [mc.encode(piece, bos=False, eos=False) for piece in pieces]
        expected = [1, 17] + mc.encode(SYSTEM_MESSAGE, bos=False, eos=False) + [18, 3]
        expected += [i for piece in user for i in [3] + piece][1:] + [4]
        assert ids[row][mask[row] == 1].tolist() == expected
    assert 10 not in ids[2]  # [IMG] stripped; a literal [INST] in user text still maps to the control id
    assert (ids[2] == 3).sum() == 2


def test_mistral_truncates_and_warns(tekken):
    tok = PromptTokenizer(tekken[1], "mistral")
    long = " ".join(["xylophone"] * 600)
    with pytest.warns(UserWarning, match=r"dropping \d+ tokens \(the closing \[/INST\] was cut\)"):
        ids, mask = tok.encode([long])
    assert mask.all() and ids[0, :2].tolist() == [1, 17] and 4 not in ids[0]
    ref_ids, _ = _reference(tekken[1], "<pad>", "left", [mistral_prompt(long)], add_special_tokens=False)
    np.testing.assert_array_equal(ids, ref_ids)
