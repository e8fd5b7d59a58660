"""Model registry and frozen configs for the FLUX.2 family; expected tensor names and shapes.

Stdlib only: every other module (numpy core and backends) may import this one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerConfig:
    """BFL `Flux2Params` fields (flux2 src/flux2/model.py)."""

    in_channels: int = 128
    context_in_dim: int = 15360
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8
    depth_single_blocks: int = 48
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000
    use_guidance_embed: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class VAEConfig:
    """BFL `AutoEncoderParams`; `norm_groups` is 32 in every release, smaller only in tiny test models."""

    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32
    bn_eps: float = 1e-4


TEXT_TOKENS = 512  # every prompt is padded or truncated to this many tokens


@dataclass(frozen=True)
class TextEncoderConfig:
    """HF `config.json` names for the decoder-only encoders (Mistral-Small-3.2 text stack, Qwen3)."""

    kind: str  # "mistral" | "qwen3"
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    output_layers: tuple[int, ...]
    repo_id: str
    max_length: int = TEXT_TOKENS


@dataclass(frozen=True)
class ModelSpec:
    name: str
    transformer: TransformerConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    guidance_mode: str  # "embedded" (dev) | "none" (distilled klein) | "cfg" (klein base)
    default_steps: int
    default_guidance: float
    repo_id: str
    transformer_file: str  # BFL single file at the repo root
    vae_repo_id: str = "black-forest-labs/FLUX.2-dev"
    vae_file: str = "ae.safetensors"
    kv_cache: bool = False

    @property
    def latent_channels(self) -> int:
        return self.transformer.in_channels


DEV = TransformerConfig()
KLEIN_4B = TransformerConfig(
    context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20,
    use_guidance_embed=False,
)
KLEIN_9B = TransformerConfig(
    context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
    use_guidance_embed=False,
)

MISTRAL_SMALL_3_2 = TextEncoderConfig(
    kind="mistral", hidden_size=5120, num_hidden_layers=40, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, intermediate_size=32768, rms_norm_eps=1e-5,
    rope_theta=1e9, vocab_size=131072, output_layers=(10, 20, 30),
    repo_id="mistralai/Mistral-Small-3.2-24B-Instruct-2506",
)
QWEN3_4B = TextEncoderConfig(
    kind="qwen3", hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, intermediate_size=9728, rms_norm_eps=1e-6,
    rope_theta=1e6, vocab_size=151936, output_layers=(9, 18, 27), repo_id="Qwen/Qwen3-4B",
)
QWEN3_8B = dataclasses.replace(
    QWEN3_4B, hidden_size=4096, intermediate_size=12288, repo_id="Qwen/Qwen3-8B"
)

_VAE = VAEConfig()


def _klein(name, cfg, encoder, *, base=False, kv=False, repo, file):
    return ModelSpec(
        name=name, transformer=cfg, vae=_VAE, text_encoder=encoder,
        guidance_mode="cfg" if base else "none",
        default_steps=50 if base else 4, default_guidance=4.0 if base else 1.0,
        repo_id=repo, transformer_file=file, kv_cache=kv,
    )


DEFAULT_STRENGTH = 0.6  # image-to-image: the share of the schedule run from the start image


def default_strength(outpainting: bool = False) -> float:
    """The strength when none is given: all of the schedule for an outpainting, whose new borders hold
    nothing worth starting from."""
    return 1.0 if outpainting else DEFAULT_STRENGTH

# Repo ids, file names and defaults: flux2 src/flux2/util.py FLUX2_MODEL_INFO @50fe516.
MODELS: dict[str, ModelSpec] = {
    "dev": ModelSpec(
        name="dev", transformer=DEV, vae=_VAE, text_encoder=MISTRAL_SMALL_3_2,
        guidance_mode="embedded", default_steps=50, default_guidance=4.0,
        repo_id="black-forest-labs/FLUX.2-dev", transformer_file="flux2-dev.safetensors",
    ),
    "klein-4b": _klein("klein-4b", KLEIN_4B, QWEN3_4B, repo="black-forest-labs/FLUX.2-klein-4B",
                       file="flux-2-klein-4b.safetensors"),
    "klein-9b": _klein("klein-9b", KLEIN_9B, QWEN3_8B, repo="black-forest-labs/FLUX.2-klein-9B",
                       file="flux-2-klein-9b.safetensors"),
    "klein-9b-kv": _klein("klein-9b-kv", KLEIN_9B, QWEN3_8B, kv=True,
                          repo="black-forest-labs/FLUX.2-klein-9B-kv",
                          file="flux-2-klein-9b-kv.safetensors"),
    "klein-base-4b": _klein("klein-base-4b", KLEIN_4B, QWEN3_4B, base=True,
                            repo="black-forest-labs/FLUX.2-klein-base-4B",
                            file="flux-2-klein-base-4b.safetensors"),
    "klein-base-9b": _klein("klein-base-9b", KLEIN_9B, QWEN3_8B, base=True,
                            repo="black-forest-labs/FLUX.2-klein-base-9B",
                            file="flux-2-klein-base-9b.safetensors"),
}


def get_spec(model: str | ModelSpec) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[model]


def tiny_spec(name: str = "klein-4b") -> ModelSpec:
    """The structure of `name` at toy size (2 heads of 128, depth 2+2, small VAE) for tests."""
    spec = get_spec(name)
    t = dataclasses.replace(
        spec.transformer, context_in_dim=3 * 32, hidden_size=256, num_heads=2, depth=2,
        depth_single_blocks=2,
    )
    vae = dataclasses.replace(spec.vae, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)
    te = dataclasses.replace(
        spec.text_encoder, hidden_size=32, num_hidden_layers=max(spec.text_encoder.output_layers),
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        vocab_size=512,
    )
    return dataclasses.replace(spec, name=f"tiny-{name}", transformer=t, vae=vae, text_encoder=te)


def transformer_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a BFL FLUX.2 DiT checkpoint (BFL's model.py module names, no biases) and its shape."""
    H, M, C, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.in_channels, cfg.head_dim
    s = {
        "img_in.weight": (H, C),
        "txt_in.weight": (H, cfg.context_in_dim),
        "time_in.in_layer.weight": (H, 256),
        "time_in.out_layer.weight": (H, H),
        "double_stream_modulation_img.lin.weight": (6 * H, H),
        "double_stream_modulation_txt.lin.weight": (6 * H, H),
        "single_stream_modulation.lin.weight": (3 * H, H),
        "final_layer.adaLN_modulation.1.weight": (2 * H, H),
        "final_layer.linear.weight": (C, H),
    }
    if cfg.use_guidance_embed:
        s["guidance_in.in_layer.weight"] = (H, 256)
        s["guidance_in.out_layer.weight"] = (H, H)
    for i in range(cfg.depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            s[f"{p}_attn.qkv.weight"] = (3 * H, H)
            s[f"{p}_attn.norm.query_norm.scale"] = (hd,)
            s[f"{p}_attn.norm.key_norm.scale"] = (hd,)
            s[f"{p}_attn.proj.weight"] = (H, H)
            s[f"{p}_mlp.0.weight"] = (2 * M, H)
            s[f"{p}_mlp.2.weight"] = (H, M)
    for i in range(cfg.depth_single_blocks):
        p = f"single_blocks.{i}"
        s[f"{p}.linear1.weight"] = (3 * H + 2 * M, H)
        s[f"{p}.linear2.weight"] = (H, H + M)
        s[f"{p}.norm.query_norm.scale"] = (hd,)
        s[f"{p}.norm.key_norm.scale"] = (hd,)
    return s


def _resnet(s, p, cin, cout):
    s[f"{p}.norm1.weight"] = s[f"{p}.norm1.bias"] = (cin,)
    s[f"{p}.conv1.weight"], s[f"{p}.conv1.bias"] = (cout, cin, 3, 3), (cout,)
    s[f"{p}.norm2.weight"] = s[f"{p}.norm2.bias"] = (cout,)
    s[f"{p}.conv2.weight"], s[f"{p}.conv2.bias"] = (cout, cout, 3, 3), (cout,)
    if cin != cout:
        s[f"{p}.nin_shortcut.weight"], s[f"{p}.nin_shortcut.bias"] = (cout, cin, 1, 1), (cout,)


def _mid(s, p, c):
    _resnet(s, f"{p}.block_1", c, c)
    s[f"{p}.attn_1.norm.weight"] = s[f"{p}.attn_1.norm.bias"] = (c,)
    for n in ("q", "k", "v", "proj_out"):
        s[f"{p}.attn_1.{n}.weight"], s[f"{p}.attn_1.{n}.bias"] = (c, c, 1, 1), (c,)
    _resnet(s, f"{p}.block_2", c, c)


def vae_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a BFL `ae.safetensors` (BFL's autoencoder.py module names) and its shape."""
    s: dict[str, tuple[int, ...]] = {}
    chans = [cfg.ch * m for m in cfg.ch_mult]
    z, top = cfg.z_channels, chans[-1]
    s["encoder.conv_in.weight"], s["encoder.conv_in.bias"] = (cfg.ch, cfg.in_channels, 3, 3), (cfg.ch,)
    cin = cfg.ch
    for lvl, cout in enumerate(chans):
        for b in range(cfg.num_res_blocks):
            _resnet(s, f"encoder.down.{lvl}.block.{b}", cin, cout)
            cin = cout
        if lvl != len(chans) - 1:
            p = f"encoder.down.{lvl}.downsample.conv"
            s[f"{p}.weight"], s[f"{p}.bias"] = (cout, cout, 3, 3), (cout,)
    _mid(s, "encoder.mid", top)
    s["encoder.norm_out.weight"] = s["encoder.norm_out.bias"] = (top,)
    s["encoder.conv_out.weight"], s["encoder.conv_out.bias"] = (2 * z, top, 3, 3), (2 * z,)
    s["encoder.quant_conv.weight"], s["encoder.quant_conv.bias"] = (2 * z, 2 * z, 1, 1), (2 * z,)

    s["decoder.post_quant_conv.weight"], s["decoder.post_quant_conv.bias"] = (z, z, 1, 1), (z,)
    s["decoder.conv_in.weight"], s["decoder.conv_in.bias"] = (top, z, 3, 3), (top,)
    _mid(s, "decoder.mid", top)
    cin = top
    for lvl in reversed(range(len(chans))):
        cout = chans[lvl]
        for b in range(cfg.num_res_blocks + 1):
            _resnet(s, f"decoder.up.{lvl}.block.{b}", cin, cout)
            cin = cout
        if lvl != 0:
            p = f"decoder.up.{lvl}.upsample.conv"
            s[f"{p}.weight"], s[f"{p}.bias"] = (cout, cout, 3, 3), (cout,)
    s["decoder.norm_out.weight"] = s["decoder.norm_out.bias"] = (cfg.ch,)
    s["decoder.conv_out.weight"], s["decoder.conv_out.bias"] = (cfg.out_ch, cfg.ch, 3, 3), (cfg.out_ch,)
    s["bn.running_mean"] = s["bn.running_var"] = (4 * z,)
    return s


def text_encoder_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """HF-named tensors the encoder needs: embeddings and decoder layers 0..max(output_layers)-1.

    hidden_states[k] is the output of decoder layer k (1-based), so deeper layers, the final norm
    and the LM head are never used (docs/architecture.md, 'Text encoders').
    """
    D, hd, mlp = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, D)}
    for n in range(max(cfg.output_layers)):
        p = f"model.layers.{n}"
        s[f"{p}.input_layernorm.weight"] = (D,)
        s[f"{p}.post_attention_layernorm.weight"] = (D,)
        s[f"{p}.self_attn.q_proj.weight"] = (q, D)
        s[f"{p}.self_attn.k_proj.weight"] = (kv, D)
        s[f"{p}.self_attn.v_proj.weight"] = (kv, D)
        s[f"{p}.self_attn.o_proj.weight"] = (D, q)
        if cfg.kind == "qwen3":
            s[f"{p}.self_attn.q_norm.weight"] = (hd,)
            s[f"{p}.self_attn.k_norm.weight"] = (hd,)
        s[f"{p}.mlp.gate_proj.weight"] = (mlp, D)
        s[f"{p}.mlp.up_proj.weight"] = (mlp, D)
        s[f"{p}.mlp.down_proj.weight"] = (D, mlp)
    return s


def transformer_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> TransformerConfig:
    """The DiT config a set of canonical tensor shapes describes (every field but RoPE is in them).
    KeyError when a tensor it reads is absent; ValueError naming the tensor when a shape cannot be
    FLUX.2's."""
    rank = {"img_in.weight": 2, "txt_in.weight": 2, "single_blocks.0.linear2.weight": 2,
            "double_blocks.0.img_attn.norm.query_norm.scale": 1}
    for name, n in rank.items():
        shape = shapes[name]
        if len(shape) != n or not all(d > 0 for d in shape):
            raise ValueError(f"tensor {name} has shape {list(shape)}; FLUX.2 stores it with {n} non-zero "
                             f"dims")
    H, C = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    M = shapes["single_blocks.0.linear2.weight"][1] - H
    rope = sum(TransformerConfig.axes_dim)
    if head_dim != rope or H % head_dim:
        raise ValueError(f"tensor double_blocks.0.img_attn.norm.query_norm.scale says heads of {head_dim}; "
                         f"FLUX.2 has heads of {rope} (its RoPE axes) and a hidden size that is a multiple "
                         f"of it (here {H})")
    if M <= 0:
        raise ValueError(f"tensor single_blocks.0.linear2.weight has {M + H} inputs, no more than the hidden "
                         f"size {H}")
    count = lambda prefix: len({k.split(".")[1] for k in shapes if k.startswith(prefix)})  # noqa: E731
    return dataclasses.replace(
        TransformerConfig(), in_channels=C, context_in_dim=shapes["txt_in.weight"][1], hidden_size=H,
        num_heads=H // head_dim, depth=count("double_blocks."), depth_single_blocks=count("single_blocks."),
        mlp_ratio=M / H, use_guidance_embed="guidance_in.in_layer.weight" in shapes)


def _checked(values: dict, floats: tuple[str, ...] = ()) -> dict:
    """Positive ints (finite positive numbers for `floats`): a config.json value of another type or sign
    would fail later, far from the file that holds it."""
    for k, v in values.items():
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (number and v > 0 and v < float("inf") and (k in floats or isinstance(v, int))):
            raise ValueError(f"{k} is {v!r}, not a positive {'number' if k in floats else 'integer'}")
    return values


def vae_config_from(diffusers_config: dict | None, base: VAEConfig) -> VAEConfig:
    """A diffusers vae/config.json's architecture; BFL's ae.safetensors has none, so `base` stands.
    ValueError naming the key when a value cannot be an architecture's."""
    if not diffusers_config:
        return base
    chans = diffusers_config.get("block_out_channels", [base.ch * m for m in base.ch_mult])
    if not isinstance(chans, list) or not chans:
        raise ValueError(f"block_out_channels is {chans!r}, not a list of channel counts")
    _checked({f"block_out_channels[{i}]": c for i, c in enumerate(chans)})
    if any(c % chans[0] for c in chans):
        raise ValueError(f"block_out_channels {chans} are not multiples of the first")
    keys = dict(num_res_blocks="layers_per_block", z_channels="latent_channels",
                norm_groups="norm_num_groups", bn_eps="batch_norm_eps")
    values = _checked({k: diffusers_config[v] for k, v in keys.items() if v in diffusers_config}, ("bn_eps",))
    return dataclasses.replace(base, ch=chans[0], ch_mult=tuple(c // chans[0] for c in chans), **values)


def text_encoder_config_from(hf_config: dict | None, base: TextEncoderConfig) -> TextEncoderConfig:
    """An HF config.json (Qwen3, or Mistral3's `text_config`) over `base`; unknown keys are ignored.
    ValueError naming the key when a value cannot be an architecture's."""
    if not hf_config:
        return base
    cfg = hf_config.get("text_config", hf_config)
    if not isinstance(cfg, dict):
        raise ValueError(f"text_config is {cfg!r}, not an object")
    rope = cfg.get("rope_parameters") or {}
    fields = {f.name for f in dataclasses.fields(TextEncoderConfig)} - {"kind", "output_layers", "repo_id"}
    values = {k: cfg[k] for k in fields if k in cfg and cfg[k] is not None}
    if isinstance(rope, dict) and "rope_theta" in rope:
        values.setdefault("rope_theta", rope["rope_theta"])
    _checked(values, ("rms_norm_eps", "rope_theta"))
    if "head_dim" not in values and "hidden_size" in values:
        heads = values.get("num_attention_heads", base.num_attention_heads)
        values["head_dim"] = values["hidden_size"] // heads
    out = dataclasses.replace(base, **values)
    if out.num_attention_heads % out.num_key_value_heads or not out.head_dim:
        raise ValueError(f"{out.num_attention_heads} attention heads cannot share {out.num_key_value_heads} "
                         f"key/value heads of {out.head_dim}")
    return out
