"""`flux2 convert` as a real process, stopped at random moments: SIGINT/SIGTERM leave neither the destination
nor a partial file and print no traceback; a SIGKILL's partial is removed by the next conversion into the
same folder. And the atomic-write helper on its own."""

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from conftest import random_transformer, sigint_as_on_a_terminal

from flux2_mlx.atomic import atomic_write
from flux2_mlx.config import tiny_spec, transformer_shapes
from flux2_mlx.convert import convert
from flux2_mlx.weights import GGUFFile, f32_to_bf16, save_safetensors


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: no process has this PID now
    return p.pid


def test_atomic_write_replaces_cleans_and_keeps(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".other.gguf.{dead}.partial"
    live = [tmp_path / f".other.gguf.{os.getpid()}.partial", tmp_path / f".x.png.{os.getppid()}.partial"]
    unrelated = [tmp_path / n for n in (".hidden", f"x.gguf.{dead}.partial", ".x.gguf.partial",
                                        f".x.gguf.{dead}.partial.bak", f".x.gguf.0{dead}.partial")]
    for f in [stale, *live, *unrelated]:
        f.write_bytes(b"")
    (tmp_path / f".folder.{dead}.partial").mkdir()
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"old")

    with pytest.raises(KeyboardInterrupt), atomic_write(dst) as tmp:
        assert tmp == tmp_path / f".out.bin.{os.getpid()}.partial"
        assert not stale.exists()  # its writer is gone
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert not tmp.exists() and dst.read_bytes() == b"old"

    with atomic_write(dst) as tmp:
        tmp.write_bytes(b"new")
    assert not tmp.exists() and dst.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in [dst, *live, *unrelated, tmp_path / f".folder.{dead}.partial"])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A transformer that takes about a second to convert to Q8_0 on two cores (with the imports), and its
    tensor count. Q8_0 quantizes in numpy: the children skip loading the compiled K-quant kernels, and the
    signal handling under test is the same for every type."""
    cfg = replace(tiny_spec("klein-4b").transformer, hidden_size=512, num_heads=4, depth=2,
                  depth_single_blocks=4)
    path = tmp_path_factory.mktemp("src") / "flux-2-klein-4b.safetensors"
    save_safetensors(path, {k: f32_to_bf16(v) for k, v in random_transformer(cfg, seed=7).items()})
    return path, len(transformer_shapes(cfg))


def _start(src, dst):
    return subprocess.Popen([sys.executable, "-m", "flux2_mlx", "convert", str(src), str(dst),
                             "--type", "Q8_0", "--jobs", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_on_a_terminal)


def _partials(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


def _traceback_through_our_code(err: str) -> bool:
    """CPython's own start-up reports a Ctrl-C before any of the project's code runs: with a traceback of
    frozen frames only (runpy finding the package), or as a failure to import site (while it runs the .pth
    files) or runpy (while runpy imports the stdlib); anything else is ours."""
    if err.startswith(("Fatal Python error: init_import_site:", "Could not import runpy module\n")):
        return False
    frames = [line for line in err.splitlines() if line.lstrip().startswith('File "')]
    return "Traceback" in err and not all(f.lstrip().startswith('File "<frozen ') for f in frames)


def _wait_for_partial(p, dst) -> None:
    """Until `p` has started writing `dst` (or has ended)."""
    partial = dst.with_name(f".{dst.name}.{p.pid}.partial")
    deadline = time.monotonic() + 60
    while not partial.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)


def test_sigint_and_sigterm_at_random_moments(model, tmp_path):
    src, n_tensors = model
    start = time.perf_counter()
    p = _start(src, tmp_path / "timed.gguf")
    assert p.wait(120) == 0, p.stderr.read()
    run_s = time.perf_counter() - start
    (tmp_path / "timed.gguf").unlink()
    rng = random.Random(13)
    for sig in (signal.SIGINT, signal.SIGTERM):
        # (after the partial appeared?, delay): interpreter start and imports; anywhere in the run; while
        # writing; late in writing, the read-back check or the rename (or just after it)
        moments = [(False, 0.02), (False, 0.25), (False, rng.uniform(0.3, 0.8) * run_s),
                   (True, rng.uniform(0, 0.1)), (True, rng.uniform(0.1, 0.3)), (True, rng.uniform(0.3, 0.6))]
        outcomes = []
        for i, (writing, delay) in enumerate(moments):
            dst = tmp_path / f"{sig.name}-{i}.gguf"
            p = _start(src, dst)
            if writing:
                _wait_for_partial(p, dst)
            time.sleep(delay)
            p.send_signal(sig)
            _, err = p.communicate(timeout=60)
            what = (f"{sig.name} {delay:.2f} s after {'writing began' if writing else 'start'}: "
                    f"exit {p.returncode}")
            outcomes.append(f"{what}, {'written' if dst.exists() else 'interrupted'}")
            report = f"{what}\n{err}"
            assert not _traceback_through_our_code(err), report
            assert _partials(tmp_path) == [], report
            if dst.exists():  # the signal came after the rename: a complete file, whatever the exit code
                assert "was not written" not in err and len(GGUFFile(dst).keys()) == n_tensors, report
                dst.unlink()
            else:
                assert p.returncode != 0, report
        assert sum(o.endswith("interrupted") for o in outcomes) >= 4, "\n".join(outcomes)


def test_sigkill_partial_is_removed_by_the_next_conversion(model, tmp_path):
    src, n_tensors = model
    p = _start(src, tmp_path / "killed.gguf")
    _wait_for_partial(p, tmp_path / "killed.gguf")
    p.kill()
    p.communicate(timeout=60)
    # killed while writing: nothing could clean up
    assert p.returncode == -signal.SIGKILL and _partials(tmp_path) == [f".killed.gguf.{p.pid}.partial"]

    out = convert(src, tmp_path / "next.gguf", "Q8_0", progress=False)  # another name, same folder
    assert sorted(f.name for f in tmp_path.iterdir()) == ["next.gguf"]
    assert len(GGUFFile(out).keys()) == n_tensors
