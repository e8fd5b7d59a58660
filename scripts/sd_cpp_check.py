"""Dev check, not a test: does stable-diffusion.cpp (leejet's sd-cli) read the FLUX.2 GGUFs `flux2 convert`
writes, and generate with them?

sd.cpp sizes a FLUX.2 transformer from its tensors (depth, hidden size, context width, head size) and a
Qwen3 encoder from its tensors too, except the attention, which it fixes at 32 query heads and 8 key/value
heads of 128. So a small random model can stand in for klein-4b:
- a transformer of hidden 256 (2 heads of 128), 1 double + 2 single blocks, in BFL layout;
- a Qwen3 of hidden 256, 36 layers, 32/8 heads of 128, with the real 151936-row vocabulary (sd.cpp
  tokenizes with its own Qwen2 tokenizer), in transformers' layout;
- the real-size FLUX.2 VAE, random, as ae.safetensors.
Transformer and encoder are converted to each --type (the encoder keeps the 27 layers FLUX.2 uses), then
sd-cli generates 64x64 in 2 steps. Checked: exit 0, sd.cpp detects "Flux.2 klein" with the model's depth
and sizes, no tensor is reported missing or unknown, and the image is written and not flat.

Needs an sd-cli build (stable-diffusion.cpp, e.g. the one vendored in the stable-diffusion-cpp-python sdist:
`cmake -B build -DGGML_NATIVE=OFF && cmake --build build --target sd-cli`) and the test extras (torch,
transformers). Usage: python scripts/sd_cpp_check.py SD_CLI [--types Q8_0 Q4_K_M ...]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import _randomize, random_transformer, random_vae, write_qwen_tokenizer  # noqa: E402

from flux2_mlx.config import TransformerConfig, VAEConfig  # noqa: E402
from flux2_mlx.convert import convert  # noqa: E402
from flux2_mlx.weights import save_safetensors  # noqa: E402

DIT = TransformerConfig(in_channels=128, context_in_dim=3 * 256, hidden_size=256, num_heads=2, depth=1,
                        depth_single_blocks=2, use_guidance_embed=False)
QWEN = dict(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def build(root: Path) -> tuple[Path, Path, Path]:
    dit = root / "flux-2-klein-small.safetensors"
    save_safetensors(dit, random_transformer(DIT, seed=1))
    save_safetensors(root / "ae.safetensors", random_vae(VAEConfig(), seed=2))
    _randomize(Qwen3ForCausalLM(Qwen3Config(**QWEN)), seed=3).save_pretrained(root / "text_encoder")
    write_qwen_tokenizer(root / "tokenizer" / "tokenizer.json")  # only for the file's metadata
    return dit, root / "text_encoder", root / "ae.safetensors"


def check(sd_cli: Path, dit: Path, te: Path, vae: Path, out: Path) -> str:
    cmd = [str(sd_cli), "--diffusion-model", str(dit), "--llm", str(te), "--vae", str(vae),
           "-p", "a red fox in snow", "-W", "64", "-H", "64", "--steps", "2", "--cfg-scale", "1", "-s", "42",
           "-o", str(out), "-v"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    problems = []
    if proc.returncode:
        problems.append(f"exit {proc.returncode}")
    if "Flux.2 klein" not in log:
        problems.append("not detected as Flux.2 klein")
    want = (f"depth = {DIT.depth}, depth_single_blocks = {DIT.depth_single_blocks}, guidance_embed = false, "
            f"context_in_dim = {DIT.context_in_dim}, hidden_size = {DIT.hidden_size}, "
            f"num_heads = {DIT.num_heads}")
    if want not in log:
        problems.append(f"flux params differ from '{want}'")
    bad = [ln for ln in log.splitlines()
           if re.search(r"unknown tensor|not found|missing|shape mismatch|error", ln, re.IGNORECASE)]
    problems += bad[:5]
    if out.exists():
        img = np.asarray(Image.open(out).convert("RGB"), np.float32)
        if img.shape != (64, 64, 3) or img.std() < 1:
            problems.append(f"image {img.shape}, std {img.std():.2f}")
    else:
        problems.append("no image written")
    if problems:
        raise SystemExit(f"sd-cli on {dit.name} + {te.name}: " + "; ".join(problems) + "\n" + log[-4000:])
    return next((ln.strip() for ln in log.splitlines() if "flux: depth" in ln), "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sd_cli", type=Path)
    ap.add_argument("--types", nargs="+",
                    default=["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "BF16"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dit, te_dir, vae = build(root)
        for t in args.types:
            g_dit = convert(dit, root / f"dit-{t}.gguf", t, progress=False)
            g_te = convert(te_dir, root / f"qwen3-{t}.gguf", t, progress=False)
            info = check(args.sd_cli, g_dit, g_te, vae, root / f"{t}.png")
            print(f"{t}: sd-cli generated 64x64 from our transformer and Qwen3 GGUFs ({info})")


if __name__ == "__main__":
    main()
