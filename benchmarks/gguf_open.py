"""Time opening a GGUF text encoder with a real-sized vocabulary (header and metadata only, no tensors):
flux2-mlx's own header parser vs gguf-py's GGUFReader. Prints a markdown row for BENCHMARKS.md."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _common import best_of, run_info
from gguf import GGUFReader, GGUFWriter

from flux2_mlx.weights import GGUFFile


def write(path: Path, vocab: int, merges: int) -> None:
    """A llama.cpp-style encoder GGUF: Tekken-sized vocabulary and merges, one small tensor."""
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges([f"t{i} o{i}" for i in range(merges)])
    w.add_tensor("token_embd.weight", np.zeros((vocab // 1024, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocab", type=int, default=131072, help="Mistral Small 3.2 (Tekken): 131072")
    p.add_argument("--merges", type=int, default=269443)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "enc.gguf"
        write(path, args.vocab, args.merges)
        ours = best_of(lambda: GGUFFile(path), args.repeats)
        tokens = best_of(lambda: GGUFFile(path).field("tokenizer.ggml.tokens"), args.repeats)
        ref = best_of(lambda: GGUFReader(path, "r"), 1)
    info = run_info()
    print(f"| {info['date']} | {info['machine']} | {args.vocab} tokens, {args.merges} merges | {ref:.2f} | "
          f"{ours:.3f} | {tokens:.3f} |")


if __name__ == "__main__":
    main()
