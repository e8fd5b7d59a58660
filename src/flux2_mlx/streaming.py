"""Layer streaming, the framework-free part: which block's weights are read when, on one prefetch thread.

A backend supplies how to read a tensor to host memory (`host`), place it on its device (`place`) and
build a block from placed tensors (`fill`); its stand-in block (a `StreamedBlock` in the backend) calls
`Streamer.take` when the block runs. Blocks are read in execution order, one ahead, cyclically across steps.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .entries import Entry, block_key
from .weights import WeightsError


class Streamer:
    """Reads streamed blocks in execution order, one ahead, on one background thread, which also places
    them in device memory (`place`, the backend's), so the main thread only assembles the block.

    keep_host: keep each block's host form (read and repacked once) for later steps, "stream from RAM";
    otherwise every step reads the file again, "stream from disk", and only the running and the next
    block are in memory.
    """

    def __init__(self, blocks: list[tuple[str, Callable[[], object], dict[str, Entry]]],
                 fill: Callable, host: Callable, place: Callable, keep_host: bool, where: str):
        self.blocks, self.fill, self.host, self.place = blocks, fill, host, place
        self.keep_host, self.where = keep_host, where
        self._kept: dict[int, list] = {}
        self._pending: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flux2-prefetch")

    def _read(self, i: int) -> list:
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

    def take(self, i: int):
        """Block i with its weights on the device; then block i+1 (cyclically: next step) starts reading."""
        future = self._submit(i)
        del self._pending[i]
        label, make, _ = self.blocks[i]
        try:
            tensors = future.result()
        except WeightsError:
            raise
        except Exception as e:  # surfaces in the caller's thread, never a silent hang
            raise WeightsError(f"{self.where}: reading {label} failed ({type(e).__name__}: {e}); "
                               f"check the file, or download it again") from e
        block = self.fill(make(), tensors)
        del tensors, future  # the next block is placed beside this one and no other
        self._submit((i + 1) % len(self.blocks))
        return block


def streamed_entries(entries: dict[str, Entry], lists: list[tuple[str, int]], resident: int
                     ) -> dict[tuple[str, int], dict[str, Entry]]:
    """The entries of every block past the first `resident` in execution order, by (block list, index), named
    inside their block. lists: (block list attribute, its length), in execution order."""
    order = [(attr, i) for attr, n in lists for i in range(n)]
    streamed: dict[tuple[str, int], dict[str, Entry]] = {key: {} for key in order[resident:]}
    attrs = tuple(attr for attr, _ in lists)
    for name, entry in entries.items():
        k = block_key(name, attrs)
        if k and (attrs[k[0]], k[1]) in streamed:
            streamed[attrs[k[0]], k[1]][k[2]] = entry
    return streamed
