"""flux2-mlx: FLUX.2 image generation on MLX. Public API; importing it loads neither MLX nor torch."""

import importlib
import sys

__version__ = "0.1.0"
__all__ = ["MODELS", "ModelSpec", "Pipeline", "__version__", "get_spec", "load_pipeline"]

# The API loads on first use: a bare `import flux2_mlx` (which the `flux2` script runs before console())
# stays instant, so a Ctrl-C during start-up lands inside console()'s try.
_API = {"MODELS": "config", "ModelSpec": "config", "get_spec": "config", "Pipeline": "pipeline",
        "load_pipeline": "pipeline"}


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)


def console():
    """The `flux2` command: Ctrl-C while the CLI imports is one line and exit 130, as it is in a command."""
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    main()
