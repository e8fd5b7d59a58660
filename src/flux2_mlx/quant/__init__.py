"""ggml quantization codecs (gguf-py + our K-quants) and the repack to the affine layout both backends run;
numpy and numba, no MLX or torch."""

from .affine import AffineQuant, repack
from .ggml import GGMLType, block_info, dequantize, quantize

__all__ = ["GGMLType", "AffineQuant", "block_info", "dequantize", "quantize", "repack"]
