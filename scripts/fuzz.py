"""Fuzz the weight-file readers: `python scripts/fuzz.py --mutations 100000 --jobs 2`.

Seeded mutations of tiny real-layout model files (safetensors BFL and diffusers, GGUF transformer, GGUF Qwen3
encoder with its vocabulary) through parsing, `flux2 info`, loading and `flux2 convert` planning; see
tests/fuzzing.py. Exits 1 when any mutation raised an undocumented exception, refused with an error not
naming the file, ran past --time-cap, grew memory past --mem-cap or crashed the process. `--only I` replays
one mutation and prints its traceback.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzzing  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutations", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first mutation index")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--time-cap", type=float, default=5.0, help="seconds one mutation may take")
    ap.add_argument("--mem-cap", type=float, default=1.0,
                    help="GB one mutation may add to the worker's memory")
    ap.add_argument("--only", type=int, help="replay mutation ONLY in this process and show what happens")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp)
        fuzzing.prepare(corpus)
        if args.only is not None:
            return replay(corpus, args.seed, args.only)
        indices = list(range(args.start, args.start + args.mutations))
        report = fuzzing.fuzz(corpus, args.seed, indices, jobs=args.jobs, time_cap=args.time_cap,
                              mem_cap=int(args.mem_cap * 2**30))
    print(report.summary())
    return 1 if report.failures else 0


def replay(corpus: Path, seed: int, i: int) -> int:
    import pickle

    specs = pickle.loads((corpus / "specs.pkl").read_bytes())
    base, data, desc = fuzzing.mutate(seed, i, specs)
    path = corpus / f"m{i}{Path(base).suffix}"
    path.write_bytes(data)
    print(f"mutation {i}: {base}: {desc}")
    for target, fn in fuzzing.TARGETS.items():
        try:
            fn(path, specs[base][1])
            print(f"{target}: accepted")
        except Exception:
            print(f"{target}: " + traceback.format_exc())
    return 0


if __name__ == "__main__":
    sys.exit(main())
