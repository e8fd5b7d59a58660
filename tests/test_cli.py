"""The `flux2` command line."""

import subprocess
import sys

from click.testing import CliRunner

from flux2_mlx import __version__
from flux2_mlx.cli import main


def test_help_and_version():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "FLUX.2 image generation" in r.output
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_models_lists_every_variant():
    r = CliRunner().invoke(main, ["models"])
    assert r.exit_code == 0
    for name in ["dev", "klein-4b", "klein-9b", "klein-9b-kv", "klein-base-4b", "klein-base-9b"]:
        assert f"\n{name} " in "\n" + r.output
    assert "klein-base-4b  50 steps, guidance 4 (true CFG)" in r.output


def test_console_script_and_module_entry_points():
    out = subprocess.run([sys.executable, "-m", "flux2_mlx", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "models" in out.stdout


def test_readme_run_command_example(tmp_path):
    """The README's run command: a tiny BFL-layout model on disk → load_pipeline → generate → PNG."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    script = Path(__file__).resolve().parents[1] / "examples" / "tiny_t2i.py"
    out = tmp_path / "tiny.png"
    r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "Warning" not in r.stderr
    image = Image.open(out)
    assert image.size == (128, 96) and image.mode == "RGB"
    pixels = np.asarray(image).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 100  # a real picture, not a constant or NaN-black frame
