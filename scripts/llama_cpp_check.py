"""Dev check, not a test: do llama.cpp's own tools read the text-encoder GGUFs `flux2 convert` writes?

For a tiny random Qwen3 (qwen3 arch, Qwen BPE vocabulary) and a tiny random Mistral text stack (llama arch,
Q/K rows permuted, the real Tekken vocabulary), in transformers' layout: convert with every layer kept
(`all_layers`, so the file is a whole llama.cpp model), then
- `llama-tokenize` must give the ids our tokenizer gives (the file's tokenizer metadata);
- `llama-embedding --pooling none` must give transformers' final hidden states (names, shapes, the
  permutation, norms, RoPE) within the error of the type (llama.cpp also rounds activations: Q8_0 to 8 bits);
- the default file (only the layers FLUX.2 uses) must load too.

Needs a llama.cpp build (`cmake --build build --target llama-embedding llama-tokenize`), torch and
transformers (the test extras). Usage: python scripts/llama_cpp_check.py LLAMA_CPP_BIN_DIR
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import _randomize, write_qwen_tokenizer, write_tekken_tokenizer  # noqa: E402

from flux2_mlx.convert import convert  # noqa: E402

TEXT = "A photograph of a red fox in snow, highly detailed."
CTX = ("-c", "512", "-b", "512", "-ub", "512", "-fit", "off")  # a smaller -c trips an assert in this build
TYPES = {"F16": 2e-3, "Q8_0": 3e-2}  # max relative L2 error of the hidden states accepted per type


def tiny(kind: str, root: Path) -> Path:
    """A 4-layer model with its tokenizer, as the FLUX.2 repos lay them out (text_encoder/, tokenizer/)."""
    if kind == "qwen3":
        write_qwen_tokenizer(root / "tokenizer" / "tokenizer.json")
    else:
        write_tekken_tokenizer(root / "tokenizer")
    vocab = json.loads((root / "tokenizer" / "tokenizer.json").read_text())
    n_vocab = max(len(vocab["model"]["vocab"]), 1 + max(t["id"] for t in vocab["added_tokens"]))
    common = dict(vocab_size=n_vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False)
    model = (Qwen3ForCausalLM(Qwen3Config(**common)) if kind == "qwen3"
             else MistralForCausalLM(MistralConfig(**common)))
    _randomize(model, seed=5).save_pretrained(root / "text_encoder")
    if kind == "qwen3":
        (root / "tokenizer" / "tokenizer_config.json").write_text(
            json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return root / "text_encoder"


def run(bin_dir: Path, tool: str, *args: str) -> str:
    out = subprocess.run([str(bin_dir / tool), *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{tool} failed:\n{out.stderr}")
    return out.stdout


def check(kind: str, bin_dir: Path, root: Path) -> list[str]:
    folder = tiny(kind, root)
    ours = tokenizer_ids(root / "tokenizer" / "tokenizer.json")
    hf = AutoModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    lines = []
    for qtype, tol in TYPES.items():
        gguf = convert(folder, root / f"{kind}-{qtype}.gguf", qtype, all_layers=True, progress=False)
        ids = token_ids(bin_dir, gguf, "--no-bos")
        with_bos = token_ids(bin_dir, gguf)  # what llama-embedding feeds the model (BOS as the file says)
        out = json.loads(run(bin_dir, "llama-embedding", "-m", str(gguf), "-p", TEXT, "--pooling", "none",
                             "--embd-normalize", "-1", "--embd-output-format", "json", *CTX))
        got = np.array([d["embedding"] for d in out["data"]], np.float32)
        with torch.no_grad():
            ref = hf(torch.tensor([with_bos])).last_hidden_state[0].numpy()
        err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        ok = ids == ours and got.shape == ref.shape and err < tol
        lines.append(f"{kind} {qtype}: llama-tokenize ids {'==' if ids == ours else '!='} ours ({len(ids)} "
                     f"tokens, BOS {'added' if len(with_bos) > len(ids) else 'not added'}); "
                     f"llama-embedding vs transformers rel. L2 {err:.2e} over {len(got)} tokens "
                     f"(limit {tol:g}) -> {'OK' if ok else 'FAIL'}")
    small = convert(folder, root / f"{kind}-default.gguf", "Q8_0", progress=False)
    try:
        run(bin_dir, "llama-embedding", "-m", str(small), "-p", TEXT, "--pooling", "none", *CTX)
        lines.append(f"{kind} default file (FLUX.2's layers only): llama.cpp loads it -> OK")
    except SystemExit as e:
        why = [line for line in str(e).splitlines() if " E " in line][:2]
        lines.append(f"{kind} default file (FLUX.2's layers only): llama.cpp refuses it: {' / '.join(why)}")
    return lines


def token_ids(bin_dir: Path, gguf: Path, *flags: str) -> list[int]:
    out = run(bin_dir, "llama-tokenize", "-m", str(gguf), "-p", TEXT, "--ids", "--log-disable", *flags)
    return [int(i) for i in out.strip().strip("[]").split(",")]


def tokenizer_ids(path: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).encode(TEXT, add_special_tokens=False).ids


def main() -> None:
    bin_dir = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("qwen3", "mistral"):
            (Path(tmp) / kind).mkdir()
            for line in check(kind, bin_dir, Path(tmp) / kind):
                print(line, flush=True)


if __name__ == "__main__":
    main()
