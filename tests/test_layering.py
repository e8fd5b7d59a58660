"""Structural guards: who may import what, and the backend contract.

The numpy core never imports MLX or torch (conversion and its tests run without them), model-math files
import only their framework and config, backends never import each other, and both backends export the
same functions with the same signatures.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "flux2_mlx"
CORE = sorted(f.stem for f in PKG.glob("*.py"))  # every top-level module, new ones included
# quant/: numpy and numba, no MLX or torch
CORE += sorted(f"quant/{f.stem}" for f in (PKG / "quant").glob("*.py"))
MODEL_MATH = ["layers", "transformer", "text_encoder", "vae"]
BACKENDS = {"mlx": ("mlx",), "torch": ("torch",)}  # backend → the only framework its model math may import
CONTRACT = ["use_device", "resolve_dtype", "peak_memory", "load_transformer", "load_text_encoder", "load_vae",
            "from_numpy", "to_numpy", "evaluate", "free", "device_memory"]


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODEL_MATH)
def test_model_math_imports_only_framework_and_config(backend, name):
    framework = BACKENDS[backend][0]
    pkg = f"flux2_mlx.{backend}_backend"
    names = _imports(PKG / f"{backend}_backend" / f"{name}.py")
    foreign = {n for n in names if n.split(".")[0] not in (framework, "flux2_mlx")} - {
        "math", "functools", "__future__"}
    ours = {n for n in names if n.startswith("flux2_mlx")} - {"flux2_mlx.config", f"{pkg}.layers"}
    assert not foreign and not ours, (foreign, ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_never_imports_another_backend_pipeline_or_cli(backend):
    others = {b for b in BACKENDS if b != backend}
    for f in (PKG / f"{backend}_backend").glob("*.py"):
        names = _imports(f)
        assert not _top(names) & {BACKENDS[o][0] for o in others}, f
        assert not {n for n in names if any(n.startswith(f"flux2_mlx.{o}_backend") for o in others)}, f
        assert not names & {"flux2_mlx.pipeline", "flux2_mlx.cli"}, f


def _contract(backend: str) -> dict:
    """The functions a backend package defines itself: its whole public interface."""
    import importlib

    mod = importlib.import_module(f"flux2_mlx.{backend}_backend")
    return {n: v for n, v in vars(mod).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", "") == mod.__name__}


def test_backends_export_the_same_functions_with_the_same_signatures():
    import inspect

    found = {b: _contract(b) for b in BACKENDS}
    assert sorted(found["mlx"]) == sorted(CONTRACT)
    for b, funcs in found.items():
        assert sorted(funcs) == sorted(CONTRACT), b
        for name, fn in funcs.items():
            assert inspect.signature(fn) == inspect.signature(found["mlx"][name]), (b, name)
    assert list(inspect.signature(found["mlx"]["load_transformer"]).parameters) == [
        "cfg", "source", "dtype", "streaming", "compile"]


def test_help_and_api_import_load_no_framework():
    code = ("import sys, flux2_mlx, flux2_mlx.cli; "
            "assert not {'mlx', 'torch'} & set(sys.modules), sorted(m for m in sys.modules if 'mlx' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)
