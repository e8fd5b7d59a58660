"""Time the torch backend's VAE decode and encode in both memory layouts, random weights at real dimensions:
NCHW (the CPU default) and channels-last (the CUDA default), side by side in one process.

Prints a markdown row per layout for BENCHMARKS.md and the largest relative difference between the two
decodes (the layouts accumulate the convolutions in different orders).
"""

from __future__ import annotations  # noqa: I001 -- _common first (preloads OpenBLAS before mlx)

import argparse
import time
from functools import partial

from _common import run_info, write_json
from transformer_step import _numpy_entries

import numpy as np
import torch

from flux2_mlx import torch_backend as be
from flux2_mlx.config import MODELS, vae_shapes
from flux2_mlx.torch_backend.load import load_vae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default=None)
    p.add_argument("--size", type=int, default=1024, help="square image side in pixels (a multiple of 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(be.use_device(args.device))
    cfg = MODELS["klein-4b"].vae  # one autoencoder for the whole family
    rng = np.random.default_rng(0)
    z = be.from_numpy(rng.standard_normal((1, args.size // 16, args.size // 16, 4 * cfg.z_channels),
                                          np.float32))
    image = be.from_numpy(rng.uniform(-1, 1, (1, args.size, args.size, 3)).astype(np.float32))
    results, outputs = [], {}
    for layout in ("nchw", "channels_last"):
        vae = load_vae(cfg, _numpy_entries(vae_shapes(cfg), "float32"), dtype=torch.float32, device=device,
                       channels_last=layout == "channels_last")
        times = {}
        for part, run in (("decode", partial(vae.decode, z)), ("encode", partial(vae.encode, image))):
            outputs[layout, part] = be.to_numpy(run())  # warm-up
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                be.evaluate()
                runs.append(time.perf_counter() - start)
            times[part] = min(runs)
        results.append({**run_info(), "device": str(device), "torch": torch.__version__, "layout": layout,
                        "size": args.size, "decode_s": times["decode"], "encode_s": times["encode"]})
        del vae, run
        be.free()
    for r in results:
        print(f"| {r['date']} | {r['device']} | torch {r['torch']} | {r['layout']} | {r['size']}² | "
              f"{r['decode_s']:.2f} | {r['encode_s']:.2f} |")
    a, b = outputs["nchw", "decode"], outputs["channels_last", "decode"]
    print(f"decode difference between layouts: {np.abs(a - b).max() / np.abs(a).max():.2e} "
          "of the largest value")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
