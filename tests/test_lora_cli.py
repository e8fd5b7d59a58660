"""`flux2 generate --lora FILE[:SCALE]` on the tiny klein model: the PNG records each LoRA (the file as given,
its sha256 prefix, the scale), `flux2 info` prints a regenerate line that draws the same picture byte for
byte, and a LoRA on the Hugging Face cache is found as `owner/repo/file.safetensors`."""

import json
import shlex

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_lora import _bfl_file

from flux2_mlx import hub
from flux2_mlx.cli import main
from flux2_mlx.lora import sha256_prefix

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("short_prompts")  # 64-token prompts: what is checked does not need 512
BASE = ["a red fox", "-W", "32", "-H", "32", "--steps", "1", "--seed", "3", "--backend", "mlx"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_lora_changes_the_picture_and_its_regenerate_line_reproduces_it(tiny_repo, tmp_path, monkeypatch):
    _bfl_file(tmp_path / "style.safetensors", seed=1)
    _bfl_file(tmp_path / "detail.safetensors", seed=2, prefix="base_model.model.")
    monkeypatch.chdir(tmp_path)  # the LoRAs given relative to the working folder, as the PNG keeps them
    plain, styled = tmp_path / "plain.png", tmp_path / "styled.png"
    assert run("generate", *BASE, "--model-path", tiny_repo, "-o", plain).exit_code == 0
    r = run("generate", *BASE, "--model-path", tiny_repo, "--lora", "style.safetensors:0.7",
            "--lora", "detail.safetensors:-0.3", "-o", styled)
    assert r.exit_code == 0, r.output
    meta = json.loads(Image.open(styled).info["flux2"])
    assert meta["loras"] == [
        {"file": "style.safetensors", "sha256": sha256_prefix(tmp_path / "style.safetensors"), "scale": 0.7},
        {"file": "detail.safetensors", "sha256": sha256_prefix(tmp_path / "detail.safetensors"),
         "scale": -0.3}]
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(styled)))

    r = run("info", styled)
    line = next(x for x in r.output.splitlines() if x.startswith("regenerate: "))
    args = shlex.split(line.removeprefix("regenerate: "))
    assert args[args.index("--lora") + 1] == "style.safetensors:0.7" and "detail.safetensors:-0.3" in args
    again = tmp_path / "again.png"
    r = run(*args[1:], "--model-path", tiny_repo, "-o", again)
    assert r.exit_code == 0, r.output
    assert again.read_bytes() == styled.read_bytes()


def test_dry_run_names_the_lora_files(tiny_repo, tmp_path):
    _bfl_file(tmp_path / "style.safetensors", seed=1)
    r = run("generate", *BASE, "--model-path", tiny_repo, "--lora", tmp_path / "style.safetensors",
            "--dry-run", "-o", tmp_path / "x.png")
    assert r.exit_code == 0 and f"lora: {tmp_path / 'style.safetensors'} at 1" in r.output


def test_a_lora_in_the_hugging_face_cache(tmp_path):
    """owner/repo/path.safetensors resolves through the HF cache with no network (the tests run offline)."""
    snapshot = tmp_path / "models--someone--styles" / "snapshots" / "0123abcd"
    (snapshot / "v2").mkdir(parents=True)
    _bfl_file(snapshot / "v2" / "style.safetensors", seed=1)
    (tmp_path / "models--someone--styles" / "refs").mkdir()
    (tmp_path / "models--someone--styles" / "refs" / "main").write_text("0123abcd")
    found = hub.lora_file("someone/styles/v2/style.safetensors", cache_dir=tmp_path)
    assert found.read_bytes() == (snapshot / "v2" / "style.safetensors").read_bytes()


def test_dry_run_plans_the_lora_branch_beside_a_gguf_transformer(tiny_repo, tmp_path):
    """The LoRA is read with the transformer file's shapes (the tiny ones here, not klein-4B's), and what
    it adds beside quantized weights is in the plan."""
    from conftest import write_gguf

    from flux2_mlx.config import get_spec
    from flux2_mlx.lora import read_lora
    from flux2_mlx.pipeline import memory_plan_from_files, open_backend
    from flux2_mlx.weights import SafetensorsFile, to_float32

    f = SafetensorsFile(tiny_repo / "flux-2-klein-4b.safetensors")
    weights = {k: to_float32(f.get(k)) for k in f.keys()}
    gguf = write_gguf(tmp_path / "t.gguf", weights, {k: "Q8_0" for k, a in weights.items()
                                                     if a.ndim == 2 and a.shape[1] % 32 == 0})
    tensors = _bfl_file(tmp_path / "style.safetensors", seed=1)
    r = run("generate", *BASE, "--model-path", tiny_repo, "--transformer", gguf, "--lora",
            tmp_path / "style.safetensors", "--dry-run", "-o", tmp_path / "x.png")
    assert r.exit_code == 0, r.output
    assert "denoise  transformer" in r.output and not (tmp_path / "x.png").exists()

    shapes = {k: a.shape for k, a in weights.items()}
    lora = read_lora(tmp_path / "style.safetensors", shapes)
    files = {"transformer": gguf, "vae": tiny_repo / "vae"}
    be = open_backend("mlx")[0]
    plans = [memory_plan_from_files(get_spec("klein-4b"), files, be, 4, 32, 32, loras=loras)
             for loras in ([], [(lora, 0.5)])]
    # every targeted weight is Q8_0 (its width is whole 32-blocks): each adds its factors, float32 here
    beside = sum(a.size for k, a in tensors.items() if ".lora_" in k)
    assert plans[1].phase("denoise").weights - plans[0].phase("denoise").weights == 4 * beside
