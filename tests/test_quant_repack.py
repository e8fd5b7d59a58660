"""ggml → MLX affine repack: hand-built blocks, random blocks vs gguf-py bit for bit, and MLX's own
kernels (Q6_K, Q3_K and Q2_K, kept as blocks: tests/test_ggml_exact.py; Q3_K's hand block here)."""

import numpy as np
import pytest

from flux2_mlx.quant import GGMLType as T
from flux2_mlx.quant import block_info, dequantize, quantize, repack
from flux2_mlx.quant.affine import dequantize_mlx, pack_codes, unpack_codes
from flux2_mlx.quant.kblocks import split_blocks

EXACT = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K]
# Byte offsets of the fp16 fields (d, m, dmin) in each block; random bytes there could be NaN/inf.
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q4_K: [0, 2],
              T.Q5_K: [0, 2], T.Q3_K: [108], T.Q6_K: [208], T.Q2_K: [80, 82]}
SHAPE = (16, 512)


def _random_raw(t, shape=SHAPE, seed=0, scale=0.01):
    """Random block bytes with finite fp16 scale fields (every code / sub-scale bit pattern occurs)."""
    rng = np.random.default_rng(seed)
    bs, ts = block_info(t)
    rows, n = shape
    raw = rng.integers(0, 256, (rows, n // bs, ts), dtype=np.uint8)
    for off in F16_FIELDS[t]:
        d = (rng.standard_normal((rows, n // bs)) * scale).astype(np.float16)
        d[0, 0] = 0  # a zero scale, and a subnormal one
        d[0, 1] = np.float16(3e-7)
        raw[..., off:off + 2] = d[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def _f16_bytes(x):
    return np.array([x], np.float16).view(np.uint8)


def _rel(a, b):
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


# ---- hand-built blocks with known values ------------------------------------------------------------

def test_q4_0_hand_block():
    qs = np.array([k | ((15 - k) << 4) for k in range(16)], np.uint8)  # lo nibble k, hi nibble 15-k
    raw = np.concatenate([_f16_bytes(0.5), qs])[None]
    want = np.array([0.5 * (j - 8) for j in range(16)] + [0.5 * (7 - j) for j in range(16)], np.float32)
    assert np.array_equal(dequantize(raw, T.Q4_0, (1, 32))[0], want)
    q = repack(raw, T.Q4_0, (1, 32))
    assert (q.bits, q.group_size, q.weight.shape) == (4, 32, (1, 4))
    assert (q.scales.tolist(), q.biases.tolist()) == ([[0.5]], [[-4.0]])
    assert q.weight[0, 0] == 0x76543210  # elements 0..7 = codes 0..7, element 0 in the low nibble
    assert np.array_equal(dequantize_mlx(q)[0], want)


def test_q8_0_hand_block():
    vals = np.arange(-16, 16, dtype=np.int8)
    raw = np.concatenate([_f16_bytes(0.25), vals.view(np.uint8)])[None]
    want = 0.25 * vals.astype(np.float32)
    assert np.array_equal(dequantize(raw, T.Q8_0, (1, 32))[0], want)
    q = repack(raw, T.Q8_0, (1, 32))
    assert (q.scales[0, 0], q.biases[0, 0]) == (0.25, -32.0)
    assert np.array_equal(unpack_codes(q.weight, 8)[0], vals.astype(np.int16) + 128)
    assert np.array_equal(dequantize_mlx(q)[0], want)


def _pack_k_scales(sc, m):
    """Inverse of ggml's get_scale_min_k4 for eight 6-bit scales and mins."""
    s = np.zeros(12, np.uint8)
    for j in range(4):
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6)
        s[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4)
    return s


def test_q4_k_hand_block():
    sc, m = [1, 2, 3, 63, 44, 45, 46, 47], [0, 2, 4, 6, 58, 59, 60, 61]  # j >= 4 uses the split high bits
    q = (np.arange(256) * 7) % 16
    qs = np.zeros(128, np.uint8)
    for c in range(4):
        for i in range(32):  # chunk c: low nibbles are elements 64c.., high nibbles 64c+32..
            qs[32 * c + i] = q[64 * c + i] | (q[64 * c + 32 + i] << 4)
    raw = np.concatenate([_f16_bytes(1.0), _f16_bytes(0.5), _pack_k_scales(sc, m), qs])[None]
    want = np.array([1.0 * sc[e // 32] * q[e] - 0.5 * m[e // 32] for e in range(256)], np.float32)
    assert np.array_equal(dequantize(raw, T.Q4_K, (1, 256))[0], want)
    r = repack(raw, T.Q4_K, (1, 256))
    assert r.scales[0].tolist() == sc and r.biases[0].tolist() == [-0.5 * x for x in m]
    assert np.array_equal(unpack_codes(r.weight, 4)[0], q)
    assert np.array_equal(dequantize_mlx(r)[0], want)


def test_q3_k_hand_block():
    import mlx.core as mx

    from flux2_mlx.mlx_backend.quant_layers import decode_kblocks

    # element e = 128h + 32j + i: low2 = (qs[32h+i] >> 2j) & 3, hbit = (hmask[i] >> (4h+j)) & 1
    rng = np.random.default_rng(3)
    low2, hbit = rng.integers(0, 4, 256), rng.integers(0, 2, 256)
    sc6 = rng.integers(0, 64, 16)  # stored 6-bit, value sc6 - 32
    qs, hmask, s = np.zeros(64, np.uint8), np.zeros(32, np.uint8), np.zeros(12, np.uint8)
    for e in range(256):
        h, j, i = e // 128, (e % 128) // 32, e % 32
        qs[32 * h + i] |= low2[e] << (2 * j)
        hmask[i] |= hbit[e] << (4 * h + j)
    for j in range(16):
        s[j % 8] |= (sc6[j] & 15) << (4 * (j >= 8))
        s[8 + j % 4] |= (sc6[j] >> 4) << (2 * (j // 4))
    raw = np.concatenate([hmask, qs, s, _f16_bytes(0.125)])[None]
    want = (0.125 * (sc6[np.arange(256) // 16] - 32) * (low2 - 4 * (1 - hbit))).astype(np.float32)
    assert np.array_equal(dequantize(raw, T.Q3_K, (1, 256))[0], want)
    q = split_blocks(raw, T.Q3_K, (1, 256))
    got = decode_kblocks(q.type, [mx.array(a) for a in q.fields], mx.float32)
    assert np.array_equal(np.array(got)[0], want)


# ---- random blocks: exact types bit for bit --------------------------------------------------------

@pytest.mark.parametrize("t", EXACT, ids=lambda t: t.name)
def test_random_blocks_bit_exact(t):
    raw = _random_raw(t)
    ref = dequantize(raw, t, SHAPE)
    q = repack(raw, t, SHAPE)
    assert q.weight.dtype == np.uint32 and q.weight.shape == (SHAPE[0], SHAPE[1] * q.bits // 32)
    assert (q.scales.dtype == np.float32
            and q.scales.shape == q.biases.shape == (SHAPE[0], SHAPE[1] // q.group_size))
    assert q.note.startswith("exact")
    assert np.array_equal(dequantize_mlx(q), ref)  # array_equal treats -0 == 0


@pytest.mark.parametrize("t", EXACT, ids=lambda t: t.name)
def test_random_blocks_through_mlx(t):
    import mlx.core as mx
    raw = _random_raw(t, seed=1)
    ref = dequantize(raw, t, SHAPE)
    q = repack(raw, t, SHAPE)
    w, s, b = mx.array(q.weight), mx.array(q.scales), mx.array(q.biases)
    assert np.array_equal(np.array(mx.dequantize(w, s, b, group_size=q.group_size, bits=q.bits)), ref)
    x = np.random.default_rng(2).standard_normal((4, SHAPE[1])).astype(np.float32)
    y = mx.quantized_matmul(mx.array(x), w, s, b, transpose=True, group_size=q.group_size, bits=q.bits)
    assert _rel(np.array(y, np.float64), x.astype(np.float64) @ ref.T.astype(np.float64)) < 1e-5


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_K, T.Q5_K], ids=lambda t: t.name)
def test_large_tensor_repacked_in_row_chunks_equals_one_piece(t):
    """repack() splits tensors over ~1 MB row chunks on a thread pool; the pieces must join in order: the
    whole equals 100-row pieces (each well under one chunk) repacked alone and stacked."""
    shape = (3, 700, 1024)  # 3-D lead, 2100 rows: a few MB of blocks, several uneven chunks
    raw = _random_raw(t, (2100, 1024), seed=3).reshape(3, 700, -1)
    whole = repack(raw, t, shape)
    rows = raw.reshape(2100, -1)
    pieces = [repack(rows[i:i + 100], t, (100, 1024)) for i in range(0, 2100, 100)]
    one = {k: np.concatenate([getattr(p, k) for p in pieces]) for k in ("weight", "scales", "biases")}
    assert whole.weight.shape == (3, 700, 1024 * pieces[0].bits // 32) and whole.scales.shape[:2] == (3, 700)
    for k, b in one.items():
        assert np.array_equal(getattr(whole, k).reshape(b.shape), b), k
    assert np.array_equal(dequantize_mlx(whole), dequantize(raw, t, shape))


@pytest.mark.parametrize("t", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
def test_fp16_scales_exact_for_legacy(t):
    raw = _random_raw(t, seed=4)  # |d| ~ 0.01: offsets like -128 d stay far inside fp16's range
    q = repack(raw, t, SHAPE, scales_dtype=np.float16)
    assert q.scales.dtype == np.float16
    assert np.array_equal(dequantize_mlx(q), dequantize(raw, t, SHAPE))


@pytest.mark.parametrize("dtype, bound", [(np.float16, 5e-4), ("bfloat16", 4e-3)])
@pytest.mark.parametrize("t", [T.Q4_K, T.Q5_K], ids=lambda t: t.name)
def test_k_quant_low_precision_scales_error(t, dtype, bound):
    raw = _random_raw(t, seed=5)
    q = repack(raw, t, SHAPE, scales_dtype=dtype)
    err = _rel(dequantize_mlx(q), dequantize(raw, t, SHAPE))
    assert 0 < err < bound
    if dtype == "bfloat16":  # float32 arrays holding bf16 values: the low 16 bits are zero
        assert not (q.scales.view(np.uint32) & 0xFFFF).any()


# ---- packing and the ggml layer ---------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_codes_is_mlx_layout(bits):
    import mlx.core as mx
    wq, _, _ = mx.quantize(mx.array(np.random.default_rng(bits).standard_normal((4, 128)).astype(np.float32)),
                           group_size=32, bits=bits)
    wq = np.array(wq)
    codes = unpack_codes(wq, bits)
    assert codes.max() < 2**bits and np.array_equal(pack_codes(codes, bits), wq)
    # and against a plain little-endian bit stream
    stream = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits].reshape(4, -1)
    assert np.array_equal(np.packbits(stream, axis=-1, bitorder="little").view(np.uint32), wq)


@pytest.mark.parametrize("t", [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
def test_ggml_quantize_round_trip(t):
    w = np.random.default_rng(9).standard_normal((3, 64)).astype(np.float32)
    raw = quantize(w, t)
    bs, ts = block_info(t)
    assert raw.dtype == np.uint8 and raw.shape == (3, 64 // bs * ts)
    assert _rel(dequantize(raw, t, w.shape), w) < 0.1


def test_ggml_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((2, 128), np.float32), T.Q4_K)
