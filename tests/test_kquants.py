"""K-quant quantizers (quant/kquants.py): byte identity with llama.cpp's C reference, gguf-py decode
error bounds, edge cases, shapes, determinism.

The C reference is ggml-quants.c from the llama-cpp-python sdist on PyPI (vendor/llama.cpp), fetched
with `pip download` once into the pytest cache and compiled with gcc like llama.cpp's x86 ggml-base
(-O3 -DNDEBUG, no FMA). No network or no gcc is a test failure, not a skip.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from flux2_mlx.quant import jit, kquants

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # vendors llama.cpp's ggml-quants.c
TYPES = {  # name: (quantizer, gguf type, bytes per 256 values, max relRMS on N(0, 0.02))
    "Q2_K": (kquants.quantize_q2_k, T.Q2_K, 84, 0.305),
    "Q3_K": (kquants.quantize_q3_k, T.Q3_K, 110, 0.155),
    "Q4_K": (kquants.quantize_q4_k, T.Q4_K, 144, 0.074),
    "Q5_K": (kquants.quantize_q5_k, T.Q5_K, 176, 0.038),
    "Q6_K": (kquants.quantize_q6_k, T.Q6_K, 210, 0.019),
}

HARNESS_C = r"""
// Reads float32 values from argv[2], runs quantize_row_<argv[1]>_ref over all of them, writes the blocks
// to argv[3]. With argv[4] = R, repeats the call R times and prints the best wall time in seconds.
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define GGML_COMMON_DECL_C
#include "ggml-common.h"
#include "ggml-quants.h"

void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "ggml_abort %s:%d\n", file, line); abort();
}
// ggml.c symbols referenced elsewhere in ggml-quants.c; the _ref quantizers never call them
size_t ggml_type_size(enum ggml_type type) { (void) type; abort(); }
size_t ggml_row_size(enum ggml_type type, int64_t ne) { (void) type; (void) ne; abort(); }
const char * ggml_type_name(enum ggml_type type) { (void) type; return "?"; }

typedef void (*quant_fn)(const float *, void *, int64_t);

int main(int argc, char ** argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s q4_K in.f32 out.bin [repeats]\n", argv[0]); return 2; }
    quant_fn fn; size_t bs;
    switch (argv[1][1]) {
        case '2': fn = (quant_fn) quantize_row_q2_K_ref; bs = sizeof(block_q2_K); break;
        case '3': fn = (quant_fn) quantize_row_q3_K_ref; bs = sizeof(block_q3_K); break;
        case '4': fn = (quant_fn) quantize_row_q4_K_ref; bs = sizeof(block_q4_K); break;
        case '5': fn = (quant_fn) quantize_row_q5_K_ref; bs = sizeof(block_q5_K); break;
        case '6': fn = (quant_fn) quantize_row_q6_K_ref; bs = sizeof(block_q6_K); break;
        default: fprintf(stderr, "unknown type %s\n", argv[1]); return 2;
    }
    FILE * f = fopen(argv[2], "rb");
    if (!f) { perror(argv[2]); return 1; }
    fseek(f, 0, SEEK_END); long nbytes = ftell(f); fseek(f, 0, SEEK_SET);
    int64_t n = nbytes / 4;
    float * x = malloc(nbytes > 0 ? nbytes : 1);
    if (fread(x, 4, n, f) != (size_t) n) { perror("fread"); return 1; }
    fclose(f);
    size_t out_size = (size_t) (n / QK_K) * bs;
    void * y = malloc(out_size > 0 ? out_size : 1);
    int repeats = argc > 4 ? atoi(argv[4]) : 1;
    double best = 1e30;
    for (int r = 0; r < repeats; ++r) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        fn(x, y, n);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
        if (s < best) best = s;
    }
    if (argc > 4) printf("%.6f\n", best);
    f = fopen(argv[3], "wb");
    if (!f || fwrite(y, 1, out_size, f) != out_size) { perror(argv[3]); return 1; }
    fclose(f);
    return 0;
}
"""

_NEEDED = ("include/", "src/ggml-common.h", "src/ggml-impl.h", "src/ggml-quants.c", "src/ggml-quants.h",
           "src/ggml-cpu/ggml-cpu-impl.h")


def _fetch_ggml_sources(dest: Path) -> Path:
    """ggml/ (include/ + the few src/ files ggml-quants.c needs) from the llama-cpp-python sdist."""
    if (dest / "src" / "ggml-quants.c").exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
               LLAMA_CPP_PYTHON]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            pytest.fail(f"could not download the llama.cpp C reference ({' '.join(cmd)}); this test needs "
                        f"PyPI access once (result is cached in .pytest_cache):\n{proc.stderr[-2000:]}")
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                _, _, rel = member.name.partition("/vendor/llama.cpp/ggml/")
                if member.isfile() and rel.startswith(_NEEDED):
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
        staging.rename(dest)
    return dest


def build_reference(cache_dir: Path) -> Path:
    """Compile the harness against llama.cpp's ggml-quants.c; returns the executable (cached)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    exe = cache_dir / "kquants_ref"
    if exe.exists():
        return exe
    ggml = _fetch_ggml_sources(cache_dir / "ggml")
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build llama.cpp's C reference quantizers (apt-get install gcc)")
    harness = cache_dir / "harness.c"
    harness.write_text(HARNESS_C)
    # llama.cpp's x86 ggml-base flags; -ffp-contract=off keeps other architectures FMA-free too
    cmd = ["gcc", "-O3", "-DNDEBUG", "-std=gnu11", "-ffp-contract=off", f"-I{ggml / 'include'}",
           f"-I{ggml / 'src'}", str(ggml / "src" / "ggml-quants.c"), str(harness), "-o", str(exe) + ".tmp",
           "-lm"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"compiling llama.cpp's ggml-quants.c failed:\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    Path(str(exe) + ".tmp").rename(exe)
    return exe


def run_reference(exe: Path, name: str, x: np.ndarray, repeats: int = 0) -> tuple[np.ndarray, float | None]:
    """(bytes reshaped like ours, best seconds if repeats) from the C reference."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "x.f32", Path(tmp) / "y.bin"
        np.ascontiguousarray(x, np.float32).tofile(src)
        args = [str(exe), name.lower().replace("_k", "_K"), str(src), str(dst)]
        proc = subprocess.run(args + ([str(repeats)] if repeats else []), capture_output=True, text=True,
                              check=True)
        raw = np.fromfile(dst, np.uint8)
    return raw.reshape(*x.shape[:-1], -1), (float(proc.stdout) if repeats else None)


@pytest.fixture(scope="session")
def reference(pytestconfig) -> Path:
    return build_reference(Path(pytestconfig.cache.mkdir("kquants-c-reference")))


def datasets() -> dict[str, np.ndarray]:
    """Random and edge-case float32 data (ties; zero, constant, outlier, tiny blocks), 4096-wide rows."""
    rng = np.random.default_rng(1234)
    gauss = (0.02 * rng.standard_normal((96, 4096))).astype(np.float32)
    edge = (0.02 * rng.standard_normal((64, 4096))).astype(np.float32)
    blocks = edge.reshape(-1, 256)  # 1024 super-blocks, each altered differently
    for i, b in enumerate(blocks):
        kind = i % 16
        if kind == 0:
            b[:] = 0  # zero super-block
        elif kind == 1:
            b[16 * (i % 16):16 * (i % 16) + 16] = 0  # one zero 16-sub-block
        elif kind == 2:
            b[32 * (i % 8):32 * (i % 8) + 32] = 0.05  # constant positive 32-sub-block
        elif kind == 3:
            b[32 * (i % 8):32 * (i % 8) + 32] = -0.05  # constant negative 32-sub-block
        elif kind == 4:
            b[i % 256] = 50.0  # single huge outlier
        elif kind == 5:
            b[i % 256] = -50.0
        elif kind == 6:
            b *= 1e-4
        elif kind == 7:
            b[:] = 0.3  # constant super-block
        elif kind == 8:
            b[:] = -np.abs(b)  # negative only
        elif kind == 9:
            b[:] = np.abs(b)  # positive only
        elif kind == 10:
            b[:] = 0
            b[i % 256] = 1e-3  # one nonzero element
        elif kind == 11:
            b *= 3e-6  # fp16 d/dmin underflow
    return {
        "gauss": gauss,
        "bf16": (gauss.view(np.uint32) + 0x8000 & 0xFFFF0000).view(np.float32)[:48],
        "student_t": (0.01 * rng.standard_t(3, (48, 4096))).astype(np.float32),
        "uniform_pos": rng.random((32, 4096), dtype=np.float32),
        "ints_ties": rng.integers(-8, 9, (32, 4096)).astype(np.float32),
        "tiny_1e-6": (1e-6 * rng.standard_normal((32, 4096))).astype(np.float32),
        "tiny_1e-8": (1e-8 * rng.standard_normal((16, 4096))).astype(np.float32),
        "big_1e3": (1e3 * rng.standard_normal((32, 4096))).astype(np.float32),
        "edge_mix": edge,
    }


def _decode(name: str, raw: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(raw, TYPES[name][1])


def _rel_rms(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2) / np.mean(x.astype(np.float64) ** 2)))


@pytest.mark.parametrize("name", TYPES)
def test_bytes_match_llama_cpp_reference(name, reference):
    fn, _, size, _ = TYPES[name]
    report = {}
    for label, x in datasets().items():
        ours = fn(x)
        ref, _ = run_reference(reference, name, x)
        assert ref.shape == ours.shape
        same = (ours.reshape(-1, size) == ref.reshape(-1, size)).all(axis=1)
        report[label] = f"{100 * same.mean():.4f}%"
    assert all(v == "100.0000%" for v in report.values()), f"{name} identical blocks per data set: {report}"


@pytest.mark.parametrize("name", TYPES)
def test_gaussian_error_bound(name):
    fn, _, _, bound = TYPES[name]
    x = datasets()["gauss"]
    y = _decode(name, fn(x))
    assert y.shape == x.shape and np.isfinite(y).all()
    err = _rel_rms(x, y)
    assert bound * 0.8 < err < bound, err  # measured: Q2 0.296, Q3 0.151, Q4 0.0714, Q5 0.0361, Q6 0.0178


@pytest.mark.parametrize("name", TYPES)
def test_edge_cases_decode_sanely(name):
    fn, _, _, bound = TYPES[name]
    rng = np.random.default_rng(7)
    zero = np.zeros((2, 512), np.float32)
    assert not fn(zero).any()  # every K type writes an all-zero block as zero bytes
    assert not _decode(name, fn(zero)).any()
    for c in (0.3, -0.3, 1e3):
        const = np.full((1, 512), c, np.float32)
        # Q2_K/Q3_K have coarse scale codes; constants still land within a few percent
        assert np.allclose(_decode(name, fn(const)), c, rtol=0.05), c
    outlier = (0.02 * rng.standard_normal((4, 1024))).astype(np.float32)
    outlier[1, 300] = 1e3
    y = _decode(name, fn(outlier))
    assert np.isfinite(y).all() and abs(y[1, 300] - 1e3) < 1e3 * bound
    neg = -np.abs(rng.standard_normal((4, 1024))).astype(np.float32)
    y = _decode(name, fn(neg))
    # the fitted min may overshoot 0 slightly (Q2_K by ~0.5 on |N(0,1)|), never to the data's scale
    assert y.max() < 0.2 * np.abs(neg).max() and _rel_rms(neg, y) < 1.5 * bound
    # near fp16 underflow of d: stays finite and below the signal (a limit of the format that llama.cpp
    # shares: docs/quantization.md, 'Small weights and fp16 scales')
    tiny = (1e-6 * rng.standard_normal((4, 1024))).astype(np.float32)
    y = _decode(name, fn(tiny))
    assert np.isfinite(y).all() and np.abs(y).max() < 1e-3


@pytest.mark.parametrize("name", TYPES)
def test_shapes_chunks_and_determinism(name, monkeypatch):
    fn, _, size, _ = TYPES[name]
    monkeypatch.setattr(kquants, "CHUNK_BLOCKS", 1024)
    rng = np.random.default_rng(3)
    # 3000 blocks: 3 kernel calls, 50 lockstep groups
    x = rng.standard_normal((3, 256 * 1000)).astype(np.float32)
    q = fn(x)
    assert q.dtype == np.uint8 and q.shape == (3, 1000 * size)
    assert np.array_equal(q, fn(x))
    assert np.array_equal(q[1], fn(x[1]))
    assert np.array_equal(q.reshape(3, 1000, size)[:, 7:9], fn(x[:, 7 * 256:9 * 256]).reshape(3, 2, size))
    x3 = rng.standard_normal((7, 5, 512)).astype(np.float32)
    assert fn(x3).shape == (7, 5, 2 * size)
    assert np.array_equal(fn(x3).reshape(-1), fn(x3.reshape(-1)))
    assert fn(np.zeros((0, 256), np.float32)).shape == (0, size)
    h = x[:, :512].astype(np.float16)
    assert np.array_equal(fn(h), fn(h.astype(np.float32)))  # f16 input widens exactly
    for bad in (np.zeros((2, 100), np.float32), np.zeros(256, np.int32), np.float32(1.0)):
        with pytest.raises(ValueError):
            fn(bad)
    with pytest.raises(ValueError, match="finite"):
        fn(np.full((1, 256), np.nan, np.float32))


def test_fp16_rounding_matches_numpy():
    """The kernels' hand-written fp32 -> fp16 (numba has no float16 scalar) against numpy's conversion:
    every fp16 value, the midpoints between neighbours (ties to even) and one float32 ulp either side,
    overflow, subnormals and random bit patterns, both signs."""
    h = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mid = (h[:-1] + h[1:]) / 2
    v = np.concatenate([h, mid, [65504.0, 65519.0, 65520.0, 65536.0, 1e30, np.inf]]).astype(np.float32)
    v = np.concatenate([v, np.nextafter(v, np.float32(0)), np.nextafter(v, np.float32(np.inf))])
    rand = (np.random.default_rng(0).integers(0, 2 ** 32, 20000, dtype=np.uint64)
            .astype(np.uint32).view(np.float32))
    v = np.concatenate([v, -v, rand[np.isfinite(rand)]])
    got = np.array([jit.fp16(f)[0] for f in v], np.uint16)
    with np.errstate(over="ignore"):
        want = v.astype(np.float16).view(np.uint16)
    assert np.array_equal(got, want), v[got != want][:5]
    assert np.array_equal(np.array([jit.fp16(f)[1] for f in v[:4096]], np.float32),
                          v[:4096].astype(np.float16).astype(np.float32))
