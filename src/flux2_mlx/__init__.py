"""flux2-mlx: FLUX.2 image generation on MLX. Public API; importing it loads neither MLX nor torch."""

from .config import MODELS, ModelSpec, get_spec
from .pipeline import Pipeline, load_pipeline

__version__ = "0.1.0"
__all__ = ["MODELS", "ModelSpec", "Pipeline", "__version__", "get_spec", "load_pipeline"]
