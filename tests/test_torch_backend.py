"""The PyTorch backend: the MLX backend's contract, diffusers' / transformers' numbers, MLX's numbers on the
same files, streamed == resident bit for bit (float32, tiny random models, on this machine's device)."""

import dataclasses
import inspect

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import denoise_phase, diffusers_vae, random_transformer, random_vae, rel_err, write_gguf
from mlx.utils import tree_flatten
from test_streaming import CFG as DEEP
from test_text_encoder_parity import _assert_close
from test_transformer_parity import _inputs, _reference, _refs
from test_vae_parity import ref_decode, ref_encode

import flux2_mlx.mlx_backend as mb
import flux2_mlx.torch_backend as tb
from flux2_mlx import memory
from flux2_mlx.config import tiny_spec, transformer_shapes
from flux2_mlx.entries import Entry
from flux2_mlx.sampling import prc_img, prc_txt
from flux2_mlx.weights import WeightSource, save_safetensors

CONTRACT = ["resolve_dtype", "load_transformer", "load_text_encoder", "load_vae", "from_numpy", "to_numpy",
            "evaluate", "free", "peak_memory", "device_memory", "use_device"]
F32 = torch.float32


def _entries(tensors: dict) -> dict[str, Entry]:
    return {k: Entry(a.shape, lambda a=a: a) for k, a in tensors.items()}


def _call(be, model, i, **kw):
    """One transformer forward on backend `be` from numpy inputs → numpy."""
    args = [be.from_numpy(i[k]) for k in ("x", "x_ids", "t", "ctx", "ctx_ids", "g")]
    kw = {k: be.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    return be.to_numpy(model(*args, **kw))


# ---- the contract ------------------------------------------------------------------------------------------

def test_same_names_and_signatures_as_mlx():
    for name in CONTRACT:
        assert callable(getattr(tb, name, None)), name
        if hasattr(mb, name):  # use_device arrives in the MLX backend separately
            assert inspect.signature(getattr(tb, name)) == inspect.signature(getattr(mb, name)), name
    assert str(inspect.signature(tb.use_device)) == "(name: 'str | None' = None) -> 'str'"


def test_device_choice_and_dtypes():
    assert tb.use_device("cpu") == "cpu"
    assert tb.resolve_dtype(None) == F32 and tb.resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        tb.resolve_dtype("fp8")
    for bad in ("tpu", "cuda:99", "cpu:1") + (() if torch.cuda.is_available() else ("cuda",)):
        with pytest.raises(ValueError, match=f"device '{bad}' is not available here; available: cpu"):
            tb.use_device(bad)
    mps = torch.backends.mps.is_available()
    assert tb.use_device() == ("cuda:0" if torch.cuda.is_available() else "mps" if mps else "cpu")
    mem = tb.device_memory()
    assert set(mem) == set(mb.device_memory()) and 0 < mem["limit"] <= mem["total"]
    assert tb.peak_memory() > 0
    x = tb.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3), torch.bfloat16)
    assert x.dtype == torch.bfloat16 and tb.to_numpy(x).dtype == np.float32


# ---- the transformer ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["dev", "klein-4b"])
@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_transformer_matches_diffusers_and_mlx(tiny_models, variant, layout):
    m = tiny_models(variant)
    cfg = m.spec.transformer
    path = m.bfl_dir / m.spec.transformer_file if layout == "bfl" else m.diffusers_dir / "transformer"
    ours = tb.load_transformer(cfg, WeightSource(path), dtype=F32)
    i = _inputs(cfg, L=128)
    got = _call(tb, ours, i)
    assert rel_err(got, _reference(m.ref_transformer, cfg, i)) <= 1e-5
    assert rel_err(got, _call(mb, mb.load_transformer(cfg, WeightSource(path), dtype=mx.float32), i)) <= 1e-5


def test_reference_tokens_match_diffusers(tiny_models):
    m = tiny_models("dev")
    cfg = m.spec.transformer
    ours = tb.load_transformer(cfg, WeightSource(m.bfl_dir / m.spec.transformer_file), dtype=F32)
    i = _inputs(cfg, L=64)
    ref, ref_ids = _refs(cfg, [(2, 4), (5, 3)])
    got = _call(tb, ours, i, ref=ref, ref_ids=ref_ids)
    joint = dict(i, x=np.concatenate([i["x"], ref], 1), x_ids=np.concatenate([i["x_ids"], ref_ids], 1))
    want = _reference(m.ref_transformer, cfg, joint)[:, : i["x"].shape[1]]
    assert rel_err(got, want) <= 1e-5 and rel_err(got, _call(tb, ours, i)) > 1e-3


def test_kv_extract_and_cached_steps_match_mlx(tiny_models):
    m = tiny_models("klein-9b-kv")
    cfg = m.spec.transformer
    path = m.bfl_dir / m.spec.transformer_file
    models = {tb: tb.load_transformer(cfg, WeightSource(path), dtype=F32),
              mb: mb.load_transformer(cfg, WeightSource(path), dtype=mx.float32)}
    ref, ref_ids = _refs(cfg, [(4, 2), (3, 5)])
    caches = {tb: [], mb: []}
    for step, t in enumerate([0.9, 0.4]):
        i = dict(_inputs(cfg, L=64, seed=step), t=np.array([t], np.float32))
        kw = dict(ref=ref, ref_ids=ref_ids) if step == 0 else {}
        got, want = (_call(be, models[be], i, kv_cache=caches[be], **kw) for be in (tb, mb))
        assert rel_err(got, want) <= 1e-5
        assert len(caches[tb]) == cfg.depth + cfg.depth_single_blocks
    assert rel_err(tb.to_numpy(caches[tb][-1][1]), np.array(caches[mb][-1][1])) <= 1e-5


def test_bf16_transformer_tracks_float32(tiny_models):
    m = tiny_models("klein-4b")
    cfg, path = m.spec.transformer, WeightSource(m.bfl_dir / m.spec.transformer_file)
    i = dict(_inputs(cfg, L=64), t=np.array([0.5], np.float32))  # 1000·t is exact in bf16
    model = tb.load_transformer(cfg, path, dtype=torch.bfloat16)
    out = model(*(tb.from_numpy(i[k]) for k in ("x", "x_ids", "t", "ctx", "ctx_ids")))
    assert out.dtype == torch.bfloat16
    assert rel_err(tb.to_numpy(out), _call(tb, tb.load_transformer(cfg, path, dtype=F32), i)) < 3e-2


# ---- the autoencoder ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    cfg = tiny_spec("klein-4b").vae
    tmp = tmp_path_factory.mktemp("vae")
    bfl = random_vae(cfg, seed=3)
    save_safetensors(tmp / "ae.safetensors", bfl)
    ref = diffusers_vae(cfg, bfl)
    ref.save_pretrained(tmp / "vae")
    rng = np.random.default_rng(7)
    img = rng.uniform(-1, 1, (1, 64, 48, 3)).astype(np.float32)  # NHWC, not square
    z = rng.standard_normal((1, 4, 3, 4 * cfg.z_channels)).astype(np.float32)
    return cfg, tmp, ref, img, z


@pytest.mark.parametrize("layout", ["ae.safetensors", "vae"])
def test_vae_matches_diffusers_and_mlx(vae, layout):
    cfg, tmp, ref, img, z = vae
    ours = tb.load_vae(cfg, WeightSource(tmp / layout), dtype=F32)
    theirs = mb.load_vae(cfg, WeightSource(tmp / layout), dtype=mx.float32)
    enc = tb.to_numpy(ours.encode(tb.from_numpy(img)))
    dec = tb.to_numpy(ours.decode(tb.from_numpy(z)))
    assert enc.shape == (1, 4, 3, 4 * cfg.z_channels) and dec.shape == img.shape  # NHWC in and out
    assert rel_err(enc, ref_encode(ref, img.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)) <= 1e-5
    assert rel_err(dec, ref_decode(ref, z.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)) <= 1e-5
    assert rel_err(enc, np.array(theirs.encode(mx.array(img)))) <= 1e-5
    assert rel_err(dec, np.array(theirs.decode(mx.array(z)))) <= 1e-5


def test_nchw_vae_matches_diffusers(vae):
    """The layout MPS keeps (CUDA and the CPU run channels-last): the same numbers."""
    from flux2_mlx.torch_backend.load import load_vae

    cfg, tmp, ref, img, z = vae
    ours = load_vae(cfg, WeightSource(tmp / "ae.safetensors"), dtype=F32, device=torch.device("cpu"),
                    channels_last=False)
    assert not ours.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert tb.load_vae(cfg, WeightSource(tmp / "ae.safetensors"), dtype=F32).decoder.conv_in.weight \
        .is_contiguous(memory_format=torch.channels_last)  # the default here
    enc = tb.to_numpy(ours.encode(tb.from_numpy(img)))
    dec = tb.to_numpy(ours.decode(tb.from_numpy(z)))
    assert rel_err(enc, ref_encode(ref, img.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)) <= 1e-5
    assert rel_err(dec, ref_decode(ref, z.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)) <= 1e-5


# ---- the text encoders -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["qwen3", "mistral"])
def test_text_encoder_matches_transformers_and_mlx(te_references, kind):
    ref = te_references(kind)
    ours = tb.load_text_encoder(ref.te, WeightSource(ref.dir), dtype=F32)
    got = tb.to_numpy(ours(tb.from_numpy(ref.ids), tb.from_numpy(ref.mask)))
    _assert_close(got, ref)  # real and pad rows, each ≤ 1e-5
    assert rel_err(got, ref.mlx) <= 1e-5  # the MLX encoder on the same folder


@pytest.mark.parametrize("block", [(16, 16), (24, 24)], ids=["16", "24-ragged"])
def test_fp8_encoder_stays_fp8_and_decodes_to_mlx_weights(tmp_path, block):
    """A Qwen/Qwen3-*-FP8 style checkpoint on torch: every Linear holds one byte per weight and its block
    scales; the weight it decodes for the matmul is MLX's (decoded on load) bit for bit; the encoder equals
    transformers on the same values and MLX; streamed layers equal resident ones."""
    from test_fp8 import _fp8_checkpoint
    from test_text_encoder_parity import _inputs as te_inputs

    from flux2_mlx.torch_backend.quant_layers import FP8Linear

    te = tiny_spec("klein-4b").text_encoder
    model = _fp8_checkpoint(te, tmp_path / "fp8", block, with_config=True)
    ours = tb.load_text_encoder(te, WeightSource(tmp_path / "fp8"), dtype=F32)
    theirs = mb.load_text_encoder(te, WeightSource(tmp_path / "fp8"), dtype=mx.float32)
    fp8 = {n: m for n, m in ours.named_modules() if isinstance(m, FP8Linear)}
    assert len(fp8) == 7 * (max(te.output_layers))  # q k v o gate up down in every layer that runs
    for name, layer in fp8.items():
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.element_size() == 1
        want = np.array(dict(tree_flatten(theirs.parameters()))[name + ".weight"])
        assert np.array_equal(tb.to_numpy(layer.dense()), want), name
    # The first 64 of the parity tests' 512 tokens: one prompt of 37 tokens and pads, one of 64 (what is
    # checked here is the FP8 storage, not the length; MLX's encoder takes 8x longer at 512).
    ids, mask = (a[:, :64] for a in te_inputs("qwen3", te.vocab_size))
    got = tb.to_numpy(ours(tb.from_numpy(ids), tb.from_numpy(mask)))
    with torch.no_grad():
        hs = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   output_hidden_states=True).hidden_states
    assert rel_err(got, torch.cat([hs[k] for k in te.output_layers], dim=-1).numpy()) <= 1e-5
    assert rel_err(got, np.array(theirs(mx.array(ids), mx.array(mask)))) <= 1e-5
    streamed = tb.load_text_encoder(te, WeightSource(tmp_path / "fp8", pread=True), dtype=F32,
                                    streaming=memory.Streaming(1, False))
    assert np.array_equal(tb.to_numpy(streamed(tb.from_numpy(ids), tb.from_numpy(mask))), got)
    if block == (16, 16):  # the planner sizes FP8 as held: one byte a weight (scales per 128 × 128 block)
        from flux2_mlx.encoder_names import text_encoder_entries

        held = sum(t.numel() * t.element_size() for t in [*ours.parameters(), *ours.buffers()])
        entries = text_encoder_entries(WeightSource(tmp_path / "fp8"), te)
        kept = memory.component_weights("te", entries, ("model.layers",), 4,
                                        fp8_kept=tb.device_memory()["fp8_kept"])
        scales = sum(m.scale_inv.numel() * 4 - 4 for m in fp8.values())  # 16 × 16 blocks: more than planned
        assert kept.total == held - scales
        decoded = memory.component_weights("te", entries, ("model.layers",), 4, fp8_kept=False)
        assert decoded.total - kept.total == sum(3 * m.weight.numel() - 4 for m in fp8.values())


# ---- FP8 matmuls (--fp8-matmul) ----------------------------------------------------------------------------

def _fp8_layer_data(shape, block, seed=0):
    """Random e4m3 codes with a different scale per weight block, and activations whose columns differ in
    size (so each group of columns gets its own activation scale)."""
    g = torch.Generator().manual_seed(seed)
    (n, k), (bn, bk) = shape, block
    codes = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(-(-n // bn), -(-k // bk), generator=g) * 2e-3 + 1e-4
    x = torch.randn(3, 7, k, generator=g) * (torch.rand(k, generator=g) * 4 + 0.01)
    return codes, scale_inv, x


def _decoded64(codes, scale_inv, block) -> np.ndarray:
    """codes · scale per block in float64, block by block (independent of FP8Linear's expansion)."""
    w, (bn, bk) = codes.double().numpy(), block
    for i, j in np.ndindex(scale_inv.shape):
        w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] *= float(scale_inv[i, j])
    return w


@pytest.mark.parametrize("block, shape",
                         [((16, 16), (48, 64)), ((24, 24), (40, 56)), ((32, 16), (72, 56)),
                          ((128, 128), (200, 300))], ids=["16", "24-ragged", "32x16-ragged", "128-ragged"])
def test_fp8_matmul_layer_equals_a_float64_emulation_within_the_activation_error_of_the_decoded(block, shape):
    """FP8Linear multiplying in FP8 (the CPU's rowwise kernel, one call per column block) equals, within
    float32 rounding (1e-5), the float64 emulation: activations quantized per token and weight column block
    (scale = amax / 448, checked against numpy), decoded, times the decoded weight. Its distance to the
    decoded layer is the activations' rounding alone: e4m3 moves each value by at most 2⁻⁴ of itself (3
    mantissa bits, to nearest) plus 2⁻¹⁰·scale where it is subnormal, so ‖y − y_dense‖ ≤ ‖Δx‖·‖W‖₂."""
    from flux2_mlx.torch_backend.quant_layers import E4M3_MAX, FP8Linear, quantize_fp8

    codes, scale_inv, x = _fp8_layer_data(shape, block)
    (n, k), bk = shape, block[1]
    layer = FP8Linear(codes, scale_inv, block, F32, "rowwise")
    got = layer(x).flatten(0, 1).double().numpy()
    x2 = x.flatten(0, 1).double().numpy()

    q, s = quantize_fp8(x.flatten(0, 1), bk)
    groups = [slice(j * bk, (j + 1) * bk) for j in range(-(-k // bk))]
    amax = np.stack([np.abs(x2[:, c]).max(1) for c in groups], 1)
    assert np.allclose(s.numpy(), amax / E4M3_MAX, rtol=1e-6, atol=0)
    s_cols = np.concatenate([np.repeat(s.double().numpy()[:, j:j + 1], len(range(k)[c]), 1)
                             for j, c in enumerate(groups)], 1)
    xq = q.double().numpy() * s_cols
    step = 2.0**-4 * np.abs(x2) + 2.0**-10 * s_cols  # the most e4m3 rounding moves each value
    assert (np.abs(xq - x2) <= step).all()

    w = _decoded64(codes, scale_inv, block)
    assert rel_err(got, xq @ w.T) <= 1e-5
    dense = tb.to_numpy(FP8Linear(codes, scale_inv, block, F32)(x)).reshape(-1, n).astype(np.float64)
    assert rel_err(dense, x2 @ w.T) <= 1e-5
    bound = np.linalg.norm(step) * np.linalg.norm(w, 2)
    assert 1e-3 * np.linalg.norm(dense) < np.linalg.norm(got - dense) <= bound  # measured 2 % of ‖y‖


@pytest.mark.parametrize("block", [(16, 16), (24, 24)], ids=["16", "24-ragged"])
def test_fp8_matmul_encoder_nears_the_decoded_one(tmp_path, block, monkeypatch):
    """A whole FP8 Qwen3 encoder with fp8_matmul: every FP8 Linear multiplies in FP8 (streamed layers too, bit
    for bit as resident ones); the embeddings stay within 12 % of the decoded encoder's: 2-3 % per product
    (the layer test) compounds through 27 random tiny layers (measured 6.8 % with 16-blocks, 8.0 % ragged).
    Refused with one line for weights without FP8 and where torch has no FP8 matmul."""
    from test_fp8 import _fp8_checkpoint
    from test_text_encoder_parity import _inputs as te_inputs

    from flux2_mlx.config import text_encoder_shapes
    from flux2_mlx.torch_backend import load
    from flux2_mlx.torch_backend.quant_layers import FP8Linear

    te = tiny_spec("klein-4b").text_encoder
    _fp8_checkpoint(te, tmp_path / "fp8", block, with_config=True)
    exact = tb.load_text_encoder(te, WeightSource(tmp_path / "fp8"), dtype=F32)
    fast = tb.load_text_encoder(te, WeightSource(tmp_path / "fp8"), dtype=F32, fp8_matmul=True)
    layers = [m for m in fast.modules() if isinstance(m, FP8Linear)]
    assert len(layers) == 7 * max(te.output_layers) and {m.matmul for m in layers} == {"rowwise"}
    ids, mask = (tb.from_numpy(a[:, :64]) for a in te_inputs("qwen3", te.vocab_size))
    got = tb.to_numpy(fast(ids, mask))
    assert 1e-3 < rel_err(got, tb.to_numpy(exact(ids, mask))) <= 0.12
    streamed = tb.load_text_encoder(te, WeightSource(tmp_path / "fp8", pread=True), dtype=F32,
                                    streaming=memory.Streaming(1, False), fp8_matmul=True)
    assert np.array_equal(tb.to_numpy(streamed(ids, mask)), got)

    shapes = text_encoder_shapes(te).items()
    dense = {k: Entry(s, lambda s=s: np.zeros(s, np.float32), "F32") for k, s in shapes}
    with pytest.raises(ValueError, match="--fp8-matmul found no FP8 weights to multiply; drop it"):
        tb.load_text_encoder(te, dense, dtype=F32, fp8_matmul=True)
    monkeypatch.setattr(load, "fp8_matmul_kind", lambda device, dtype: None)
    with pytest.raises(ValueError, match=r"no FP8 matmul with float32 results on cpu \(it needs CUDA"):
        tb.load_text_encoder(te, WeightSource(tmp_path / "fp8"), dtype=F32, fp8_matmul=True)


def test_fp8_matmul_is_refused_by_the_mlx_backend_and_pipeline(tiny_repo):
    from flux2_mlx import load_pipeline

    te = tiny_spec("klein-4b").text_encoder
    with pytest.raises(ValueError, match="torch-backend option; use --backend torch or drop --fp8-matmul"):
        mb.load_text_encoder(te, {}, dtype=mx.float32, fp8_matmul=True)
    with pytest.raises(ValueError, match="FP8 matmuls are a torch-backend option, not mlx's"):
        load_pipeline("klein-4b", model_path=tiny_repo, backend="mlx", fp8_matmul=True)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the 1x128 · 128x128 blockwise FP8 matmul runs on Hopper (compute capability 9.x)")
def test_fp8_blockwise_matmul_equals_the_per_block_loop_on_cuda():
    """Hopper: one blockwise scaled_mm per layer equals the rowwise call per column block (the same
    products, rounded to bf16 once vs once per block) and the float64 emulation."""
    from flux2_mlx.torch_backend.quant_layers import FP8Linear, fp8_matmul_kind, quantize_fp8

    cuda, bf16 = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    if fp8_matmul_kind(cuda, bf16) != "blockwise":
        pytest.skip("this torch's cuBLAS has no blockwise FP8 matmul (it needs 12.9+)")
    codes, scale_inv, x = _fp8_layer_data((512, 1024), (128, 128))
    codes, scale_inv, x = codes.to(cuda), scale_inv.to(cuda), x.to(cuda, bf16)
    one = FP8Linear(codes, scale_inv, (128, 128), bf16, "blockwise")
    loop = FP8Linear(codes, scale_inv, (128, 128), bf16, "rowwise")
    assert one.matmul == "blockwise" and loop.matmul == "rowwise"
    a, b = tb.to_numpy(one(x)), tb.to_numpy(loop(x))
    q, s = quantize_fp8(x.flatten(0, 1), 128)
    xq = (q.double() * s.double().repeat_interleave(128, 1)).cpu().numpy()
    want = (xq @ _decoded64(codes.cpu(), scale_inv.cpu(), (128, 128)).T).reshape(a.shape)
    assert rel_err(a, want) <= 4e-3 and rel_err(b, want) <= 4e-3 and rel_err(a, b) <= 4e-3


# ---- streaming ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    path = tmp_path_factory.mktemp("deep") / "t.safetensors"
    save_safetensors(path, random_transformer(DEEP, seed=5))
    return path


def _deep_args():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, DEEP.in_channels), dtype=np.float32)
    ctx = rng.standard_normal((1, 32, DEEP.context_in_dim), dtype=np.float32)
    return [tb.from_numpy(a) for a in (x, prc_img(4, 4), np.array([0.5], np.float32), ctx, prc_txt(32))]


@pytest.mark.parametrize("resident, keep_host", [(0, False), (5, True), (11, False)])
def test_streamed_equals_resident_bit_for_bit(deep, resident, keep_host):
    args = _deep_args()
    want = tb.to_numpy(tb.load_transformer(DEEP, WeightSource(deep), dtype=F32)(*args))
    model = tb.load_transformer(DEEP, WeightSource(deep, pread=True), dtype=F32,
                                streaming=memory.Streaming(resident, keep_host))
    blocks = list(model.double_blocks) + list(model.single_blocks)
    assert sum(type(b).__name__ == "StreamedBlock" for b in blocks) == 12 - resident
    for _ in range(2):  # the second step reads again (disk) or reuses host copies (ram)
        assert np.array_equal(tb.to_numpy(model(*args)), want)


def test_streamed_kv_path_equals_resident(deep):
    args = _deep_args()
    ref = tb.from_numpy(np.random.default_rng(4).standard_normal((1, 12, DEEP.in_channels), dtype=np.float32))
    ref_ids = tb.from_numpy(_refs(DEEP, [(3, 4)])[1])
    outs = []
    for streaming in (None, memory.Streaming(3, True)):
        model = tb.load_transformer(DEEP, WeightSource(deep, pread=streaming is not None), dtype=F32,
                                    streaming=streaming)
        cache = []
        outs.append([tb.to_numpy(model(*args, ref=ref, ref_ids=ref_ids, kv_cache=cache)),
                     tb.to_numpy(model(*args, kv_cache=cache))])
    assert all(np.array_equal(a, b) for a, b in zip(*outs))


def test_loading_allocates_no_second_copy_and_is_strict():
    """Modules are built on the meta device: every parameter is a loaded tensor, none left behind; a
    missing tensor is refused by name, as on MLX."""
    from flux2_mlx.weights import WeightsError

    tensors = random_transformer(DEEP, seed=5)
    model = tb.load_transformer(DEEP, _entries(tensors), dtype=F32)
    loaded = list(model.parameters()) + list(model.buffers())
    assert loaded and not any(t.is_meta or t.requires_grad for t in loaded)
    gone = "single_blocks.3.linear2.weight"
    with pytest.raises(WeightsError, match=gone):
        tb.load_transformer(DEEP, _entries({k: v for k, v in tensors.items() if k != gone}), dtype=F32)


# ---- GGUF: packed on the device, unpacked per layer --------------------------------------------------------

GGML_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"]  # repacked; the others: test_ggml_exact


@pytest.mark.parametrize("name", GGML_TYPES)
def test_unpacked_weight_equals_mlx_dequantize_bit_for_bit(name):
    from test_quant_repack import _random_raw

    from flux2_mlx.quant import GGMLType, repack
    from flux2_mlx.torch_backend.quant_layers import dequantize

    shape = (16, 512)
    q = repack(_random_raw(GGMLType[name], shape, seed=3), GGMLType[name], shape)
    want = np.array(mx.dequantize(mx.array(q.weight), mx.array(q.scales), mx.array(q.biases),
                                  group_size=q.group_size, bits=q.bits))
    got = dequantize(torch.from_numpy(q.weight.view(np.uint8)), torch.from_numpy(q.scales),
                     torch.from_numpy(q.biases), q.bits, q.group_size).numpy()
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_gguf_transformer_equals_dense_model_of_the_same_values(tmp_path, qtype):
    from test_gguf_load import _dense

    from flux2_mlx.torch_backend.quant_layers import QuantLinear

    cfg = tiny_spec("dev").transformer
    tensors = random_transformer(cfg, seed=4)
    types = {k: qtype for k, a in tensors.items() if a.ndim == 2 and a.shape[1] % 256 == 0}  # whole K-blocks
    write_gguf(tmp_path / "t.gguf", tensors, types)
    model = tb.load_transformer(cfg, WeightSource(tmp_path / "t.gguf"), dtype=F32)
    layer = model.double_blocks[0].img_attn.qkv
    assert isinstance(layer, QuantLinear) and layer.weight.dtype == torch.uint8  # packed, no dense copy
    i = _inputs(cfg, L=32)
    dense = tb.load_transformer(cfg, _entries(_dense(tensors, types)), dtype=F32)
    assert rel_err(_call(tb, model, i), _call(tb, dense, i)) <= 1e-5


def test_streamed_gguf_equals_resident(deep, tmp_path):
    from flux2_mlx.convert import convert

    gguf = convert(str(deep), tmp_path / "t.gguf", "Q5_K_M", jobs=1, progress=False)  # Q5_K and Q6_K blocks
    args = _deep_args()
    want = tb.to_numpy(tb.load_transformer(DEEP, WeightSource(gguf), dtype=F32)(*args))
    for keep_host in (False, True):
        model = tb.load_transformer(DEEP, WeightSource(gguf, pread=True), dtype=F32,
                                    streaming=memory.Streaming(1, keep_host))
        assert np.array_equal(tb.to_numpy(model(*args)), want)


def test_gguf_text_encoder_embeds_quantized(tmp_path):
    from test_convert import _tiny_text_encoder

    from flux2_mlx.convert import convert
    from flux2_mlx.torch_backend.quant_layers import QuantEmbedding

    te, _, _ = _tiny_text_encoder(tmp_path, "qwen3")
    te = dataclasses.replace(te, max_length=16)
    dst = convert(tmp_path / "text_encoder", tmp_path / "te-Q8_0.gguf", "Q8_0", progress=False)
    ours = tb.load_text_encoder(te, WeightSource(dst), dtype=F32)
    theirs = mb.load_text_encoder(te, WeightSource(dst), dtype=mx.float32)
    assert isinstance(ours.model.embed_tokens, QuantEmbedding)
    ids, mask = np.random.default_rng(0).integers(0, te.vocab_size, (1, 16)), np.ones((1, 16), np.int32)
    got = tb.to_numpy(ours(tb.from_numpy(ids), tb.from_numpy(mask)))
    assert rel_err(got, np.array(theirs(mx.array(ids), mx.array(mask)))) <= 1e-5


# ---- the whole pipeline ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, edit", [("klein-9b-kv", "images"), ("dev", "image")])
def test_pipeline_on_torch_equals_mlx(tiny_models, variant, edit):
    """Text + a reference (klein KV) or img2img (dev): same files, same noise → same latents and PNG."""
    from PIL import Image

    from flux2_mlx import load_pipeline

    m = tiny_models(variant)
    embeds = (np.random.default_rng(1).standard_normal((1, 16, m.spec.transformer.context_in_dim))
              .astype(np.float32))
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (96, 80, 3), dtype=np.uint8))
    kw = dict(prompt_embeds=embeds, width=32, height=48, steps=3, seed=3,
              **{edit: [img] if edit == "images" else img})
    out = {}
    for be in ("torch", "mlx"):
        pipe = load_pipeline(m.spec, model_path=m.bfl_dir, backend=be, dtype="float32")
        latents = pipe.sample(**kw)
        out[be] = latents, np.asarray(pipe.decode(latents, 32, 48), np.int16)
    assert rel_err(out["torch"][0], out["mlx"][0]) <= 1e-4
    assert np.abs(out["torch"][1] - out["mlx"][1]).max() <= 1


# ---- the memory planner on torch's CPU ---------------------------------------------------------------------

# Wide enough that weights and activations, not the interpreter or the constant part of torch's workspaces,
# make the peak: 0.62 GB in 2 + 6 blocks.
PLANNED = dict(hidden_size=1024, num_heads=8, depth=2, depth_single_blocks=6)
PLANNED_IMAGE, PLANNED_TEXT = (8, 16), 64  # latent rows x columns, text tokens
MEASURE_PEAK = """
import ctypes, dataclasses, gc, sys
import numpy as np, torch
torch.set_num_threads(1)
import flux2_mlx.torch_backend as tb
from flux2_mlx import memory
from flux2_mlx.config import tiny_spec, transformer_shapes
from flux2_mlx.sampling import prc_img, prc_txt
from flux2_mlx.weights import WeightSource

def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

cfg = dataclasses.replace(tiny_spec("klein-4b").transformer, **{planned})
(h, w), L = {image}, {text}
rng = np.random.default_rng(0)
args = [tb.from_numpy(a) for a in (rng.standard_normal((1, h * w, cfg.in_channels), dtype=np.float32),
        prc_img(h, w), np.array([0.5], np.float32), rng.standard_normal((1, L, cfg.context_in_dim),
        dtype=np.float32), prc_txt(L))]
resident = int(sys.argv[2])
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
base = hwm()
model = tb.load_transformer(cfg, WeightSource(sys.argv[1], pread=True), dtype=torch.float32,
                            streaming=None if resident < 0 else memory.Streaming(resident, False))
for _ in range(2):
    model(*args)
print(hwm() - base)
"""


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    cfg = dataclasses.replace(tiny_spec("klein-4b").transformer, **PLANNED)
    path = tmp_path_factory.mktemp("planned") / "t.safetensors"
    # 155M values: 1M random ones repeated (half the time of drawing them all; memory does not care).
    noise = np.random.default_rng(6).standard_normal(1 << 20, dtype=np.float32)
    save_safetensors(path, {k: np.ones(s, np.float32) if len(s) == 1 else
                            np.resize(noise * np.float32(s[1] ** -0.5), s)
                            for k, s in transformer_shapes(cfg).items()})
    return cfg, path


@pytest.mark.parametrize("fraction", [None, 0.7], ids=["resident", "streamed"])
def test_planned_peak_matches_the_measured_host_peak(planned, fraction):
    """The plan's peak for the denoise phase within 10 % of the process's peak RSS above where it stood
    before loading (a fresh process; streamed blocks read from disk: kept in RAM, their host copies would be
    the same memory on a CPU)."""
    import subprocess
    import sys
    from pathlib import Path

    from flux2_mlx.dit_names import transformer_entries

    cfg, path = planned
    dev = tb.device_memory()
    w = memory.component_weights("transformer", transformer_entries(WeightSource(path)),
                                 ("double_blocks", "single_blocks"), 4)
    budget = 10**12 if fraction is None else int(fraction * w.total)
    phase = denoise_phase(budget, w, cfg, text=PLANNED_TEXT, width=16 * PLANNED_IMAGE[1],
                          height=16 * PLANNED_IMAGE[0], fused=dev["fused_attention"],
                          activations=dev["activations"])
    assert phase.streamed == (fraction is not None)
    code = MEASURE_PEAK.format(planned=PLANNED, image=PLANNED_IMAGE, text=PLANNED_TEXT)
    resident = phase.resident_blocks if phase.streamed else -1
    out = subprocess.run([sys.executable, "-c", code, str(path), str(resident)], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    measured = int(out.stdout)
    assert abs(measured / phase.peak - 1) < 0.1, (measured, phase.peak, phase.resident_blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="checked against CUDA's allocator on a GPU")
@pytest.mark.parametrize("fraction", [None, 0.7], ids=["resident", "streamed"])
def test_planned_peak_matches_cuda_max_memory_allocated(planned, fraction):
    """On a GPU: the denoise phase's planned peak within 10 % of torch.cuda.max_memory_allocated above what
    was allocated before loading (float32, as on the CPU; streamed blocks read from disk)."""
    from flux2_mlx.dit_names import transformer_entries
    from flux2_mlx.sampling import prc_img, prc_txt

    cfg, path = planned
    device = torch.device(tb.use_device("cuda"))
    w = memory.component_weights("transformer", transformer_entries(WeightSource(path)),
                                 ("double_blocks", "single_blocks"), 4)
    budget = 10**12 if fraction is None else int(fraction * w.total)
    phase = denoise_phase(budget, w, cfg, text=PLANNED_TEXT, width=16 * PLANNED_IMAGE[1],
                          height=16 * PLANNED_IMAGE[0], fused=True,
                          activations=tb.device_memory()["activations"])
    (h, wd), L = PLANNED_IMAGE, PLANNED_TEXT
    rng = np.random.default_rng(0)
    args = [tb.from_numpy(a) for a in (rng.standard_normal((1, h * wd, cfg.in_channels), dtype=np.float32),
                                       prc_img(h, wd), np.array([0.5], np.float32),
                                       rng.standard_normal((1, L, cfg.context_in_dim), dtype=np.float32),
                                       prc_txt(L))]
    tb.free()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    streaming = memory.Streaming(phase.resident_blocks, False) if phase.streamed else None
    model = tb.load_transformer(cfg, WeightSource(path, pread=True), dtype=F32, streaming=streaming)
    with torch.inference_mode():
        for _ in range(2):
            model(*args)
    torch.cuda.synchronize(device)
    measured = torch.cuda.max_memory_allocated(device) - base
    assert abs(measured / phase.peak - 1) < 0.1, (measured, phase.peak, phase.resident_blocks)


# ---- compiled blocks ---------------------------------------------------------------------------------------

def test_compiled_blocks_equal_eager_beside_streamed_ones(deep):
    """compile=True: resident blocks run inductor's fused kernels (their own rounding), streamed ones stay
    eager; the output tracks the eager model's, and the MLX backend refuses the option by name."""
    args = _deep_args()
    want = tb.to_numpy(tb.load_transformer(DEEP, WeightSource(deep), dtype=F32)(*args))
    model = tb.load_transformer(DEEP, WeightSource(deep, pread=True), dtype=F32,
                                streaming=memory.Streaming(8, True), compile=True)
    blocks = list(model.double_blocks) + list(model.single_blocks)
    assert [type(b).__name__ for b in blocks].count("StreamedBlock") == 4
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks[:8])
    for _ in range(2):  # the second call reuses the compiled graphs
        assert rel_err(tb.to_numpy(model(*args)), want) <= 1e-5
    with pytest.raises(ValueError, match="compiling the transformer is a torch-backend option"):
        mb.load_transformer(DEEP, WeightSource(deep), dtype=mx.float32, compile=True)
