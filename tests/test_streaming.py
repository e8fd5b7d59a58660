"""Layer streaming and the memory planner: streamed runs equal resident ones bit for bit, stay under the
budget, impossible budgets are refused with numbers, a file truncated mid-run is a clear error."""

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import denoise_phase, random_transformer, random_vae

from flux2_mlx import memory
from flux2_mlx.config import tiny_spec
from flux2_mlx.dit_names import transformer_entries
from flux2_mlx.entries import Entry
from flux2_mlx.mlx_backend import load_transformer, load_vae
from flux2_mlx.pipeline import decode_tiled, encode_tiled
from flux2_mlx.sampling import prc_img, prc_txt
from flux2_mlx.weights import WeightSource, save_safetensors

# Deeper than the tiny default, so that most of it can be streamed: 2 double + 10 single blocks.
CFG = dataclasses.replace(tiny_spec("klein-4b").transformer, depth=2,
                          depth_single_blocks=10)
SIDE, TXT = 128, 64  # the budget test's 64 image + 64 text tokens: weights dominate, as at real sizes
# A VAE narrower than the tiny default (16 channels, not 32: a quarter of the convolution work) for the
# tiling tests; its tile statistics differ from the whole image's as much (measured below).
TILING_VAE = dataclasses.replace(tiny_spec("klein-4b").vae, ch=16, norm_groups=4)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    path = tmp_path_factory.mktemp("deep") / "t.safetensors"
    save_safetensors(path, random_transformer(CFG, seed=5))
    return path


def _inputs(side=64, txt=16):
    """Transformer inputs of (side/16)² image and txt text tokens; 16 + 16 where only equality is checked
    (the forward's time is linear in the tokens)."""
    h = side // 16
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, h * h, CFG.in_channels), dtype=np.float32)
    ctx = rng.standard_normal((1, txt, CFG.context_in_dim), dtype=np.float32)
    args = (mx.array(x), mx.array(prc_img(h, h)), mx.array([0.5]), mx.array(ctx), mx.array(prc_txt(txt)))
    mx.eval(args)
    return args


def _plan(path, budget):
    """The planner's denoise phase for this transformer at SIDE² px and TXT text tokens."""
    w = memory.component_weights("transformer", transformer_entries(WeightSource(path)),
                                 ("double_blocks", "single_blocks"), 4)
    return w, denoise_phase(budget, w, CFG, text=TXT, width=SIDE, height=SIDE, fused=False)


@pytest.fixture(scope="module")
def resident_out(deep):
    """The resident model's output for _inputs(), which every streamed setup must equal bit for bit."""
    return np.array(load_transformer(CFG, WeightSource(deep), dtype=mx.float32)(*_inputs()))


@pytest.mark.parametrize("resident, keep_host", [(0, False), (5, True), (11, False)])
def test_streamed_equals_resident_bit_for_bit(deep, resident_out, resident, keep_host):
    args, ref = _inputs(), resident_out
    model = load_transformer(CFG, WeightSource(deep, pread=True), dtype=mx.float32,
                             streaming=memory.Streaming(resident, keep_host))
    blocks = model.double_blocks + model.single_blocks
    assert sum(type(b).__name__ == "StreamedBlock" for b in blocks) == 12 - resident
    for _ in range(2):  # the second step reads again (disk) or reuses host copies (ram)
        assert np.array_equal(np.array(model(*args)), ref)


def test_streamed_kv_path_equals_resident(deep):
    """The klein KV reference stream and its cache pass through streamed blocks unchanged."""
    from flux2_mlx.sampling import prc_refs

    args = _inputs()
    ref = mx.array(np.random.default_rng(4).standard_normal((1, 12, CFG.in_channels), dtype=np.float32))
    ref_ids = mx.array(prc_refs([(3, 4)]))
    outs = []
    for streaming in (None, memory.Streaming(3, False)):
        model = load_transformer(CFG, WeightSource(deep, pread=streaming is not None), dtype=mx.float32,
                                 streaming=streaming)
        cache = []
        outs.append([np.array(model(*args, ref=ref, ref_ids=ref_ids, kv_cache=cache)),
                     np.array(model(*args, kv_cache=cache)),
                     np.array(model(*args, ref=ref, ref_ids=ref_ids))])
        assert len(cache) == 12
    assert all(np.array_equal(a, b) for a, b in zip(*outs))
    assert np.array_equal(outs[0][0], outs[0][1]) and not np.array_equal(outs[0][0], outs[0][2])


def test_streamed_gguf_equals_resident(deep, tmp_path):
    from flux2_mlx.convert import convert

    gguf = convert(str(deep), tmp_path / "t.gguf", "Q5_K_M", jobs=1)  # Q5_K repacked, Q6_K qkv kept as blocks
    assert {"Q5_K", "Q6_K"} <= {e.stored for e in transformer_entries(WeightSource(gguf)).values()}
    args = _inputs()
    ref = np.array(load_transformer(CFG, WeightSource(gguf), dtype=mx.float32)(*args))
    model = load_transformer(CFG, WeightSource(gguf, pread=True), dtype=mx.float32,
                             streaming=memory.Streaming(1, False))
    assert np.array_equal(np.array(model(*args)), ref)


def test_budget_below_the_weights_runs_under_it_as_planned(deep):
    w, _ = _plan(deep, 10**12)
    budget = int(0.6 * w.total)
    _, phase = _plan(deep, budget)
    assert phase.streamed and 0 < phase.resident_blocks < 12 and phase.peak <= budget
    args = _inputs(SIDE, TXT)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load_transformer(CFG, WeightSource(deep, pread=True), dtype=mx.float32,
                             streaming=memory.Streaming(phase.resident_blocks, False))
    for _ in range(2):
        mx.eval(model(*args))
    measured = mx.get_peak_memory() - base
    assert measured < budget < w.total
    assert abs(measured / phase.peak - 1) < 0.1, (measured, phase.peak)


def test_impossible_budget_is_refused_with_numbers(deep):
    w, _ = _plan(deep, 10**12)
    with pytest.raises(memory.MemoryPlanError, match=r"denoise needs at least 0\.\d\d GB even streamed .* "
                                                     r"more than the 0\.02 GB usable of the budget"):
        _plan(deep, 20 * 10**6)


def test_plan_sizes_quantized_tensors_as_loaded():
    assert memory.tensor_bytes("Q4_K", (64, 256), 2) == 64 * 256 // 2 + 2 * (64 * 256 // 32) * 2
    assert memory.tensor_bytes("Q6_K", (64, 256), 2) == 64 * 210  # the file's blocks, 210 bytes per 256
    assert memory.tensor_bytes("BF16", (64, 256), 4) == 64 * 256 * 4  # dense: the compute dtype


def test_file_truncated_mid_run_is_a_clear_error_not_a_hang(deep, tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(deep.read_bytes())
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, "tests")
        import mlx.core as mx
        from flux2_mlx import memory
        from flux2_mlx.mlx_backend import load_transformer
        from flux2_mlx.weights import WeightsError, WeightSource
        from test_streaming import CFG, _inputs
        model = load_transformer(CFG, WeightSource({str(path)!r}, pread=True), dtype=mx.float32,
                                 streaming=memory.Streaming(0, False))
        args = _inputs()
        mx.eval(model(*args))
        os.truncate({str(path)!r}, os.path.getsize({str(path)!r}) // 2)
        try:
            mx.eval(model(*args))
        except WeightsError as e:
            print("ERROR:", e)
    """)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "ERROR:" in out.stdout and "truncated or replaced during the run" in out.stdout


def test_tiled_decode_matches_untiled():
    cfg = TILING_VAE
    vae = load_vae(cfg, {k: Entry(v.shape, lambda v=v: v) for k, v in random_vae(cfg, seed=2).items()},
                   dtype=mx.float32)
    z = np.random.default_rng(3).standard_normal((1, 10, 6, 128)).astype(np.float32)
    dec = lambda part: np.array(vae.decode(mx.array(part)))[0]  # noqa: E731
    whole = dec(z)
    tiled = decode_tiled(dec, z, 64)  # 4x4-cell tiles with 4 cells of context: 3x2 tiles, one short
    assert tiled.shape == whole.shape == (160, 96, 3)
    err = np.abs(tiled - whole)
    # Random weights: GroupNorm and the mid-block attention see each tile's statistics, not the image's.
    # Measured 0.029 relative L2 (mean 0.014) with 64-128 px tiles + 64 px context (0.027 and 0.013 with
    # the 32-channel tiny VAE).
    rel = float(np.linalg.norm(tiled - whole) / np.linalg.norm(whole))
    assert rel < 0.1 and err.mean() < 0.05, (rel, err.mean())
    assert np.array_equal(decode_tiled(dec, z, 0), whole)


def test_tiled_encode_matches_untiled():
    """Input images too large for the budget are encoded in tiles, blended in latent space."""
    cfg = TILING_VAE
    vae = load_vae(cfg, {k: Entry(v.shape, lambda v=v: v) for k, v in random_vae(cfg, seed=2).items()},
                   dtype=mx.float32)
    y, x = np.mgrid[0:160, 0:96] / 40.0
    img = np.stack([np.sin(x), np.cos(y), np.sin(x + y)], -1)[None].astype(np.float32)  # smooth, like a photo
    enc = lambda part: np.array(vae.encode(mx.array(part)))[0]  # noqa: E731
    whole = enc(img)
    tiled = encode_tiled(enc, img, 64)
    assert tiled.shape == whole.shape == (10, 6, 128)
    rel = float(np.linalg.norm(tiled - whole) / np.linalg.norm(whole))
    assert 0 < rel < 0.15, rel  # measured 0.086 (0.105 with the 32-channel VAE): tile statistics, as decoding
    assert np.array_equal(encode_tiled(enc, img, 0), whole)
    # A local map (16x16 mean pooling) has no tile statistics: tiled equals whole, so the tiles' placement
    # and cross-fade weights are exact.
    pool = lambda part: part[0].reshape(part.shape[1] // 16, 16, part.shape[2] // 16, 16, 3).mean((1, 3))  # noqa: E731
    assert np.allclose(encode_tiled(pool, img, 64), pool(img), atol=1e-6)
    assert np.allclose(encode_tiled(pool, img, 32), pool(img), atol=1e-6)


def test_plan_counts_reference_tokens_and_input_images():
    from flux2_mlx import memory

    t = memory.Weights("transformer", 10**8, [10**8] * 4, [0, 0, 1, 1])
    v = memory.Weights("vae", 10**8, [], [])
    kw = dict(transformer=t, vae=v, text_encoder=None, hidden=3072, heads=24, width=1024, height=1024,
              compute_bytes=2, fused_attention=True)
    plain = memory.plan_phases(10**12, **kw)
    edit = memory.plan_phases(10**12, **kw, ref_tokens=3 * 4096, image_size=(1024, 1024))
    assert [p.name for p in edit.phases] == ["images", "denoise", "decode"] and plain.phase("images") is None
    # Activations grow with every token attended to: 512 + 4096 output tokens + 3 x 4096 reference tokens.
    ratio = edit.phase("denoise").activations / plain.phase("denoise").activations
    assert abs(ratio - (512 + 4 * 4096) / (512 + 4096)) < 1e-6
    small = memory.plan_phases(8 * 10**9, **kw, image_size=(2048, 1536))
    assert small.phase("images").tile and small.phase("images").peak <= 8 * 10**9
