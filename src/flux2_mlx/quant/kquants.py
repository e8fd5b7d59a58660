"""llama.cpp's reference K-quant quantizers (Q2_K..Q6_K), byte-identical to ggml-quants.c
`quantize_row_qN_K_ref` (no importance matrix) as built for x86-64 without FMA. Imports numpy and numba.

Hand-written because gguf-py has no K-quant quantizer; compiled with numba because the scale searches are
data-dependent scalar loops (Q3_K's descent exits early per sub-block) that numpy runs at a fraction of C's
speed. Exactness rules (why: docs/quantization.md, 'Byte-exact K-quant quantizers'): every operation is
float32 in the C evaluation order with no FMA (numba, like gcc -O3 without -ffast-math, neither contracts
nor reorders); sums are sequential; nearest_int is the C bit trick; re-quantization uses the fp16-rounded
d/dmin. Integers and float64 literals would promote float32 to float64 in numba, hence the f32() casts.
The kernels release the GIL, so threads quantize row ranges in parallel (quant/jit.py: compile settings).
"""

from __future__ import annotations

import numpy as np

from .jit import f32, fp16, inline, kernel, nint

__all__ = ["QK_K", "quantize_q2_k", "quantize_q3_k", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k"]

QK_K = 256
CHUNK_BLOCKS = 4096  # super-blocks per kernel call between the finiteness checks (4 MB of float32)
# super-blocks searched in lockstep; their (n, sub-blocks) rows stay in L2, off 4 KB strides (L1 sets)
_GROUP = 60
_EPS = f32(1e-15)  # ggml-quants.c GROUP_MAX_EPS


@inline
def _put16(out, k, h):
    out[k] = h & 0xFF
    out[k + 1] = h >> 8


@inline
def _level(v, lo, hi):
    # nearest_int, then clamp, in float32: search values stay far below 2^22, where rint == nearest_int
    return min(max(np.rint(v), lo), hi)


@kernel
def _lanes(x, n):
    """(nb, 256) -> (n, G), sub-block g (n consecutive values) in column g. The searches run all
    sub-blocks in lockstep along G, which the compiler vectorises; each column's sums stay sequential."""
    per = QK_K // n
    xs = np.empty((n, x.shape[0] * per), f32)
    for b in range(x.shape[0]):
        for j in range(per):
            for i in range(n):
                xs[i, per * b + j] = x[b, n * j + i]
    return xs


@inline
def _block_levels(L, b, n, q):
    """Search levels (float32 lanes) of super-block b -> q[256] int."""
    per = QK_K // n
    for j in range(per):
        for i in range(n):
            q[n * j + i] = np.int64(L[i, per * b + j])


@inline
def _max0(v):
    m = f32(0)  # the C scan from 0 with a strict `>`: the result is +0.0, never -0.0
    for i in range(v.size):
        if v[i] > m:
            m = v[i]
    return m


@inline
def _signed_max(v):
    """The first value of largest |v|, with its sign (the C `if (ax > amax)` scan from 0), and |it|."""
    vmax, amax = f32(0), f32(0)
    for i in range(v.size):
        if abs(v[i]) > amax:
            amax = abs(v[i])
            vmax = v[i]
    return vmax, amax


@kernel
def _signed_absmax(xs):
    """Per column: the first value of largest |x| with its sign (the C `if (ax > amax)` scan), and |it|."""
    vmax, amax = np.zeros(xs.shape[1], f32), np.zeros(xs.shape[1], f32)
    for i in range(xs.shape[0]):
        for g in range(xs.shape[1]):
            ax = abs(xs[i, g])
            if ax > amax[g]:
                amax[g] = ax
                vmax[g] = xs[i, g]
    return vmax, amax


@kernel
def _make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants on every column of xs (n, G): weighted asymmetric grid search.
    Returns (scale, min, L) with x ~ scale*L - min, L float32 in [0, nmax]."""
    n, G = xs.shape
    z, fmax = f32(0), f32(nmax)
    lo, hi = xs[0].copy(), xs[0].copy()
    sum_w, sum_x = np.zeros(G, f32), np.zeros(G, f32)
    for i in range(n):
        for g in range(G):
            lo[g] = min(lo[g], xs[i, g])
            hi[g] = max(hi[g], xs[i, g])
            sum_w[g] += w[i, g]
            sum_x[g] += w[i, g] * xs[i, g]
    isc, scale, m, best = np.empty(G, f32), np.empty(G, f32), np.empty(G, f32), np.zeros(G, f32)
    best_isc, best_m = np.empty(G, f32), np.empty(G, f32)  # the best levels are recomputed from these
    for g in range(G):
        lo[g] = min(lo[g], z)  # `if (min > 0) min = 0`
        isc[g] = fmax / (hi[g] - lo[g])  # inf for flat columns, which the end resets
        scale[g] = f32(1) / isc[g]
        m[g] = best_m[g] = lo[g]
        best_isc[g] = isc[g]
    for i in range(n):
        for g in range(G):
            diff = scale[g] * _level(isc[g] * (xs[i, g] - m[g]), z, fmax) + m[g] - xs[i, g]
            best[g] += w[i, g] * (abs(diff) if use_mad else diff * diff)
    Laux = np.empty((n, G), f32)
    sl, sl2, sxl, cur = np.empty(G, f32), np.empty(G, f32), np.empty(G, f32), np.empty(G, f32)
    D, ts, tm = np.empty(G, f32), np.empty(G, f32), np.empty(G, f32)
    for k in range(nstep + 1):
        num = rmin + rdelta * f32(k) + fmax
        for g in range(G):
            isc[g] = num / (hi[g] - m[g])  # m: the best min so far
            sl[g] = sl2[g] = sxl[g] = cur[g] = z
        for i in range(n):
            for g in range(G):
                lv = _level(isc[g] * (xs[i, g] - m[g]), z, fmax)
                Laux[i, g] = lv
                wl = w[i, g] * lv
                sl[g] += wl
                sl2[g] += wl * lv
                sxl[g] += wl * xs[i, g]
        for g in range(G):
            D[g] = sum_w[g] * sl2[g] - sl[g] * sl[g]
            ts[g] = (sum_w[g] * sxl[g] - sum_x[g] * sl[g]) / D[g]
            tm[g] = (sl2[g] * sum_x[g] - sl[g] * sxl[g]) / D[g]
            if tm[g] > 0:  # refit through the origin
                tm[g] = z
                ts[g] = sxl[g] / sl2[g]
        for i in range(n):
            for g in range(G):
                diff = ts[g] * Laux[i, g] + tm[g] - xs[i, g]
                cur[g] += w[i, g] * (abs(diff) if use_mad else diff * diff)
        for g in range(G):
            if D[g] > 0 and cur[g] < best[g]:
                best[g] = cur[g]
                best_isc[g] = isc[g]
                best_m[g] = m[g]
                scale[g] = ts[g]
                m[g] = tm[g]
    L = np.empty((n, G), f32)
    for i in range(n):
        for g in range(G):
            L[i, g] = _level(best_isc[g] * (xs[i, g] - best_m[g]), z, fmax)
    for g in range(G):
        if hi[g] == lo[g]:  # all-zero or constant <= 0: C returns before the search
            scale[g], m[g] = z, lo[g]
            L[:, g] = z
    return scale, -m, L


@kernel
def _make_qx_quants(xs, nmax):
    """make_qx_quants, rmse_type 1, no imatrix, on every column: symmetric search over 19 steps.
    Returns (signed scale, L float32 in [0, 2*nmax-1]); all-zero columns give scale 0 and L = 0."""
    n, G = xs.shape
    fmax, lo, hi = f32(nmax), f32(-nmax), f32(nmax - 1)
    vmax, amax = _signed_absmax(xs)
    w = xs * xs
    wx = w * xs
    isc, best_isc, scale, best = np.empty(G, f32), np.empty(G, f32), np.empty(G, f32), np.empty(G, f32)
    sumlx, suml2 = np.zeros(G, f32), np.zeros(G, f32)
    for k in range(-10, 10):  # -10: the first guess -nmax/max; then -9..-1, 1..9
        if k == 0:
            continue
        for g in range(G):
            isc[g] = -fmax / vmax[g] if k == -10 else -(fmax + f32(0.1) * f32(k)) / vmax[g]
            sumlx[g] = suml2[g] = f32(0)
        for i in range(n):
            for g in range(G):
                lv = _level(isc[g] * xs[i, g], lo, hi)
                sumlx[g] += wx[i, g] * lv
                suml2[g] += w[i, g] * lv * lv
        for g in range(G):
            if k == -10:
                best_isc[g] = isc[g]
                scale[g] = sumlx[g] / suml2[g] if suml2[g] != 0 else f32(0)
                best[g] = scale[g] * sumlx[g]
            elif suml2[g] > 0 and sumlx[g] * sumlx[g] > best[g] * suml2[g]:
                best_isc[g] = isc[g]
                scale[g] = sumlx[g] / suml2[g]
                best[g] = scale[g] * sumlx[g]
    L = np.empty((n, G), f32)
    for i in range(n):
        for g in range(G):
            L[i, g] = _level(best_isc[g] * xs[i, g], lo, hi) + fmax
    for g in range(G):
        if amax[g] < _EPS:
            scale[g] = f32(0)
            L[:, g] = f32(0)
    return scale, L


@kernel
def _make_q3_quants(xs):
    """make_q3_quants with do_rmse (nmax 4) on every column: first guess at -4/max in lockstep, then up to
    5 sweeps of coordinate descent per sub-block (scalar: it exits early). Returns (signed scale,
    L float32 in [0, 7])."""
    n, G = xs.shape
    vmax, amax = _signed_absmax(xs)
    isc = f32(-4) / vmax
    L = np.empty((n, G), f32)
    sumlx, suml2, scale = np.zeros(G, f32), np.zeros(G, f32), np.zeros(G, f32)
    for i in range(n):
        for g in range(G):
            x = xs[i, g]
            lv = _level(isc[g] * x, f32(-4), f32(3))
            L[i, g] = lv
            w = x * x
            sumlx[g] += w * x * lv
            suml2[g] += w * lv * lv
    xg, lg = np.empty(n, f32), np.empty(n, f32)  # one column, contiguous for the scalar descent
    for g in range(G):
        if amax[g] < _EPS:
            L[:, g] = f32(0)
            continue
        if vmax[g] > 0:  # every x*l <= 0, so no sweep can pass `slx > 0`: the first guess stands
            scale[g] = sumlx[g] / suml2[g] if suml2[g] > 0 else f32(0)
            for i in range(n):
                L[i, g] += f32(4)
            continue
        for i in range(n):
            xg[i], lg[i] = xs[i, g], L[i, g]
        sx, s2 = sumlx[g], suml2[g]
        for _ in range(5):
            changed = False
            for i in range(n):
                x, lv = xg[i], lg[i]
                w = x * x
                slx = sx - w * x * lv
                if slx > 0:
                    sl2 = s2 - w * lv * lv
                    new = f32(min(max(nint(x * sl2 / slx), -4), 3))
                    if new != lv:
                        slx += w * x * new
                        sl2 += w * new * new
                        if sl2 > 0 and slx * slx * s2 > sx * sx * sl2:
                            lg[i] = new
                            sx, s2 = slx, sl2
                            changed = True
            if not changed:
                break
        scale[g] = sx / s2 if s2 > 0 else f32(0)
        for i in range(n):
            L[i, g] = lg[i] + f32(4)
    return scale, L


@kernel
def _q2_k(x, out):
    # ggml-quants.c quantize_row_q2_K_ref
    q = np.empty(QK_K, np.int64)
    sc = np.empty(16, np.int64)
    for b0 in range(0, x.shape[0], _GROUP):
        xs = _lanes(x[b0:b0 + _GROUP], 16)
        s, mn, L = _make_qkx2_quants(xs, np.abs(xs), 3, f32(-0.5), f32(0.1), 15, True)
        for b in range(xs.shape[1] // 16):
            o, xb, s_, mn_ = out[b0 + b], x[b0 + b], s[16 * b:16 * b + 16], mn[16 * b:16 * b + 16]
            _block_levels(L, b, 16, q)
            max_scale, max_min = _max0(s_), _max0(mn_)
            d = dmin = f32(0)
            hd = hm = 0
            sc[:] = 0
            if max_scale > 0:
                iscale = f32(15) / max_scale
                for j in range(16):
                    sc[j] = nint(iscale * s_[j]) & 0xFF  # uint8 store
                hd, d = fp16(max_scale / f32(15))
            if max_min > 0:
                iscale = f32(15) / max_min
                for j in range(16):
                    sc[j] = (sc[j] | nint(iscale * mn_[j]) << 4) & 0xFF
                hm, dmin = fp16(max_min / f32(15))
            for j in range(16):
                o[j] = sc[j]
                D = d * f32(sc[j] & 15)
                if D == 0:
                    continue  # keeps the search levels
                Dm = dmin * f32(sc[j] >> 4)
                for i in range(16 * j, 16 * j + 16):
                    q[i] = min(max(nint((xb[i] + Dm) / D), 0), 3)
            for a in range(2):  # element 128a + 32b + t -> qs[32a + t], bits 2b
                for t in range(32):
                    e = 128 * a + t
                    o[16 + 32 * a + t] = q[e] | q[e + 32] << 2 | q[e + 64] << 4 | q[e + 96] << 6
            _put16(o, 80, hd)
            _put16(o, 82, hm)


@kernel
def _q3_k(x, out):
    # ggml-quants.c quantize_row_q3_K_ref
    q = np.empty(QK_K, np.int64)
    c = np.empty(16, np.int64)
    for b0 in range(0, x.shape[0], _GROUP):
        xs = _lanes(x[b0:b0 + _GROUP], 16)
        s, L = _make_q3_quants(xs)
        for b in range(xs.shape[1] // 16):
            o, xb, s_ = out[b0 + b], x[b0 + b], s[16 * b:16 * b + 16]
            _block_levels(L, b, 16, q)
            max_scale = _signed_max(s_)[0]
            c[:] = 0
            d = f32(0)
            hd = 0
            if max_scale != 0:
                iscale = f32(-32) / max_scale
                for j in range(16):
                    c[j] = min(max(nint(iscale * s_[j]), -32), 31) + 32
                hd, d = fp16(f32(1) / iscale)
            for j in range(16):
                D = d * f32(c[j] - 32)
                if D == 0:
                    continue
                for i in range(16 * j, 16 * j + 16):
                    q[i] = min(max(nint(xb[i] / D), -4), 3) + 4
            for t in range(32):  # high bit of element 32m + t -> hmask[t], bit m
                h = 0
                for m in range(8):
                    h |= (q[32 * m + t] >> 2) << m
                o[t] = h
            for a in range(2):  # low 2 bits: element 128a + 32b + t -> qs[32a + t], bits 2b
                for t in range(32):
                    e = 128 * a + t
                    o[32 + 32 * a + t] = (q[e] & 3) | (q[e + 32] & 3) << 2 | (q[e + 64] & 3) << 4 | (
                        q[e + 96] & 3) << 6
            for j in range(8):
                o[96 + j] = (c[j] & 15) | (c[j + 8] & 15) << 4
            for k in range(4):
                o[104 + k] = (c[k] >> 4) | (c[k + 4] >> 4) << 2 | (c[k + 8] >> 4) << 4 | (c[k + 12] >> 4) << 6
            _put16(o, 108, hd)


@kernel
def _q45_k(x, out, nmax, rmin, nstep):
    """quantize_row_q4_K_ref (nmax 15) and quantize_row_q5_K_ref (nmax 31): shared up to the packing."""
    q = np.empty(QK_K, np.int64)
    ls, lm = np.empty(8, np.int64), np.empty(8, np.int64)
    for b0 in range(0, x.shape[0], _GROUP):
        xs = _lanes(x[b0:b0 + _GROUP], 32)
        sum_x2 = np.zeros(xs.shape[1], f32)
        for i in range(32):
            for g in range(xs.shape[1]):
                sum_x2[g] += xs[i, g] * xs[i, g]
        av_x = np.sqrt(sum_x2 / f32(32))
        w = np.empty_like(xs)
        for i in range(32):
            for g in range(xs.shape[1]):
                w[i, g] = av_x[g] + abs(xs[i, g])
        s, mn, L = _make_qkx2_quants(xs, w, nmax, rmin, f32(0.1), nstep, False)
        for b in range(xs.shape[1] // 8):
            o, xb, s_, mn_ = out[b0 + b], x[b0 + b], s[8 * b:8 * b + 8], mn[8 * b:8 * b + 8]
            _block_levels(L, b, 32, q)
            max_scale, max_min = _max0(s_), _max0(mn_)
            inv_scale = f32(63) / max_scale if max_scale > 0 else f32(0)
            inv_min = f32(63) / max_min if max_min > 0 else f32(0)
            for j in range(8):
                ls[j] = min(nint(inv_scale * s_[j]) & 0xFF, 63)  # uint8 store, then MIN(63, .)
                lm[j] = min(nint(inv_min * mn_[j]) & 0xFF, 63)
            hd, d = fp16(max_scale / f32(63))
            hm, dmin = fp16(max_min / f32(63))
            for j in range(8):
                D = d * f32(ls[j])
                if D == 0:
                    continue
                Dm = dmin * f32(lm[j])
                for i in range(32 * j, 32 * j + 32):
                    q[i] = min(max(nint((xb[i] + Dm) / D), 0), nmax)
            _put16(o, 0, hd)
            _put16(o, 2, hm)
            for j in range(4):  # the 12-byte (scale, min) packing, the inverse of get_scale_min_k4
                o[4 + j] = ls[j] | (ls[j + 4] >> 4) << 6
                o[8 + j] = lm[j] | (lm[j + 4] >> 4) << 6
                o[12 + j] = (ls[j + 4] & 15) | (lm[j + 4] & 15) << 4
            qs = 16 if nmax == 15 else 48  # Q5_K puts qh[32] before qs
            if nmax == 31:
                o[16:48] = 0
            # element 64c + 32h + t -> qs[32c + t] nibble h; Q5_K's bit 4 -> qh[t] bit 2c+h
            for cc in range(4):
                for t in range(32):
                    lo, hi = q[64 * cc + t], q[64 * cc + 32 + t]
                    o[qs + 32 * cc + t] = (lo & 15) | (hi & 15) << 4
                    if nmax == 31:
                        o[16 + t] |= (lo >> 4) << (2 * cc) | (hi >> 4) << (2 * cc + 1)


@kernel
def _q6_k(x, out):
    # ggml-quants.c quantize_row_q6_K_ref
    q = np.empty(QK_K, np.int64)
    for b0 in range(0, x.shape[0], _GROUP):
        xs = _lanes(x[b0:b0 + _GROUP], 16)
        s, L = _make_qx_quants(xs, 32)
        for b in range(xs.shape[1] // 16):
            o, xb, s_ = out[b0 + b], x[b0 + b], s[16 * b:16 * b + 16]
            _block_levels(L, b, 16, q)
            max_scale, amax = _signed_max(s_)
            if amax < _EPS:
                o[:] = 0  # the whole block is zero
                continue
            iscale = f32(-128) / max_scale
            hd, d = fp16(f32(1) / iscale)
            for j in range(16):
                sc = min(127, nint(iscale * s_[j]))
                sc = ((sc + 128) & 0xFF) - 128  # int8 store
                o[192 + j] = sc & 0xFF
                D = d * f32(sc)
                if D == 0:
                    continue
                for i in range(16 * j, 16 * j + 16):
                    q[i] = min(max(nint(xb[i] / D), -32), 31) + 32
            for a in range(2):  # element 128a + 32b + t: low nibbles to ql, top 2 bits to qh[32a + t]
                for t in range(32):
                    e = 128 * a + t
                    l0, l1, l2, l3 = q[e], q[e + 32], q[e + 64], q[e + 96]
                    o[64 * a + t] = (l0 & 15) | (l2 & 15) << 4
                    o[64 * a + 32 + t] = (l1 & 15) | (l3 & 15) << 4
                    o[128 + 32 * a + t] = (l0 >> 4) | (l1 >> 4) << 2 | (l2 >> 4) << 4 | (l3 >> 4) << 6
            _put16(o, 208, hd)


def _quantize(a, type_size: int, kernel, *args) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 0 or a.shape[-1] % QK_K:
        raise ValueError(f"K-quants need a last dimension that is a multiple of {QK_K}, got shape {a.shape}")
    if a.dtype != f32:
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"K-quants take a float array, got {a.dtype}")
        a = a.astype(f32)  # f16 -> f32 is exact, as in llama-quantize
    flat = np.ascontiguousarray(a).reshape(-1, QK_K)
    out = np.empty((flat.shape[0], type_size), np.uint8)
    for i in range(0, flat.shape[0], CHUNK_BLOCKS):
        x = flat[i:i + CHUNK_BLOCKS]
        if not np.isfinite(x).all():
            raise ValueError("K-quants need finite input (found inf or nan)")
        kernel(x, out[i:i + CHUNK_BLOCKS], *args)
    return out.reshape(*a.shape[:-1], a.shape[-1] // QK_K * type_size)


def quantize_q2_k(a: np.ndarray) -> np.ndarray:
    """Q2_K blocks (84 bytes per 256 values) of a float array whose last dim is a multiple of 256."""
    return _quantize(a, 84, _q2_k)


def quantize_q3_k(a: np.ndarray) -> np.ndarray:
    """Q3_K blocks (110 bytes per 256 values), as quantize_row_q3_K_ref."""
    return _quantize(a, 110, _q3_k)


def quantize_q4_k(a: np.ndarray) -> np.ndarray:
    """Q4_K blocks (144 bytes per 256 values), as quantize_row_q4_K_ref."""
    return _quantize(a, 144, _q45_k, 15, f32(-1.0), 20)


def quantize_q5_k(a: np.ndarray) -> np.ndarray:
    """Q5_K blocks (176 bytes per 256 values), as quantize_row_q5_K_ref."""
    return _quantize(a, 176, _q45_k, 31, f32(-0.5), 15)


def quantize_q6_k(a: np.ndarray) -> np.ndarray:
    """Q6_K blocks (210 bytes per 256 values), as quantize_row_q6_K_ref."""
    return _quantize(a, 210, _q6_k)
