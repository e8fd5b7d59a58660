"""Bad input, as the README promises and issue 13 lists it: exit 2, exactly one stderr line starting with
`error: `, no traceback, nothing created or modified on disk. Ctrl-C: one line and exit 130."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import sigint_as_on_a_terminal
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from flux2_mlx.cli import main

GEN = ("generate", "a fox", "--model-path", "{repo}", "-W", "64", "-H", "48", "-o", "{tmp}/out.png")
TRANSFORMER = "{repo}/flux-2-klein-4b.safetensors"
CONVERT = ("convert", TRANSFORMER)
LINUX = pytest.mark.skipif(not Path("/sys/kernel").is_dir(),
                           reason="sysfs: a folder no one may create files in")
GOOD_META = {"prompt": "a fox", "model": "klein-4b", "seed": 7, "steps": 4, "guidance": 1.0, "width": 64,
             "height": 48, "dtype": "float32", "version": "0.1.0"}
BROKEN_META = {  # the flux2 text chunk of meta-NAME.png
    "not-json": "{prompt: fox", "empty": "{}", "list": "[1, 2]", "string": '"x"', "null": "null",
    "nested": "[" * 100_000,
    "no-prompt": json.dumps({k: v for k, v in GOOD_META.items() if k != "prompt"}),
    "width-text": json.dumps({**GOOD_META, "width": "64"}),
    "seed-bool": json.dumps({**GOOD_META, "seed": True}),
    "guidance-nan": json.dumps({**GOOD_META, "guidance": float("nan")}),
    "refs-text": json.dumps({**GOOD_META, "refs": "a.png"}),
    "image-no-strength": json.dumps({**GOOD_META, "image": "a.png"}),
    "loras-paths": json.dumps({**GOOD_META, "loras": ["style.safetensors"]}),
    "lora-scale-text": json.dumps({**GOOD_META, "loras": [{"file": "s.safetensors", "sha256": "ab",
                                                           "scale": "0.8"}]}),
}

CASES = [
    # sizes: README "a size that is not a multiple of 16 or over 4 MP"; -W 0 used to mean "unset"
    ((*GEN, "-W", "1000"), "multiples of 16"),
    ((*GEN, "-W", "4096", "-H", "4096"), "4 MP"),
    ((*GEN, "-W", "0"), "--width"),
    ((*GEN, "-W", "-16"), "--width"),
    ((*GEN, "-H", "0"), "--height"),
    # numeric ranges
    ((*GEN, "--steps", "0"), "--steps"),
    ((*GEN, "--image", "{tmp}/pic.png", "--strength", "1.5"), "--strength"),
    ((*GEN, "--image", "{tmp}/pic.png", "--strength", "0"), "--strength"),
    ((*GEN, "--strength", "0.5"), "--image"),
    ((*GEN, "--seed", "-1"), "--seed"),
    ((*GEN, "--seed", str(2**32)), "--seed"),
    ((*GEN, "-n", "0"), "--num-images"),
    ((*GEN, "--seed", "1", "--seed", "2", "-n", "3"), "--seed"),
    ((*GEN, "--guidance", "-1"), "--guidance"),
    ((*GEN, "--memory-budget", "0"), "--memory-budget"),
    ((*GEN, "--memory-budget", "0.001"), "even streamed"),
    # choices, options, arguments, commands
    ((*GEN, "--model", "klein-5b"), "--model"),
    ((*GEN, "--dtype", "float8"), "--dtype"),
    ((*GEN, "--stream-from", "cloud"), "--stream-from"),
    ((*GEN, "--sted", "4"), "--sted"),
    (("generate",), "PROMPT"),
    ((), "Missing command"),
    (("gen", "a fox"), "gen"),
    # the output
    ((*GEN, "-o", "{tmp}/taken.png"), "--overwrite"),
    ((*GEN, "-o", "{tmp}/cat.png", "-n", "2", "--seed", "5"), "cat-6.png already exists"),
    ((*GEN, "-o", "{tmp}/missing/out.png"), "does not exist"),
    ((*GEN, "-o", "{tmp}/out.jpg"), ".png"),
    ((*GEN, "-o", "{tmp}"), "directory"),
    ((*GEN, "-o", "{tmp}/notes.txt/out.png"), "--output"),  # the "folder" is a regular file
    pytest.param((*GEN, "-o", "{tmp}/readonly/out.png"), "cannot write", id="readonly-folder"),
    pytest.param((*GEN, "-o", "/sys/out.png"), "cannot write", id="sysfs", marks=LINUX),  # even for root
    # model files and their flags
    ((*GEN, "--model-path", "{tmp}/missing"), "does not exist"),
    ((*GEN, "--negative-prompt", "blurry"), "negative prompt"),
    ((*GEN, "--model", "klein-9b"), "error"),
    ((*GEN, "--transformer", "{repo}/vae/diffusion_pytorch_model.safetensors"), "autoencoder"),
    ((*GEN, "--transformer", "{tmp}/head.safetensors"), "head.safetensors"),
    ((*GEN, "--transformer", "{tmp}/half.safetensors"), "half.safetensors"),
    ((*GEN, "--transformer", "{tmp}/noise.safetensors"), "noise.safetensors"),
    ((*GEN, "--transformer", "{tmp}/noise.gguf"), "noise.gguf"),
    (("generate", "a fox", "-o", "{tmp}/out.png"), "--model-path"),  # no network, empty cache (see `run`)
    # LoRAs
    ((*GEN, "--lora", "{tmp}/style.safetensors:strong"), "'strong' is not a number"),
    ((*GEN, "--lora", "{tmp}/style.safetensors:nan"), "is not a number"),
    ((*GEN, "--lora", "{tmp}/missing.safetensors"), "no such file"),
    ((*GEN, "--lora", "{tmp}/notes.txt"), "notes.txt"),
    ((*GEN, "--lora", "{tmp}/half.safetensors"), "half.safetensors"),  # truncated
    ((*GEN, "--lora", TRANSFORMER), "flux-2-klein-4b.safetensors"),  # a model, not a LoRA
    ((*GEN, "--lora", "someone/styles/style.safetensors"), "pass a downloaded LoRA file's path"),
    # pictures
    ((*GEN, "--ref", "{tmp}/missing.png"), "no such file"),
    ((*GEN, "--ref", "{tmp}/notes.txt"), "not a readable image"),
    ((*GEN, "--ref", "{tmp}/tiny.png"), "at least 64 px"),
    ((*GEN, *["--ref", "{tmp}/pic.png"] * 11), "at most 10"),
    ((*GEN, "--image", "{tmp}/missing.png"), "no such file"),
    ((*GEN, "--image", "{tmp}/notes.txt"), "not a readable image"),
    # flux2 info
    (("info", "{tmp}/missing.png"), "does not exist"),
    (("info", "{tmp}/notes.txt"), "not an image"),
    (("info", "{tmp}/pic.png"), "not made by flux2 generate"),
    *[(("info", f"{{tmp}}/meta-{name}.png"), f"meta-{name}.png") for name in BROKEN_META],
    (("info", "{repo}", "--plan", "-W", "0"), "--width"),
    (("info", "{repo}", "--plan", "-W", "1000"), "multiples of 16"),
    # flux2 convert
    ((*CONVERT, "{tmp}/out.gguf", "--type", "Q9_X"), "unknown type"),
    ((*CONVERT, "{tmp}/out.gguf"), "--type"),
    ((*CONVERT, "{tmp}/out.gguf", "-t", "Q8_0", "-j", "0"), "--jobs"),
    (("convert", "{tmp}/missing.safetensors", "{tmp}/out.gguf", "-t", "Q8_0"), "missing.safetensors"),
    ((*CONVERT, "{tmp}/taken.gguf", "-t", "Q8_0"), "--force"),
    ((*CONVERT, "{tmp}/missing/out.gguf", "-t", "Q8_0"), "does not exist"),
    pytest.param((*CONVERT, "{tmp}/readonly/out.gguf", "-t", "Q8_0"), "cannot write", id="convert-readonly"),
    pytest.param((*CONVERT, "/sys/out.gguf", "-t", "Q8_0"), "cannot write", id="convert-sysfs", marks=LINUX),
]


def _picture(path, w, h):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_repo):
    """The inputs the cases name, in one folder for all of them (each case checks that it changed nothing
    there); HF's cache is an empty folder there."""
    tmp_path = tmp_path_factory.mktemp("files")
    _picture(tmp_path / "pic.png", 80, 64)
    _picture(tmp_path / "tiny.png", 40, 40)
    _picture(tmp_path / "taken.png", 64, 48)
    _picture(tmp_path / "cat-6.png", 64, 48)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "taken.gguf").write_bytes(b"GGUF")
    for name, text in BROKEN_META.items():
        info = PngInfo()
        info.add_text("flux2", text)
        Image.new("RGB", (16, 16)).save(tmp_path / f"meta-{name}.png", pnginfo=info)
    weights = (tiny_repo / "flux-2-klein-4b.safetensors").read_bytes()
    (tmp_path / "head.safetensors").write_bytes(weights[:1000])  # a download cut inside the header
    (tmp_path / "half.safetensors").write_bytes(weights[: len(weights) // 2])  # ... or inside the data
    noise = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp_path / "noise.safetensors").write_bytes(noise)
    (tmp_path / "noise.gguf").write_bytes(b"GGUF" + noise)
    (tmp_path / "cache").mkdir()
    (tmp_path / "readonly").mkdir(mode=0o555)
    yield tmp_path
    (tmp_path / "readonly").chmod(0o755)


def _can_write(folder):
    probe = folder / "probe"
    try:
        probe.touch()
    except PermissionError:
        return False
    probe.unlink()
    return True


def _tree(*roots):
    """Every file with its size and mtime; folders by name only (the writability probe may touch a
    folder's mtime with its self-deleting temporary file)."""
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            st = path.stat()
            out[str(path)] = None if path.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("args,message", CASES)
def test_bad_input_is_one_error_line(files, tiny_repo, monkeypatch, args, message):
    if "readonly" in " ".join(args) and _can_write(files / "readonly"):
        pytest.skip("this user (root) writes in a read-only folder; the sysfs cases probe an unwritable one")
    monkeypatch.chdir(files)  # a default output (flux2.png) would land here, inside the snapshot
    argv = [a.format(tmp=files, repo=tiny_repo) for a in args]
    before = _tree(files, tiny_repo)
    r = CliRunner().invoke(main, argv, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(files / "cache")})
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr and "Traceback" not in r.output
    assert _tree(files, tiny_repo) == before


def test_the_readme_example_size_is_accepted(tiny_repo, tmp_path):
    r = CliRunner().invoke(main, ["generate", "a fox", "--model-path", str(tiny_repo), "-m", "klein-4b",
                                  "-W", "1360", "-H", "768", "--dry-run", "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 0 and "predicted peak" in r.output


def test_help_tells_every_numeric_range():
    r = CliRunner().invoke(main, ["generate", "--help"], terminal_width=300, max_content_width=300)
    lines = r.output.splitlines()
    for option, bounds in [("--width", "x>=16"), ("--height", "x>=16"), ("--strength", "0<x<=1"),
                           ("--steps", "x>=1"), ("--guidance", "x>=0"), ("--memory-budget", "x>0"),
                           ("--seed", "0<=x<=4294967295"), ("--num-images", "x>=1")]:
        line = next(line for line in lines if option in line.split()[:2])
        assert bounds in line, line
        if option in ("--width", "--height"):
            assert "multiple of 16" in line and "4 MP" in line


@pytest.mark.parametrize("target,command,message", [
    ("flux2_mlx.pipeline.check_size", GEN, "error: interrupted\n"),  # the first thing generate imports
    ("flux2_mlx.pipeline.load_pipeline", GEN, "error: interrupted\n"),
    ("flux2_mlx.convert.convert", (*CONVERT, "{tmp}/out.gguf", "-t", "Q8_0"), "error: interrupted; "),
])
def test_ctrl_c_is_one_line_and_exit_130(tiny_repo, tmp_path, monkeypatch, target, command, message):
    def interrupt(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupt)
    r = CliRunner().invoke(main, [a.format(tmp=tmp_path, repo=tiny_repo) for a in command])
    assert r.exit_code == 130 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
    assert not list(tmp_path.iterdir())


def test_ctrl_c_while_the_cli_imports(monkeypatch, capsys):
    """console() (the `flux2` script) imports the CLI inside its try."""
    import flux2_mlx

    class Interrupt:
        def find_spec(self, name, path=None, target=None):
            if name == "flux2_mlx.cli":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "flux2_mlx.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupt(), *sys.meta_path])
    with pytest.raises(SystemExit) as exit_:
        flux2_mlx.console()
    assert exit_.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"


def _script():
    """The installed `flux2` script when there is one beside this Python, else `python -m flux2_mlx`."""
    script = Path(sys.executable).with_name("flux2")
    return [str(script)] if script.exists() else [sys.executable, "-m", "flux2_mlx"]


@pytest.mark.parametrize("command", [[sys.executable, "-m", "flux2_mlx"], _script()])
def test_real_console_script_prints_one_line(command, tmp_path):
    for args in (["generate", "a fox", "--steps", "0"], ["generate"],
                 ["info", str(tmp_path / "missing.png")]):
        r = subprocess.run(command + args, capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert r.stdout == ""
    assert not list(tmp_path.iterdir())


def test_real_sigint_during_a_run(tiny_repo, tmp_path):
    """SIGINT in the middle of denoising: one line, exit 130, no PNG and no partial left."""
    out = tmp_path / "fox.png"
    proc = subprocess.Popen([sys.executable, "-m", "flux2_mlx", "generate", "a fox", "--model-path",
                             str(tiny_repo), "-W", "64", "-H", "48", "--steps", "100000", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_on_a_terminal)
    while not proc.stdout.readline().startswith("seed "):  # after "model klein-4b (…)": denoising has begun
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.replace("\r", "\n").splitlines()[-1] == "error: interrupted" and "Traceback" not in err
    assert not list(tmp_path.iterdir())
