"""The `flux2` command line, end to end on a tiny random model in the real klein repo layout."""

import json
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from flux2_mlx import __version__
from flux2_mlx.cli import main
from flux2_mlx.config import MODELS

SMALL = ["-W", "64", "-H", "48"]
# The planner's streaming cases: at this size MLX's VAE decode needs less than the resident transformer.
STREAMING = ["-W", "32", "-H", "32", "--backend", "mlx"]

# Prompts of 64 tokens, not 512 (conftest.short_prompts): what these tests check does not depend on it.
pytestmark = pytest.mark.usefixtures("short_prompts")


def run(*args, **env):
    return CliRunner().invoke(main, [str(a) for a in args], env=env or None)


def _fox(repo):
    """The arguments of the shared MLX render (mlx_fox)."""
    return ["a red fox", "--model-path", repo, *SMALL, "--seed", 3, "--steps", 2]


@pytest.fixture(scope="module")
def mlx_fox(short_prompts, tiny_repo, tmp_path_factory):
    """One MLX render, the picture the torch backend and the streamed runs must draw."""
    out = tmp_path_factory.mktemp("mlx") / "mlx.png"
    r = run("generate", *_fox(tiny_repo), "--backend", "mlx", "-o", out)
    assert r.exit_code == 0, r.output
    return out


def test_help_and_version():
    r = run("--help")
    assert r.exit_code == 0 and "FLUX.2 image generation" in r.output and "generate" in r.output
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.output


def test_models_lists_every_variant():
    r = run("models")
    assert r.exit_code == 0
    for name in ["dev", "klein-4b", "klein-9b", "klein-9b-kv", "klein-base-4b", "klein-base-9b"]:
        assert f"\n{name} " in "\n" + r.output
    assert "klein-base-4b  50 steps, guidance 4 (true CFG)" in r.output


def test_console_script_and_module_entry_points():
    out = subprocess.run([sys.executable, "-m", "flux2_mlx", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "models" in out.stdout


def test_generate_writes_png_with_metadata_and_reproduces(tiny_repo, tmp_path):
    out = tmp_path / "fox.png"
    r = run("generate", "a red fox in snow", "--model-path", tiny_repo, *SMALL, "--seed", 7, "-o", out)
    assert r.exit_code == 0, r.output
    assert "seed 7" in r.stdout and f"saved {out}" in r.stdout and "peak memory" in r.stdout
    assert "denoise" in r.stderr and "4/4" in r.stderr  # the per-phase progress bars
    image = Image.open(out)
    assert image.size == (64, 48)
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 50
    meta = json.loads(image.info["flux2"])
    assert meta == {"prompt": "a red fox in snow", "model": "klein-4b", "seed": 7, "steps": 4,
                    "guidance": 1.0, "width": 64, "height": 48, "dtype": "float32", "backend": "torch",
                    "device": "cpu", "version": __version__}

    r = run("info", out)
    assert r.exit_code == 0 and "seed: 7" in r.output
    command = r.output.strip().splitlines()[-1].removeprefix("regenerate: ")
    again = tmp_path / "again.png"
    argv = shlex.split(command)[1:] + ["--model-path", str(tiny_repo), "-o", str(again)]
    assert run(*argv).exit_code == 0
    assert again.read_bytes() == out.read_bytes()

    r = run("generate", "a blue fox", "--model-path", tiny_repo, *SMALL, "--seed", 7,
            "-o", tmp_path / "blue.png")
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "blue.png")), np.asarray(image))


def test_several_seeds_one_encoding_and_no_silent_overwrite(tiny_repo, tmp_path):
    out = tmp_path / "cat.png"
    r = run("generate", "a cat", "--model-path", tiny_repo, *SMALL, "--steps", 1, "-n", 2, "--seed", 5,
            "-o", out, "--guidance", 3)
    assert r.exit_code == 0, r.output
    assert "ignores --guidance 3" in r.stderr and r.stderr.count("encode:   0%") == 1  # one encoding
    a, b = tmp_path / "cat-5.png", tmp_path / "cat-6.png"
    assert a.exists() and b.exists() and a.read_bytes() != b.read_bytes()
    before = a.read_bytes()
    r = run("generate", "a dog", "--model-path", tiny_repo, *SMALL, "--steps", 1, "--seed", 5, "--seed", 6,
            "-o", out)
    assert r.exit_code == 2 and "already exists" in r.stderr and a.read_bytes() == before


# Bad input of every kind: the table in test_cli_errors.py.


def test_offline_without_files_fails_fast_and_says_what_to_do(tmp_path):
    r = run("generate", "x", "-o", tmp_path / "x.png", HF_HUB_OFFLINE="1",
            HF_HUB_CACHE=str(tmp_path / "cache"))
    assert r.exit_code == 2
    assert "black-forest-labs/FLUX.2-klein-4B" in r.stderr and "--model-path" in r.stderr


def test_dry_run_loads_nothing(tiny_repo, tmp_path):
    r = run("generate", "x", "--model-path", tiny_repo, "--dry-run", "-o", tmp_path / "x.png")
    assert r.exit_code == 0, r.output
    assert str(tiny_repo) in r.output and "predicted peak" in r.output and not (tmp_path / "x.png").exists()
    r = run("generate", "x", "--model", "dev", "--dry-run", "-o", tmp_path / "x.png",
            HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    assert r.exit_code == 0 and "download from black-forest-labs/FLUX.2-dev" in r.output


def test_tiny_example_writes_png(tmp_path, monkeypatch, capsys, recwarn):
    """examples/tiny_t2i.py (the README's no-network smoke run), run as a script: BFL-layout files →
    load_pipeline → PNG, without a warning."""
    script = Path(__file__).resolve().parents[1] / "examples" / "tiny_t2i.py"
    out = tmp_path / "tiny.png"
    monkeypatch.setattr(sys, "argv", [str(script), str(out)])
    runpy.run_path(str(script), run_name="__main__")
    assert "wrote" in capsys.readouterr().out and not [str(w.message) for w in recwarn]
    image = Image.open(out)
    assert image.size == (128, 96) and image.mode == "RGB"
    assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 100


def base_repo(tiny_repo, folder):
    """The tiny repo's files laid out as FLUX.2-klein-base-4B is (klein base shares klein's architecture):
    its transformer under the base repo's file name."""
    folder.mkdir()
    (folder / "flux-2-klein-base-4b.safetensors").symlink_to(tiny_repo / "flux-2-klein-4b.safetensors")
    for name in ("vae", "text_encoder", "tokenizer"):
        (folder / name).symlink_to(tiny_repo / name)
    return folder


def test_base_variant_runs_true_cfg_with_a_negative_prompt(tiny_repo, tmp_path):
    """A klein base repo runs as one without -m (its file name says so): CFG and a negative prompt."""
    kw = ["--model-path", base_repo(tiny_repo, tmp_path / "base"), *SMALL, "--steps", 2, "--seed", 1]
    assert run("generate", "a cat", *kw, "--negative-prompt", "blurry",
               "-o", tmp_path / "a.png").exit_code == 0
    assert run("generate", "a cat", *kw, "-o", tmp_path / "b.png").exit_code == 0
    meta = json.loads(Image.open(tmp_path / "a.png").info["flux2"])
    assert meta["negative_prompt"] == "blurry" and meta["steps"] == 2 and meta["guidance"] == 4.0
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()  # "" vs "blurry"


def test_load_pipeline_runs_the_variant_the_files_are(tiny_repo, tmp_path):
    from flux2_mlx import load_pipeline
    from flux2_mlx.weights import WeightsError

    repo = base_repo(tiny_repo, tmp_path / "base")
    pipe = load_pipeline(model_path=repo)
    assert pipe.spec.guidance_mode == "cfg" and pipe.settings(None, None) == (50, 4.0)  # klein base's
    with pytest.raises(WeightsError, match=r"the file name flux-2-klein-base-4b\.safetensors says this is "
                                           r"klein-base-4b, not klein-4b"):
        load_pipeline("klein-4b", model_path=repo)


def test_truncated_prompt_warns_in_one_line(tiny_repo, tmp_path, short_prompts, monkeypatch):
    monkeypatch.setitem(MODELS, "klein-4b", short_prompts["klein-4b"])  # the real 512 tokens, one step
    r = run("generate", "fox " * 600, "--model-path", tiny_repo, *SMALL, "--steps", 1,
            "-o", tmp_path / "t.png")
    assert r.exit_code == 0 and "warning: prompt 0 is" in r.stderr and "dropping" in r.stderr
    assert "UserWarning" not in r.stderr


def test_dev_prompt_to_png_with_mistral_and_tekken(tmp_path_factory, tmp_path):
    """dev end to end: the Mistral3 text stack under its saved prefix, the real Tekken vocabulary
    (left padding), embedded guidance, BFL transformer file at the repo root."""
    from conftest import write_tiny_dev_repo

    repo = tmp_path_factory.mktemp("FLUX.2-dev")
    write_tiny_dev_repo(repo)
    out = tmp_path / "dev.png"
    r = run("generate", "a red fox in snow", "-m", "dev", "--model-path", repo, *SMALL, "--steps", 2,
            "--seed", 3, "-o", out)
    assert r.exit_code == 0, r.output
    meta = json.loads(Image.open(out).info["flux2"])
    assert (meta["model"], meta["steps"], meta["guidance"]) == ("dev", 2, 4.0)
    r = run("generate", "a red fox in snow", "-m", "dev", "--model-path", repo, *SMALL, "--steps", 2,
            "--seed", 3, "--guidance", 2.5, "-o", tmp_path / "g.png")
    assert r.exit_code == 0 and (tmp_path / "g.png").read_bytes() != out.read_bytes()  # guidance is embedded


def test_memory_budget_below_the_model_gives_the_same_image(tiny_repo, tmp_path):
    """The tiny transformer's weights (0.03 GB) do not fit 0.028 GB beside the VAE: it streams."""
    base = ["generate", "a red fox", "--model-path", tiny_repo, *STREAMING, "--seed", 3, "--steps", 2]
    assert run(*base, "-o", tmp_path / "resident.png").exit_code == 0
    for source in ("ram", "disk"):
        r = run(*base, "--memory-budget", "0.028", "--stream-from", source, "-o", tmp_path / f"{source}.png")
        assert r.exit_code == 0, r.output
        assert f"streamed from {source}: 0 of 4 blocks resident" in r.output
        a, b = (np.array(Image.open(tmp_path / f)) for f in ("resident.png", f"{source}.png"))
        assert np.array_equal(a, b)


def test_impossible_memory_budget_is_refused_up_front(tiny_repo, tmp_path):
    r = run("generate", "a fox", "--model-path", tiny_repo, *SMALL, "--memory-budget", "0.001",
            "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and "even streamed" in r.stderr
    assert "more than the 0.00 GB usable of the budget" in r.stderr
    assert "Traceback" not in r.output and not (tmp_path / "x.png").exists()


def test_dry_run_and_info_print_the_plan(tiny_repo, tmp_path):
    r = run("generate", "x", "--model-path", tiny_repo, "--dry-run", "--memory-budget", "0.028", *STREAMING,
            "-o", tmp_path / "x.png")
    assert (r.exit_code == 0 and "memory budget 0.03 GB" in r.output
            and "denoise  transformer   streamed" in r.output)
    r = run("info", tiny_repo, "--plan", "--memory-budget", "0.028", *STREAMING)
    assert r.exit_code == 0 and "predicted peak" in r.output


def _picture(path, w, h, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(path)
    return path


def test_generate_with_references_and_image(tiny_repo, tmp_path):
    """--ref a --ref b: the output takes the first reference's size; --image/--strength: image-to-image.
    Both are recorded in the PNG and the regenerate line reproduces the file."""
    a, b = _picture(tmp_path / "a.png", 100, 70, 1), _picture(tmp_path / "b.jpg", 64, 130, 2)
    out = tmp_path / "edit.png"
    r = run("generate", "the fox from the first picture", "--model-path", tiny_repo, "--ref", a, "--ref", b,
            "--steps", 2, "--seed", 3, "-o", out)
    assert r.exit_code == 0, r.output
    meta = json.loads(Image.open(out).info["flux2"])
    assert Image.open(out).size == (96, 64) and meta["refs"] == [str(a), str(b)]
    command = run("info", out).output.strip().splitlines()[-1].removeprefix("regenerate: ")
    again = tmp_path / "again.png"
    assert run(*shlex.split(command)[1:], "--model-path", tiny_repo, "-o", again).exit_code == 0
    assert again.read_bytes() == out.read_bytes()

    i2i = tmp_path / "i2i.png"
    r = run("generate", "a fox", "--model-path", tiny_repo, "--image", a, "--strength", 0.5, "--seed", 3,
            "-o", i2i)
    assert r.exit_code == 0, r.output
    assert "2/2" in r.stderr  # half of the 4 steps run
    assert json.loads(Image.open(i2i).info["flux2"])["strength"] == 0.5 and Image.open(i2i).size == (96, 64)
    r = run("generate", "a fox", "--model-path", tiny_repo, "--image", a, "--seed", 3,
            "-o", tmp_path / "d.png")
    assert r.exit_code == 0 and "3/3" in r.stderr  # the default strength, 0.6 of 4 steps
    assert json.loads(Image.open(tmp_path / "d.png").info["flux2"])["strength"] == 0.6
    r = run("generate", "a fox", "--model-path", tiny_repo, "--ref", a, "--dry-run")
    assert r.exit_code == 0 and "references 96x64 (24 tokens)" in r.output and "images" in r.output


def test_torch_backend_writes_the_same_png_and_its_regenerate_line_reproduces_it(tiny_repo, tmp_path,
                                                                                   mlx_fox):
    """--backend torch (also with --compile) draws the MLX picture within one step per pixel; the PNG
    records how it was made and the regenerate line reproduces it byte for byte."""
    a, b, c = mlx_fox, tmp_path / "torch.png", tmp_path / "compiled.png"
    for args, out in ((["--backend", "torch"], b), (["--backend", "torch", "--compile"], c)):
        r = run("generate", *_fox(tiny_repo), *args, "-o", out)
        assert r.exit_code == 0, r.output
    pa, pb, pc = (np.asarray(Image.open(p), np.int16) for p in (a, b, c))
    assert np.abs(pa - pb).max() <= 1 and np.abs(pa - pc).max() <= 1
    meta = json.loads(Image.open(b).info["flux2"])
    assert meta["backend"] == "torch" and meta["device"] == "cpu" and "compile" not in meta
    assert json.loads(Image.open(c).info["flux2"])["compile"] is True
    for out, flags in ((b, "--backend torch --device cpu"), (c, "--backend torch --device cpu --compile")):
        command = run("info", out).output.strip().splitlines()[-1].removeprefix("regenerate: ")
        assert flags in command
        again = tmp_path / "again.png"
        assert run(*shlex.split(command)[1:], "--model-path", tiny_repo, "-o", again,
                   "--overwrite").exit_code == 0
        assert again.read_bytes() == out.read_bytes()


def test_fp8_matmul_is_recorded_and_its_regenerate_line_reproduces_it(tiny_repo, tmp_path):
    """--fp8-matmul on an FP8 text encoder (torch): the PNG records it and the regenerate line, given the
    same encoder folder, draws the same bytes. On the tiny repo's bf16 encoder it is refused when the encoder
    loads (after the encode progress bar has started): one error line, exit 2, nothing written."""
    from test_fp8 import _fp8_checkpoint

    from flux2_mlx.config import tiny_spec

    folder, out, again = tmp_path / "fp8", tmp_path / "fp8.png", tmp_path / "again.png"
    _fp8_checkpoint(tiny_spec("klein-4b").text_encoder, folder, (16, 16), False)
    (folder / "config.json").write_bytes((tiny_repo / "text_encoder" / "config.json").read_bytes())
    fp8 = ["--backend", "torch", "--text-encoder", folder]
    assert run("generate", *_fox(tiny_repo), *fp8, "--fp8-matmul", "-o", out).exit_code == 0
    assert json.loads(Image.open(out).info["flux2"])["fp8_matmul"] is True
    command = run("info", out).output.strip().splitlines()[-1].removeprefix("regenerate: ")
    assert command.endswith("--backend torch --device cpu --fp8-matmul")
    assert run(*shlex.split(command)[1:], "--model-path", tiny_repo, "--text-encoder", folder,
               "-o", again).exit_code == 0
    assert again.read_bytes() == out.read_bytes()
    r = run("generate", *_fox(tiny_repo), "--backend", "torch", "--fp8-matmul", "-o", tmp_path / "no.png")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "--fp8-matmul found no FP8 weights" in errors[0]
    assert "Traceback" not in r.output and not (tmp_path / "no.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--backend", "torch", "--device", "cuda"], "not available here; available: cpu"),
    (["--backend", "torch", "--device", "cuda:7"], "not available here"),
    (["--backend", "torch", "--device", "gpu"], "not available here"),
    (["--backend", "mlx", "--device", "cuda"], "runs on 'gpu' or 'cpu'"),
    (["--backend", "mlx", "--device", "gpu"], "no GPU here"),
    (["--backend", "tpu"], "'tpu' is not one of"),
    (["--backend", "mlx", "--compile"], "compiling the transformer is a torch-backend option"),
    (["--backend", "mlx", "--fp8-matmul"], "FP8 matmuls are a torch-backend option"),
])
def test_devices_that_are_not_there(tiny_repo, tmp_path, args, message):
    r = run("generate", "x", "--model-path", tiny_repo, *SMALL, *args, "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1, r.output
    assert not list(tmp_path.iterdir())


def test_a_missing_framework_names_its_pip_extra(tiny_repo, tmp_path, monkeypatch):
    import importlib

    from flux2_mlx import pipeline

    real = importlib.import_module

    def without_torch(name, *args):
        if name == "flux2_mlx.torch_backend":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real(name, *args)

    monkeypatch.setattr(pipeline.importlib, "import_module", without_torch)
    r = run("generate", "x", "--model-path", tiny_repo, "--backend", "torch", "-o", tmp_path / "x.png")
    assert (r.exit_code == 2 and "pip install 'flux2-mlx[torch]'" in r.stderr
            and len(r.stderr.splitlines()) == 1)
    r = run("generate", "x", "--model-path", tiny_repo, *SMALL, "--backend", "auto", "--dry-run",
            "-o", tmp_path / "x.png")
    assert r.exit_code == 0 and "backend: mlx on cpu" in r.stdout  # auto passes over what does not import


@pytest.mark.parametrize("error", ["torch", "mlx", "python"])
def test_running_out_of_device_memory_is_one_line_with_a_budget_that_fits(tiny_repo, tmp_path, monkeypatch,
                                                                           error):
    import torch

    from flux2_mlx.pipeline import Pipeline

    raised = {"torch": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
              "mlx": RuntimeError("[metal::malloc] Attempting to allocate 9000000000 bytes"),
              "python": MemoryError()}[error]

    def decode(*_a, **_k):
        raise raised

    monkeypatch.setattr(Pipeline, "decode", decode)
    out = tmp_path / "x.png"
    r = run("generate", "x", "--model-path", tiny_repo, *STREAMING, "--steps", 1, "--memory-budget", 2,
            "-o", out)
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]  # beside the progress bars
    assert r.exit_code == 2 and len(errors) == 1 and errors[0].startswith("error: "), r.output
    assert "ran out of memory" in errors[0] and "--memory-budget 0.0" in errors[0] and not out.exists()


def test_other_errors_are_not_dressed_up_as_running_out_of_memory(tiny_repo, tmp_path, monkeypatch):
    from flux2_mlx.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "decode", lambda *_a, **_k: (_ for _ in ()).throw(RuntimeError("a bug")))
    r = run("generate", "x", "--model-path", tiny_repo, *SMALL, "--steps", 1, "-o", tmp_path / "x.png")
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)
