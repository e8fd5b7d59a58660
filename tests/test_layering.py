"""Structural guards (design.md §3, §4): who may import what, and the backend contract."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "flux2_mlx"
CORE = sorted(f.stem for f in PKG.glob("*.py"))  # every top-level module, new ones included
CORE += sorted(f"quant/{f.stem}" for f in (PKG / "quant").glob("*.py"))  # quant/: numpy and numba, no MLX or torch
MODEL_MATH = ["layers", "transformer", "text_encoder", "vae"]
CONTRACT = ["resolve_dtype", "peak_memory", "load_transformer", "load_text_encoder", "load_vae", "from_numpy",
            "to_numpy", "evaluate", "free", "device_memory"]


def _imports(path: Path) -> set[str]:
    """Absolute module names (relative ones resolved inside flux2_mlx) imported anywhere in a file."""
    out = set()
    pkg = ["flux2_mlx"] + list(path.relative_to(PKG).parent.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            out.add(".".join(base + ([node.module] if node.module else [])))
    return out


def _top(names):
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("name", CORE)
def test_core_imports_neither_mlx_nor_torch(name):
    assert not _top(_imports(PKG / f"{name}.py")) & {"mlx", "torch"}
    assert not any(n.startswith("flux2_mlx.mlx_backend") for n in _imports(PKG / f"{name}.py"))


@pytest.mark.parametrize("name", MODEL_MATH)
def test_model_math_imports_only_framework_and_config(name):
    allowed = {"mlx.core", "mlx.nn", "math", "functools", "__future__", "flux2_mlx.config",
               "flux2_mlx.mlx_backend.layers"}
    assert _imports(PKG / "mlx_backend" / f"{name}.py") <= allowed


def test_backend_never_imports_pipeline_cli_or_torch():
    for f in (PKG / "mlx_backend").glob("*.py"):
        names = _imports(f)
        assert "torch" not in _top(names)
        assert not names & {"flux2_mlx.pipeline", "flux2_mlx.cli"}, f


def test_backend_contract():
    import inspect

    import flux2_mlx.mlx_backend as be

    missing = [n for n in CONTRACT if not callable(getattr(be, n, None))]
    assert not missing
    assert list(inspect.signature(be.load_transformer).parameters) == ["cfg", "source", "dtype", "streaming"]
    assert list(inspect.signature(be.load_vae).parameters) == ["cfg", "source", "dtype"]
    assert list(inspect.signature(be.load_text_encoder).parameters) == ["cfg", "source", "dtype", "streaming"]


def test_help_and_api_import_load_no_framework():
    code = ("import sys, flux2_mlx, flux2_mlx.cli; "
            "assert not {'mlx', 'torch'} & set(sys.modules), sorted(m for m in sys.modules if 'mlx' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)
