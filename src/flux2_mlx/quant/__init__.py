"""ggml quantization codecs (gguf-py + our K-quants) and the repack to MLX's affine layout; numpy and numba, no MLX."""

from .ggml import GGMLType, block_info, dequantize, quantize
from .mlx_layout import MLXQuant, dequantize_mlx, repack, requantize

__all__ = ["GGMLType", "MLXQuant", "block_info", "dequantize", "dequantize_mlx", "quantize", "repack", "requantize"]
