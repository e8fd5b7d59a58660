"""Layer streaming on MLX: the stand-in block (the reading schedule is the core's `streaming.Streamer`).

The model files stay as they are. A streamed block is a stand-in in the model's block list: when called
it takes its weights (read, for GGUF repacked, and copied into MLX memory by the prefetch thread while
the previous block computed), builds the real block, runs and evaluates it, and lets the weights go.
"""

from __future__ import annotations

import mlx.core as mx

from ..streaming import Streamer


class StreamedBlock:
    """Stands where a block module stood: same call, weights present only while it runs."""

    def __init__(self, streamer: Streamer, index: int):
        self.streamer, self.index = streamer, index

    def __call__(self, *args, **kwargs):
        out = self.streamer.take(self.index)(*args, **kwargs)
        mx.eval(out)  # the block's weights are released when this returns
        return out
