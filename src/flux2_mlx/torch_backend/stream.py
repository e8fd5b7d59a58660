"""Layer streaming: blocks whose weights are read just in time, the next one prefetched on a thread.

The model files stay as they are. A streamed block is a stand-in in the model's block list: when called
it takes its weights (read, for GGUF repacked, and copied to the device by the prefetch thread while the
previous block computed), builds the real block, runs it, and lets the weights go. On CUDA the copies
run on a side stream from page-locked host memory, and the compute stream waits on an event for them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from ..keymap import Entry
from ..weights import WeightsError


class Streamer:
    """Reads streamed blocks in execution order, one ahead, on one background thread, which also places
    them on the device (`place`), so the main thread only assembles the block.

    keep_host: keep each block's host form (read and repacked once) for later steps, "stream from RAM";
    otherwise every step reads the file again, "stream from disk", and only the running and the next
    block are in memory.
    """

    def __init__(self, blocks: list[tuple[str, Callable[[], nn.Module], dict[str, Entry]]],
                 fill: Callable, host: Callable, place: Callable, keep_host: bool, where: str,
                 device: torch.device):
        self.blocks, self.fill, self.host, self.place = blocks, fill, host, place
        self.keep_host, self.where = keep_host, where
        self.cuda = device.type == "cuda"
        self._copies = torch.cuda.Stream(device) if self.cuda else None
        self._ran = None  # CUDA: an event after the last streamed block's kernels
        self._kept: dict[int, list] = {}
        self._pending: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flux2-prefetch")

    def _read(self, i: int) -> tuple[list, torch.cuda.Event | None]:
        if self.cuda:
            with torch.cuda.stream(self._copies):
                tensors = self._read_host(i)
                return tensors, self._copies.record_event()
        return self._read_host(i), None

    def _read_host(self, i: int) -> list:
        entries = self.blocks[i][2].items()
        if not self.keep_host:  # tensor by tensor: one host tensor at a time beside the placed ones
            return [(name, self.place(self.host(e.load()))) for name, e in entries]
        if i not in self._kept:
            self._kept[i] = [(name, self.host(e.load())) for name, e in entries]
        return [(name, self.place(t)) for name, t in self._kept[i]]

    def _submit(self, i: int) -> Future:
        if i not in self._pending:
            self._pending[i] = self._pool.submit(self._read, i)
        return self._pending[i]

    def take(self, i: int) -> nn.Module:
        """Block i with its weights on the device; then block i+1 (cyclically: the next step) starts reading."""
        future = self._submit(i)
        del self._pending[i]
        label, make, _ = self.blocks[i]
        try:
            tensors, copied = future.result()
        except WeightsError:
            raise
        except Exception as e:  # surfaces in the caller's thread, never a silent hang
            raise WeightsError(f"{self.where}: reading {label} failed ({type(e).__name__}: {e}); "
                               f"check the file, or download it again") from e
        if copied is not None:
            compute = torch.cuda.current_stream()
            compute.wait_event(copied)
            for _, t in tensors:  # allocated on the copy stream, freed after the compute stream used them
                for part in (t.weight, t.scales, t.biases) if hasattr(t, "scales") else (t,):
                    part.record_stream(compute)
        block = self.fill(make(), tensors)
        del tensors, future  # the next block is placed beside this one and no other
        self._submit((i + 1) % len(self.blocks))
        return block

    def ran(self) -> None:
        """After a streamed block's kernels are queued: wait for the block before (CUDA queues ahead of the
        GPU, and every block in flight holds its weights), so at most three blocks' weights are in memory."""
        if self.cuda:
            if self._ran is not None:
                self._ran.synchronize()
            self._ran = torch.cuda.current_stream().record_event()


class StreamedBlock(nn.Module):
    """Stands where a block module stood: same call, weights present only while it runs."""

    def __init__(self, streamer: Streamer, index: int):
        super().__init__()
        self.streamer, self.index = streamer, index

    def forward(self, *args, **kwargs):
        out = self.streamer.take(self.index)(*args, **kwargs)
        self.streamer.ran()
        return out
