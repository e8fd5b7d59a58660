"""The MLX text encoders equal transformers' Qwen3 / Mistral3 hidden states on identical weights (float32)."""

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import ShapeSource, rel_err
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from flux2_mlx.config import MISTRAL_SMALL_3_2, QWEN3_4B, QWEN3_8B, text_encoder_shapes, tiny_spec
from flux2_mlx.encoder_names import text_encoder_entries
from flux2_mlx.entries import check_keys
from flux2_mlx.mlx_backend import load_text_encoder
from flux2_mlx.weights import WeightsError, WeightSource, save_safetensors

L = 512  # FLUX.2's real context length; the tiny models take a few seconds at it
LENGTHS = (37, 300)  # real tokens per prompt
SHORT, SHORT_LENGTHS = 64, (37, 64)  # Reference.short: where the weights' layout is what is checked
PAD = {"qwen3": 255, "mistral": 11}


def _text_config(te, layers):
    return dict(vocab_size=te.vocab_size, hidden_size=te.hidden_size, intermediate_size=te.intermediate_size,
                num_hidden_layers=layers, num_attention_heads=te.num_attention_heads,
                num_key_value_heads=te.num_key_value_heads, head_dim=te.head_dim,
                rms_norm_eps=te.rms_norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": te.rope_theta})


def hf_model(te, layers, tiny_vision=True):
    """transformers' Qwen3ForCausalLM or Mistral3ForConditionalGeneration for this encoder config."""
    if te.kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**_text_config(te, layers), tie_word_embeddings=True))
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, head_dim=8, image_size=28, patch_size=14)
    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=MistralConfig(**_text_config(te, layers), sliding_window=None),
        vision_config=vision if tiny_vision else PixtralVisionConfig()))


def _randomize(model, seed):
    """O(1) activations and non-trivial norms (HF's 0.02-std init would make attention near-uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def _inputs(kind, vocab, seed=0, length=L, lengths=LENGTHS):
    """Qwen3 pads on the right, Mistral on the left, as the reference's HF tokenizers do."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (len(lengths), length))
    mask = np.zeros((len(lengths), length), np.int64)
    for b, n in enumerate(lengths):
        real = slice(0, n) if kind == "qwen3" else slice(length - n, length)
        mask[b, real] = 1
        ids[b][mask[b] == 0] = PAD[kind]
    return ids, mask


class Reference:
    """A tiny random HF encoder saved with save_pretrained, and its concatenated hidden states."""

    def __init__(self, kind, root):
        self.kind = kind
        self.te = tiny_spec("klein-4b" if kind == "qwen3" else "dev").text_encoder
        # One layer past the deepest output, else transformers' hidden_states[-1] is the final-normed one.
        self.model = _randomize(hf_model(self.te, max(self.te.output_layers) + 1), seed=0).eval()
        self.model.set_attn_implementation("sdpa")
        self.dir = root / kind
        self.model.save_pretrained(self.dir)
        self.ids, self.mask = _inputs(kind, self.te.vocab_size)
        self.expected = self._hidden_states(self.ids, self.mask)
        self._mlx = self._short = None

    def _hidden_states(self, ids, mask) -> np.ndarray:
        with torch.no_grad():
            hs = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                            output_hidden_states=True).hidden_states
        return torch.cat([hs[k] for k in self.te.output_layers], dim=-1).numpy()

    @property
    def short(self) -> "Reference":
        """The same encoder and folder on SHORT tokens (prompts of SHORT_LENGTHS, padded as above)."""
        if self._short is None:
            short = copy.copy(self)
            short.ids, short.mask = _inputs(self.kind, self.te.vocab_size, length=SHORT,
                                            lengths=SHORT_LENGTHS)
            short.expected = self._hidden_states(short.ids, short.mask)
            short._mlx = short._short = None
            self._short = short
        return self._short

    @property
    def mlx(self) -> np.ndarray:
        """The MLX encoder's float32 output from the saved folder, computed once (three tests compare it)."""
        if self._mlx is None:
            self._mlx = _ours(self, self.dir)
        return self._mlx


@pytest.fixture(scope="module")
def refs(te_references):
    return te_references


def _ours(ref, path, dtype=mx.float32):
    model = load_text_encoder(ref.te, WeightSource(path), dtype=dtype)
    return np.array(model(mx.array(ref.ids), mx.array(ref.mask)).astype(mx.float32))


def _assert_close(ours, ref, tol=1e-5):
    assert np.isfinite(ours).all()
    real = ref.mask.astype(bool)
    assert ours.shape == ref.expected.shape == (*ref.ids.shape, 3 * ref.te.hidden_size)
    assert rel_err(ours[real], ref.expected[real]) <= tol
    assert rel_err(ours[~real], ref.expected[~real]) <= tol


@pytest.mark.parametrize("kind", ["qwen3", "mistral"])
def test_matches_transformers_from_save_pretrained(refs, kind):
    ref = refs(kind)
    _assert_close(ref.mlx, ref)


def test_save_pretrained_writes_the_legacy_mistral3_layout(refs):
    """transformers 5.23 keeps `model.language_model.` in memory but saves `language_model.model.`."""
    keys = WeightSource(refs("mistral").dir).keys()
    assert "language_model.model.embed_tokens.weight" in keys
    assert any(k.startswith("vision_tower.") for k in keys)


@pytest.mark.parametrize("layout", ["model.language_model.", "comfyui"])
def test_other_mistral3_layouts(refs, layout, tmp_path):
    ref = refs("mistral").short  # 64 tokens: only which weight lands where differs from the test above
    sd = {k: v.numpy() for k, v in ref.model.state_dict().items()}  # `model.language_model.…` names
    if layout == "comfyui":  # bare `model.` prefix, pruned to the layers FLUX.2 uses, no vision tower
        bare = {"model." + k.removeprefix("model.language_model."): v for k, v in sd.items()}
        sd = {k: v for k, v in bare.items() if k in text_encoder_shapes(ref.te)}
    save_safetensors(tmp_path / "te.safetensors", sd)
    _assert_close(_ours(ref, tmp_path / "te.safetensors"), ref)


def test_left_pad_rows_follow_the_zero_convention(refs):
    """Fully-masked pad queries get zero attention output, so each pad row is the pad embedding through
    the MLPs alone (computed here without attention, independent of any SDPA kernel). torch 2.13's CPU
    SDPA agrees (test above); transformers' eager path instead averages over all keys."""
    ref = refs("mistral")
    lm = ref.model.model.language_model
    x = lm.embed_tokens.weight[PAD["mistral"]]
    slots = []
    with torch.no_grad():
        for n, layer in enumerate(lm.layers[: max(ref.te.output_layers)], start=1):
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if n in ref.te.output_layers:
                slots.append(x)
    expected = torch.cat(slots).numpy()
    ours = ref.mlx
    pads = ours[ref.mask == 0]
    assert rel_err(pads, np.broadcast_to(expected, pads.shape)) <= 1e-5


def test_bfloat16_weights_run_without_nan(refs):
    """On the short prompts: the left padding (27 of 64 tokens, the rows that could turn NaN) is there as at
    512, and MLX's CPU bf16 matmul is 8x slower for the 448 more."""
    ref = refs("mistral").short
    ours = _ours(ref, ref.dir, dtype=mx.bfloat16)
    assert np.isfinite(ours).all()
    assert rel_err(ours, ref.expected) <= 3e-2


def test_missing_layer_tensor_is_named(refs, tmp_path):
    ref = refs("qwen3")
    source = WeightSource(ref.dir)
    gone = "model.layers.4.self_attn.k_norm.weight"
    save_safetensors(tmp_path / "te.safetensors", {k: source.get(k) for k in source.keys() if k != gone})
    with pytest.raises(WeightsError, match=gone):
        load_text_encoder(ref.te, WeightSource(tmp_path / "te.safetensors"), dtype=mx.float32)


@pytest.mark.parametrize("key", ["double_blocks.0.img_attn.qkv.weight",
                                 "model.diffusion_model.single_blocks.0.linear1.weight",
                                 "decoder.conv_in.weight"])
def test_refuses_transformer_and_vae_files(tmp_path, key):
    save_safetensors(tmp_path / "x.safetensors", {key: np.zeros((2, 2), np.float32)})
    with pytest.raises(WeightsError, match="not a text encoder"):
        load_text_encoder(tiny_spec("dev").text_encoder, WeightSource(tmp_path / "x.safetensors"),
                          dtype=mx.float32)


@pytest.mark.parametrize("te", [MISTRAL_SMALL_3_2, QWEN3_4B, QWEN3_8B], ids=lambda te: te.repo_id)
def test_full_size_hf_state_dict_maps_to_the_needed_tensors(te):
    with torch.device("meta"):
        model = hf_model(te, te.num_hidden_layers, tiny_vision=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(text_encoder_entries(ShapeSource(shapes), te), text_encoder_shapes(te), te.repo_id)


def test_wrong_size_names_the_matching_encoder():
    entries = text_encoder_entries(ShapeSource(text_encoder_shapes(QWEN3_8B)), QWEN3_8B)
    with pytest.raises(WeightsError, match="shapes of Qwen/Qwen3-8B"):
        load_text_encoder(QWEN3_4B, entries, dtype=mx.float32)
