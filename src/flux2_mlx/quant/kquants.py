"""llama.cpp's reference K-quant quantizers (Q2_K..Q6_K) in numpy, byte-identical to ggml-quants.c
`quantize_row_qN_K_ref` (no importance matrix) as built for x86-64 without FMA. Imports numpy only.

Exactness rules (shared/docs/kquants.md §0, §11): every operation is float32 in the C evaluation order;
in-sub-block sums are sequential (`np.add.reduce(axis=0)` on (n, G) C-contiguous arrays, one column per
sub-block); nearest_int is round-half-even; the final re-quantization uses the fp16-rounded d/dmin.
"""

from __future__ import annotations

import numpy as np

__all__ = ["QK_K", "quantize_q2_k", "quantize_q3_k", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k"]

QK_K = 256
_CHUNK = 512  # super-blocks per numpy pass: keeps the (n, G) temporaries inside L2
_CHUNK_Q3 = 512  # Q3_K's descent is 80 steps of small vector ops: larger chunks amortise the calls
f32 = np.float32
_GROUP_MAX_EPS = f32(1e-15)  # ggml-quants.c GROUP_MAX_EPS


def _nearest_int(v: np.ndarray) -> np.ndarray:
    # ggml-quants.c nearest_int: the 1.5*2^23 bit trick. Equals rint for |v| < 2^22, and reproduces
    # C's garbage beyond that (the assert is compiled out in release builds).
    return ((v + f32(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000


def _fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 (round to nearest even, subnormals kept) -> (fp16 array, its value as float32)."""
    h = v.astype(np.float16)
    return h, h.astype(f32)


def _subblocks(x: np.ndarray, n: int) -> np.ndarray:
    """(nb, 256) -> (n, G) C-contiguous, one sub-block of n consecutive elements per column."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _rows(L: np.ndarray, nb: int) -> np.ndarray:
    """Inverse of _subblocks for integer levels: (n, G) -> (nb, 256) int32."""
    return L.T.reshape(nb, QK_K).astype(np.int32)


def _sum(a: np.ndarray) -> np.ndarray:
    return np.add.reduce(a, axis=0)  # sequential per column, like the C loops (pairwise would differ)


def _dot(*ops):
    """Column sums of the product of ops: sequential per column like _sum, product taken left to right,
    in one pass without the product temporary (same bytes as _sum(a * b * c))."""
    return np.einsum(_DOT_SPEC[len(ops)], *ops)


_DOT_SPEC = {2: "ij,ij->j", 3: "ij,ij,ij->j"}


def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """ggml-quants.c make_qkx2_quants on every column of x (n, G): weighted asymmetric grid search.
    Returns (scale, the_min, L) with x ~ scale*L - the_min, L float32 in [0, nmax]."""
    t, l = np.empty_like(x), np.empty_like(x)  # reused: allocation-free loop

    def levels(iscale, m):
        np.subtract(x, m, out=t)
        np.multiply(t, iscale, out=t)
        return np.clip(np.rint(t, out=l), 0, nmax, out=l)

    def err(scale, m):  # sum of w * |diff| or w * diff^2, diff = scale*l + m - x, summed in order
        np.multiply(l, scale, out=t)
        np.add(t, m, out=t)
        np.subtract(t, x, out=t)
        np.abs(t, out=t) if use_mad else np.multiply(t, t, out=t)
        return _dot(w, t)

    lo = np.minimum(x.min(axis=0), f32(0))  # `if (min > 0) min = 0`
    hi = x.max(axis=0)
    sum_w, sum_x = _sum(w), _dot(w, x)
    iscale = f32(nmax) / (hi - lo)
    scale = f32(1) / iscale
    levels(iscale, lo)
    best = err(scale, lo)
    m = lo
    best_iscale, best_m = iscale, lo  # the levels of the best candidate are recomputed from these
    for k in range(nstep + 1):
        # rint = nearest_int below 2^22, far above the search's values of iscale*(x - min)
        iscale = (f32(rmin) + f32(rdelta) * f32(k) + f32(nmax)) / (hi - m)  # m: best min so far
        levels(iscale, m)
        sum_l, sum_l2, sum_xl = _dot(w, l), _dot(w, l, l), _dot(w, l, x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0  # refit through the origin
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        this_min = np.where(pos, f32(0), this_min)
        cur = err(this_scale, this_min)
        acc = (D > 0) & (cur < best)
        best_iscale = np.where(acc, iscale, best_iscale)
        best_m = np.where(acc, m, best_m)
        best = np.where(acc, cur, best)
        scale = np.where(acc, this_scale, scale)
        m = np.where(acc, this_min, m)
    flat = hi == lo  # all-zero or constant <= 0: C returns before the search
    L = levels(best_iscale, best_m)
    return np.where(flat, f32(0), scale), -np.where(flat, lo, m), np.where(flat, f32(0), L)


def _signed_absmax(x):
    """First element of largest |x| per column, with its sign (the C `if (ax > amax)` scan), and |it|."""
    ax = np.abs(x)
    amax = ax.max(axis=0)
    M = x[-1].copy()
    for i in range(x.shape[0] - 2, -1, -1):  # backwards, so that the first maximum wins
        np.copyto(M, x[i], where=ax[i] == amax)
    return M, amax


def _make_qx_quants(x, nmax):
    """ggml-quants.c make_qx_quants, rmse_type 1, no imatrix: symmetric search over 19 steps.
    Returns (signed scale, L in [0, 2*nmax-1]); all-zero columns give scale 0 and L = 0."""
    M, amax = _signed_absmax(x)
    w = x * x
    wx = w * x
    l = np.empty_like(x)

    def candidate(iscale):
        np.clip(np.rint(np.multiply(x, iscale, out=l), out=l), -nmax, nmax - 1, out=l)
        return _dot(wx, l), _dot(w, l, l)

    best_iscale = f32(-nmax) / M
    sumlx, suml2 = candidate(best_iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
    best = scale * sumlx
    for k in (*range(-9, 0), *range(1, 10)):
        iscale = -(f32(nmax) + f32(0.1) * f32(k)) / M
        sumlx, suml2 = candidate(iscale)
        acc = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = np.where(acc, iscale, best_iscale)  # C also recomputes L from the accepted step
        scale = np.where(acc, sumlx / suml2, scale)
        best = np.where(acc, scale * sumlx, best)
    candidate(best_iscale)
    zero = amax < _GROUP_MAX_EPS
    return np.where(zero, f32(0), scale), np.where(zero, f32(0), l + nmax)


# lowest set bit of a 16-bit mask (16 for an empty mask): the first accepting position
_LOWBIT = np.full(1 << 16, 16, np.int64)
for _b in range(15, -1, -1):
    _LOWBIT[(np.arange(1 << 16) >> _b) & 1 == 1] = _b
del _b
_POW2 = (1 << np.arange(16)).astype(f32)


def _make_q3_quants(x, nmax=4):
    """ggml-quants.c make_q3_quants with do_rmse: first guess at -nmax/max, then up to 5 sweeps of
    coordinate descent. Returns (signed scale, L in [0, 2*nmax-1])."""
    M, amax = _signed_absmax(x)
    zero = amax < _GROUP_MAX_EPS
    L = np.clip(np.rint((f32(-nmax) / M) * x), -nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = _dot(w * x, L), _dot(w, L, L)  # the C sums of w*x*L and w*L*L
    # With M > 0 every x*l is <= 0, so the C test `slx > 0` never passes: only M < 0 columns can move.
    act = np.flatnonzero((M < 0) & ~zero)
    if act.size:
        _q3_descent(x, L, sumlx, suml2, act, nmax)
    scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    return np.where(zero, f32(0), scale), np.where(zero, f32(0), L + nmax)


def _q3_terms(x, L):
    w = x * x
    wx = w * x
    return w, wx, wx * L, w * L * L  # and the C terms w*x*L and w*L*L of every position


def _q3_descent(x, L, sumlx, suml2, cols, nmax):
    """The C sweeps, event by event. Between two accepted moves a sub-block's sums are constant, so one
    vector pass evaluates the C test at all 16 positions at once; the next move is the first accepting
    position in sweep order from just after the last move (wrapping round into the next sweep, at most
    5 sweeps). A sub-block with no accepting position is at the C fixed point (early exit) and leaves."""
    n = x.shape[0]
    X, LL = x[:, cols], L[:, cols]
    W, WX, AA, BB = _q3_terms(X, LL)
    sx, s2 = sumlx[cols], suml2[cols]
    ptr = np.zeros(cols.size, np.int64)  # next position of the current sweep (n: sweep finished)
    sweep = np.zeros(cols.size, np.int64)
    big = f32(1 << 22)
    alive = None  # finished sub-blocks stay in the arrays (masked) until enough have left to compact
    while True:
        slx = sx - AA
        sl2 = s2 - BB
        t = np.multiply(X, sl2)
        t /= slx
        # nearest_int == rint for |t| < 2^22; NaN (slx == 0, so never accepted) is skipped by fmin/fmax
        if -big < np.fmin.reduce(t, axis=None) and np.fmax.reduce(t, axis=None) < big:
            new = np.rint(np.clip(t, -nmax, nmax - 1, out=t), out=t)
        else:
            new = np.clip(_nearest_int(t), -nmax, nmax - 1).astype(f32)
        slx_new = np.multiply(WX, new)
        slx_new += slx
        sl2_new = np.multiply(W, new)
        sl2_new *= new
        sl2_new += sl2
        acc = slx > 0
        acc &= new != LL
        acc &= sl2_new > 0
        lhs = np.multiply(slx_new, slx_new, out=slx)
        lhs *= s2
        rhs = np.multiply(sl2_new, sx * sx, out=sl2)
        acc &= lhs > rhs
        code = np.matmul(_POW2, acc.astype(f32)).astype(np.int64)
        rot = ((code >> ptr) | (code << (n - ptr))) & 0xFFFF
        f = _LOWBIT[rot]
        found = f < n
        end = ptr + f
        wrap = end >= n
        go = found & ~(wrap & (sweep == 4))
        if alive is not None:
            go &= alive
        idx = np.flatnonzero(go)
        p = end[idx] & (n - 1)
        nv = new[p, idx]
        LL[p, idx] = nv
        AA[p, idx] = WX[p, idx] * nv
        BB[p, idx] = W[p, idx] * nv * nv
        sx[idx] = slx_new[p, idx]
        s2[idx] = sl2_new[p, idx]
        ptr[idx] = p + 1
        sweep[idx] += wrap[idx]
        if idx.size * 4 >= cols.size * 3:
            alive = go
            continue
        stop = ~go
        c = cols[stop]
        L[:, c] = LL[:, stop]
        sumlx[c], suml2[c] = sx[stop], s2[stop]
        if not idx.size:
            break
        X, LL = X[:, idx], LL[:, idx]  # gathers are dearer than recomputing the products
        W, WX, AA, BB = _q3_terms(X, LL)
        cols, sx, s2, ptr, sweep = cols[idx], sx[idx], s2[idx], ptr[idx], sweep[idx]
        alive = None


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    # element 128a + 32b + t -> byte 32a + t, bits 2b..2b+1 (Q2_K qs, Q3_K qs)
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)


def _requant(L, xs, D, Dm, lo, hi, offset=0):
    """Re-quantize each sub-block column with its stored scale D (and min Dm); where D == 0 the
    search levels stay (the C `if (!d) continue;`)."""
    new = np.clip(_nearest_int((xs + Dm) / D if Dm is not None else xs / D), lo, hi) + offset
    return np.where(D != 0, new, L.astype(np.int32))


def _le16(h: np.ndarray) -> np.ndarray:
    return h.astype("<f2").view(np.uint8).reshape(-1, 2)


def _q2_k_blocks(x: np.ndarray) -> np.ndarray:
    # ggml-quants.c quantize_row_q2_K_ref
    nb = x.shape[0]
    xs = _subblocks(x, 16)
    scales, mins, L = _make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    s, m = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale, max_min = np.maximum(s.max(1), 0), np.maximum(m.max(1), 0)
    has_s, has_m = max_scale > 0, max_min > 0
    # uint8 stores: scale code in the low nibble, min code OR-ed in as l << 4, both wrap mod 256
    sc = np.where(has_s[:, None], _nearest_int((f32(15) / max_scale)[:, None] * s) & 0xFF, 0)
    mc = np.where(has_m[:, None], _nearest_int((f32(15) / max_min)[:, None] * m), 0)
    byte = (sc | mc << 4) & 0xFF
    d16, d = _fp16(np.where(has_s, max_scale / f32(15), f32(0)))
    m16, dm = _fp16(np.where(has_m, max_min / f32(15), f32(0)))
    D = (d[:, None] * (byte & 15).astype(f32)).reshape(-1)
    Dm = (dm[:, None] * (byte >> 4).astype(f32)).reshape(-1)
    Lq = _rows(_requant(L, xs, D, Dm, 0, 3), nb)
    return np.concatenate([byte.astype(np.uint8), _pack_2bit(Lq).astype(np.uint8), _le16(d16),
                           _le16(m16)], axis=1)


def _q3_k_blocks(x: np.ndarray) -> np.ndarray:
    # ggml-quants.c quantize_row_q3_K_ref
    nb = x.shape[0]
    xs = _subblocks(x, 16)
    scales, L = _make_q3_quants(xs)
    s = scales.reshape(nb, 16)
    j = np.abs(s).argmax(1)
    max_scale = s[np.arange(nb), j]
    has = max_scale != 0
    iscale = f32(-32) / max_scale
    c = np.where(has[:, None], np.clip(_nearest_int(iscale[:, None] * s), -32, 31) + 32, 0)
    d16, d = _fp16(np.where(has, f32(1) / iscale, f32(0)))
    D = (d[:, None] * (c - 32).astype(f32)).reshape(-1)
    Lq = _rows(_requant(L, xs, D, None, -4, 3, 4), nb)
    hmask = ((Lq.reshape(nb, 8, 32) > 3).astype(np.int32) << np.arange(8)[:, None]).sum(1)
    sc = np.concatenate([c[:, :8] & 15 | (c[:, 8:] & 15) << 4,
                         ((c.reshape(nb, 4, 4) >> 4) << (2 * np.arange(4))[:, None]).sum(1)], axis=1)
    return np.concatenate([hmask.astype(np.uint8), _pack_2bit(Lq & 3).astype(np.uint8),
                           sc.astype(np.uint8), _le16(d16)], axis=1)


def _q45_k_blocks(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    # ggml-quants.c quantize_row_q4_K_ref / quantize_row_q5_K_ref (shared up to the level packing)
    nb = x.shape[0]
    xs = _subblocks(x, 32)
    av_x = np.sqrt(_sum(xs * xs) / f32(32))
    scales, mins, L = _make_qkx2_quants(xs, av_x + np.abs(xs), nmax, rmin, 0.1, nstep, False)
    s, m = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = np.maximum(s.max(1), 0), np.maximum(m.max(1), 0)
    inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
    inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * s) & 0xFF, 63)  # uint8 store, then MIN(63, .)
    lm = np.minimum(_nearest_int(inv_min[:, None] * m) & 0xFF, 63)
    d16, d = _fp16(max_scale / f32(63))
    m16, dm = _fp16(max_min / f32(63))
    D = (d[:, None] * ls.astype(f32)).reshape(-1)
    Dm = (dm[:, None] * lm.astype(f32)).reshape(-1)
    Lq = _rows(_requant(L, xs, D, Dm, 0, nmax), nb)
    # 12-byte (scale, min) packing, the inverse of get_scale_min_k4
    sc = np.concatenate([ls[:, :4] | (ls[:, 4:] >> 4) << 6, lm[:, :4] | (lm[:, 4:] >> 4) << 6,
                         ls[:, 4:] & 15 | (lm[:, 4:] & 15) << 4], axis=1)
    head = np.concatenate([_le16(d16), _le16(m16), sc.astype(np.uint8)], axis=1)
    q = Lq.reshape(nb, 4, 2, 32)  # element 64c + 32h + t -> qs[32c + t], nibble h
    qs = ((q[:, :, 0] & 15) | (q[:, :, 1] & 15) << 4).reshape(nb, 128).astype(np.uint8)
    return head, q, qs


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    head, _, qs = _q45_k_blocks(x, 15, -1.0, 20)
    return np.concatenate([head, qs], axis=1)


def _q5_k_blocks(x: np.ndarray) -> np.ndarray:
    head, q, qs = _q45_k_blocks(x, 31, -0.5, 15)
    # bit 4 of element 64c + 32h + t -> qh[t], bit 2c + h
    qh = ((q >> 4).reshape(-1, 8, 32) << np.arange(8)[:, None]).sum(1).astype(np.uint8)
    return np.concatenate([head, qh, qs], axis=1)


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    # ggml-quants.c quantize_row_q6_K_ref
    nb = x.shape[0]
    xs = _subblocks(x, 16)
    scales, L = _make_qx_quants(xs, 32)
    s = scales.reshape(nb, 16)
    j = np.abs(s).argmax(1)
    max_scale = s[np.arange(nb), j]
    zero = np.abs(max_scale) < _GROUP_MAX_EPS  # whole block -> 210 zero bytes
    iscale = f32(-128) / max_scale
    sc = np.minimum(127, _nearest_int(iscale[:, None] * s)).astype(np.int8)  # int8 store wraps
    sc[zero] = 0
    d16, d = _fp16(np.where(zero, f32(0), f32(1) / iscale))
    D = (d[:, None] * sc.astype(f32)).reshape(-1)
    Lq = _rows(_requant(L, xs, D, None, -32, 31, 32), nb)
    Lq[zero] = 0
    q = Lq.reshape(nb, 2, 4, 32)  # element 128a + 32b + t
    ql = (q[:, :, 0:2] & 15 | (q[:, :, 2:4] & 15) << 4).reshape(nb, 128)
    qh = ((q >> 4) << (2 * np.arange(4))[:, None]).sum(2).reshape(nb, 64)
    return np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), sc.view(np.uint8), _le16(d16)],
                          axis=1)


def _quantize(a, type_size: int, blocks, chunk: int = _CHUNK) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 0 or a.shape[-1] % QK_K:
        raise ValueError(f"K-quants need a last dimension that is a multiple of {QK_K}, got shape {a.shape}")
    if a.dtype != f32:
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"K-quants take a float array, got {a.dtype}")
        a = a.astype(f32)  # f16 -> f32 is exact, as in llama-quantize
    flat = np.ascontiguousarray(a).reshape(-1, QK_K)
    out = np.empty((flat.shape[0], type_size), np.uint8)
    with np.errstate(all="ignore"):  # masked-out lanes (flat blocks, D <= 0) divide by zero
        for i in range(0, flat.shape[0], chunk):
            x = flat[i:i + chunk]
            if not np.isfinite(x).all():
                raise ValueError("K-quants need finite input (found inf or nan)")
            out[i:i + chunk] = blocks(x)
    return out.reshape(*a.shape[:-1], a.shape[-1] // QK_K * type_size)


def quantize_q2_k(a: np.ndarray) -> np.ndarray:
    """Q2_K blocks (84 bytes per 256 values) of a float array whose last dim is a multiple of 256."""
    return _quantize(a, 84, _q2_k_blocks)


def quantize_q3_k(a: np.ndarray) -> np.ndarray:
    """Q3_K blocks (110 bytes per 256 values), as quantize_row_q3_K_ref."""
    return _quantize(a, 110, _q3_k_blocks, _CHUNK_Q3)


def quantize_q4_k(a: np.ndarray) -> np.ndarray:
    """Q4_K blocks (144 bytes per 256 values), as quantize_row_q4_K_ref."""
    return _quantize(a, 144, _q4_k_blocks)


def quantize_q5_k(a: np.ndarray) -> np.ndarray:
    """Q5_K blocks (176 bytes per 256 values), as quantize_row_q5_K_ref."""
    return _quantize(a, 176, _q5_k_blocks)


def quantize_q6_k(a: np.ndarray) -> np.ndarray:
    """Q6_K blocks (210 bytes per 256 values), as quantize_row_q6_K_ref."""
    return _quantize(a, 210, _q6_k_blocks)
