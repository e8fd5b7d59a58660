"""LoRA cost on a klein-4B-sized transformer (real widths, --double-blocks/--single-blocks deep), random
weights: read + merge time and memory of a PEFT LoRA on every block Linear, per rank, and the transformer
step with the merged LoRA against the step without (a merged LoRA should cost nothing per step).

Prints markdown rows for BENCHMARKS.md. The base weights are bf16 arrays held in memory, so the merge time
is the LoRA's arithmetic (float32 W + s·B·A per weight), not disk reads.
"""

from __future__ import annotations  # noqa: I001 -- _common first (preloads OpenBLAS before mlx)

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from _common import block_linears, gguf_entries, numpy_entries, run_info

import numpy as np

from flux2_mlx.config import MODELS, transformer_shapes
from flux2_mlx.dit_names import transformer_to_diffusers
from flux2_mlx.entries import Entry
from flux2_mlx.lora import merged_entries, read_lora
from flux2_mlx.sampling import prc_img, prc_txt
from flux2_mlx.weights import f32_to_bf16, save_safetensors, to_float32


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond on a thread (Linux)."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = False
        self._thread = threading.Thread(target=self._poll)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.added = max(self.peak, _rss()) - self.start


def _base(shapes) -> dict[str, Entry]:
    """bf16 N(0, 1/fan_in) weights (norm scales 1), generated once and kept, as a file's would be."""
    drawn = numpy_entries(shapes, "bfloat16")
    return {k: Entry(e.shape, lambda a=e.load(): a, "BF16") for k, e in drawn.items()}


def _peft_file(path: Path, shapes, rank: int) -> None:
    """A bf16 PEFT LoRA on every block Linear, with diffusers' module names (Q, K, V apart), alpha = rank."""
    rng = np.random.default_rng(rank)
    tensors = {}
    for name in block_linears(shapes):
        rows, cols = shapes[name]
        for module, part in transformer_to_diffusers({name: np.arange(rows)}).items():
            m = f"transformer.{module.removesuffix('.weight')}"
            for role, shape in (("lora_A", (rank, cols)), ("lora_B", (len(part), rank))):
                tensors[f"{m}.{role}.weight"] = f32_to_bf16(rng.standard_normal(shape, np.float32) * 0.01)
    meta = {"lora_adapter_metadata": json.dumps({"r": rank, "lora_alpha": rank})}
    save_safetensors(path, tensors, meta)


def _merge_row(base, shapes, rank: int, scale_full: float, tmp: Path):
    """(markdown row, the read LoRA): read + merge time and memory of one rank's LoRA."""
    path = tmp / f"r{rank}.safetensors"
    _peft_file(path, shapes, rank)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        lora = read_lora(path, shapes)
        t1 = time.perf_counter()
        merged = merged_entries(base, [(lora, 1.0)])
        for name in lora.terms:  # each merged weight loaded and dropped, as the backends place them
            merged[name].load()
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    for name in lora.terms:  # what loading these weights costs without a LoRA
        to_float32(base[name].load())
    plain = time.perf_counter() - t3
    mb = path.stat().st_size / 1e6
    return (f"| {rank} | {len(lora.terms)} | {mb:.0f} | {t1 - t0:.2f} | {t2 - t1:.2f} | {plain:.2f} | "
            f"{mem.added / 1e6:.0f} | {(t2 - t0) * scale_full:.1f} | {mb * scale_full:.0f} |"), lora


def _step_rows(cfg, base, lora, backends, args) -> list[str]:
    """Each backend's forward with the rank's LoRA and without, timed round-robin: merged into dense weights,
    or with --gguf beside the quantized blocks (the unmerged branch)."""
    base = gguf_entries(base, args.gguf)
    h = w = args.size // 16
    rng = np.random.default_rng(1)
    inp = dict(x=rng.standard_normal((1, h * w, cfg.in_channels), np.float32),
               ctx=rng.standard_normal((1, args.text_tokens, cfg.context_in_dim), np.float32),
               x_ids=prc_img(h, w), ctx_ids=prc_txt(args.text_tokens), t=np.array([0.5], np.float32),
               g=np.array([4.0], np.float32))
    built = []
    for name in backends:
        if name == "torch":
            import torch

            import flux2_mlx.torch_backend as be
            torch.set_num_threads(os.cpu_count())
        else:
            import flux2_mlx.mlx_backend as be
        args_in = [be.from_numpy(inp[k]) for k in ("x", "x_ids", "t", "ctx", "ctx_ids", "g")]
        for label, entries in (("none", base), ("merged", merged_entries(base, [(lora, 1.0)]))):
            model = be.load_transformer(cfg, entries, dtype=be.resolve_dtype("float32"))
            built.append((name, label, lambda be=be, model=model: be.to_numpy(model(*args_in))))
    times = {(n, label): [] for n, label, _ in built}
    for i in range(args.warmup + args.repeats):
        for n, label, forward in built:
            t0 = time.perf_counter()
            forward()
            if i >= args.warmup:
                times[(n, label)].append(time.perf_counter() - t0)
    rows = []
    for name in backends:
        a, b = statistics.median(times[(name, "none")]), statistics.median(times[(name, "merged")])
        weights = f"float32 + {args.gguf} blocks" if args.gguf else "float32"
        rows.append(f"| {name} | {cfg.depth}+{cfg.depth_single_blocks} | {args.size}² + {args.text_tokens} "
                    f"text | {weights} | {len(lora.terms)} | {a:.2f} | {b:.2f} | {b / a:.3f}× |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--double-blocks", type=int, default=1)
    p.add_argument("--single-blocks", type=int, default=2)
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    p.add_argument("--backend", action="append", choices=["torch", "mlx"],
                   help="step timing on these backends (default: torch), with the first rank's LoRA")
    p.add_argument("--size", type=int, default=128, help="image side in pixels for the step timing")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gguf", default=None, metavar="TYPE", choices=["Q8_0", "Q4_K"],
                   help="step timing with the blocks stored as this ggml type: the LoRA runs beside them")
    args = p.parse_args()

    full = MODELS["klein-4b"].transformer
    cfg = dataclasses.replace(full, depth=args.double_blocks, depth_single_blocks=args.single_blocks)
    shapes = transformer_shapes(cfg)
    full_shapes = transformer_shapes(full)
    # read + merge and the file grow with the block Linears' weights: scaled up to the full model
    scale_full = (sum(np.prod(full_shapes[k]) for k in block_linears(full_shapes))
                  / sum(np.prod(shapes[k]) for k in block_linears(shapes)))
    info = run_info()
    print(f"{info['date']}, {info['machine']}, klein-4b {cfg.depth}+{cfg.depth_single_blocks} of "
          f"{full.depth}+{full.depth_single_blocks} blocks")
    base = _base(shapes)
    print("| rank | weights merged | LoRA file MB | read s | merge s | same weights, no LoRA: bf16→f32 s "
          "| peak RSS added MB | full model: read + merge s (est.) | full model: file MB (est.) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    loras = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in args.ranks:
            row, lora = _merge_row(base, shapes, rank, scale_full, Path(tmp))
            print(row, flush=True)
            loras.append(lora)
    how = f"beside {args.gguf} blocks" if args.gguf else "merged"
    print(f"\nstep, rank-{args.ranks[0]} LoRA {how} vs none (median of {args.repeats}, round-robin):")
    print("| backend | blocks | tokens | weights | weights with a LoRA | no LoRA s/step "
          "| with the LoRA s/step | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in _step_rows(cfg, base, loras[0], args.backend or ["torch"], args):
        print(row)


if __name__ == "__main__":
    main()
