"""Shared fixtures: tiny random FLUX.2 models written in the real BFL and diffusers layouts."""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from flux2_mlx.config import tiny_spec, transformer_shapes, vae_shapes
from flux2_mlx.vae_names import vae_to_diffusers
from flux2_mlx.weights import save_safetensors


def _mlx_multiplies_with_torchs_blas() -> None:
    """MLX's Linux CPU wheel multiplies with netlib's reference BLAS, whose cblas_sgemm calls the first
    Fortran `sgemm_` the dynamic linker finds. torch's CPU library exports an optimised one: loaded with
    global symbols before the first `import mlx.core` (nothing above imports it), it takes the reference's
    place, and the tiny models' MLX matmuls and convolutions run 7-25x faster. Only the float32 summation
    order changes."""
    torch = importlib.util.find_spec("torch")
    lib = Path(torch.origin).parent / "lib" / "libtorch_cpu.so" if torch and torch.origin else None
    if sys.platform == "linux" and lib is not None and lib.exists():
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def _one_share_of_the_cores_per_worker() -> None:
    """Under pytest-xdist each worker gets its share of the cores for torch's and MKL's thread pools;
    two workers each spinning two threads on two cores wait on each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(max(1, cores // workers)))


_one_share_of_the_cores_per_worker()
_mlx_multiplies_with_torchs_blas()

os.environ["HF_HUB_OFFLINE"] = "1"  # the tests never touch the network


def pytest_collection_finish(session):
    """Every test module is imported (torch, diffusers, transformers, MLX): move their objects out of the
    cyclic collector's reach. Both backends' free() runs gc.collect() at every phase change, and walking
    the frameworks' objects made each call ~0.25 s here, several per pipeline run."""
    gc.collect()
    gc.freeze()


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core, at most 4 (each imports torch, diffusers, transformers and MLX, about
    1 GB, and the tiny tests gain little past that); one core runs in-process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 4) if cores > 1 else 0


# Longest files first. pytest-xdist hands out whole files (--dist loadfile), by default the ones with the
# most tests first, which left the few long tests (fuzzing, signals, subprocess runs) for the end while the
# other worker sat idle. Each run records every file's seconds in pytest's cache for the next; a file with
# none recorded counts a second per test.
FILE_SECONDS = "flux2/file-seconds"
_spent: dict[str, float] = {}  # this run's seconds per file, on the controller (or the only process)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # keep the order pytest_collection_modifyitems gives


def pytest_collection_modifyitems(config, items):
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    seconds = cache.get(FILE_SECONDS, {}) if cache else {}
    counts: dict[str, int] = {}
    for item in items:
        counts[item.location[0]] = counts.get(item.location[0], 0) + 1
    cost = {f: seconds.get(f, float(n)) for f, n in counts.items()}
    items.sort(key=lambda item: -cost[item.location[0]])  # stable: a file's tests keep their order


def pytest_runtest_logreport(report):
    """Each file's setup, call and teardown seconds (workers' reports reach the controller too)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        _spent[report.location[0]] = _spent.get(report.location[0], 0.0) + report.duration


def pytest_sessionfinish(session):
    cache = getattr(session.config, "cache", None)
    if cache and _spent and not os.environ.get("PYTEST_XDIST_WORKER"):
        seconds = cache.get(FILE_SECONDS, {})
        seconds.update({f: round(s, 2) for f, s in _spent.items()})
        cache.set(FILE_SECONDS, seconds)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After a module's last test (its fixtures torn down), the same again: what its tests imported lazily
    and the session's cached models otherwise made every later full collection slower (171 of them took
    12.8 s of the suite)."""
    yield
    if nextitem is None or nextitem.module is not item.module:
        gc.collect()
        gc.freeze()


def random_transformer(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """BFL-named float32 DiT weights, scaled so activations stay O(1) and nothing is trivially 0/1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in transformer_shapes(cfg).items():
        if name.endswith(".scale"):
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = a.astype(np.float32)
    return out


def random_vae(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """BFL-named float32 VAE weights (ae.safetensors layout, PyTorch conv shapes) with O(1) activations;
    no tensor is trivially 0 or 1 (the batch-norm statistics included)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in vae_shapes(cfg).items():
        if name == "bn.running_mean":
            a = 0.5 * rng.standard_normal(shape)
        elif name == "bn.running_var":
            a = rng.uniform(0.3, 2.0, shape)
        elif len(shape) == 4:  # conv [O, I, kh, kw]
            a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif name.endswith(".weight"):  # GroupNorm scale
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            a = 0.05 * rng.standard_normal(shape)
        out[name] = a.astype(np.float32)
    return out


def diffusers_transformer(cfg, bfl: dict[str, np.ndarray]):
    """diffusers' Flux2Transformer2DModel filled through diffusers' own BFL→diffusers converter."""
    import torch
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    model = Flux2Transformer2DModel(
        in_channels=cfg.in_channels, num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim, mlp_ratio=cfg.mlp_ratio,
        axes_dims_rope=tuple(cfg.axes_dim), rope_theta=cfg.theta,
        guidance_embeds=cfg.use_guidance_embed,
    )
    sd = convert_flux2_transformer_checkpoint_to_diffusers(
        {k: torch.from_numpy(v.copy()) for k, v in bfl.items()})
    model.load_state_dict(sd, strict=True)
    return model.eval()


def diffusers_vae(cfg, bfl: dict[str, np.ndarray]):
    """diffusers' AutoencoderKLFlux2 with these weights (the VAE map itself is proven in
    test_vae_parity against diffusers' own LDM converter)."""
    import torch
    from diffusers import AutoencoderKLFlux2

    model = AutoencoderKLFlux2(
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_groups, batch_norm_eps=cfg.bn_eps,
    )
    sd = {k: torch.from_numpy(v.copy()) for k, v in vae_to_diffusers(bfl).items()}
    model.load_state_dict(sd, strict=True)
    return model.eval()


def flux2_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # The scheduler config the FLUX.2 diffusers repos ship (FLUX.1-dev's); mu is passed in explicitly.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def diffusers_run(m, variant, embeds, neg, noise, *, steps, guidance, output_type, **call) -> np.ndarray:
    """One diffusers pipeline run (Flux2Pipeline for dev, Flux2KleinKVPipeline for klein-9b-kv, else
    Flux2KleinPipeline) on model m's weights, with our embeddings and noise (1, C, h, w); `call` passes
    width, height, image, sigmas… through. "latent" output comes back as normalized tokens (1, N, C)."""
    import torch
    from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline, Flux2Pipeline

    kw = dict(scheduler=flux2_scheduler(), vae=m.ref_vae, text_encoder=None, tokenizer=None,
              transformer=m.ref_transformer)
    call.update(prompt_embeds=torch.from_numpy(embeds), latents=torch.from_numpy(noise),
                num_inference_steps=steps, output_type=output_type)
    if variant == "dev":
        pipe, call["guidance_scale"] = Flux2Pipeline(**kw), guidance
    elif variant == "klein-9b-kv":
        pipe = Flux2KleinKVPipeline(**kw)
    else:
        pipe, call["guidance_scale"] = Flux2KleinPipeline(**kw, is_distilled=variant == "klein-4b"), guidance
        if neg is not None:
            call["negative_prompt_embeds"] = torch.from_numpy(neg)
    with torch.no_grad():
        out = pipe(**call).images
    if output_type == "latent" and out.ndim == 4:
        # The klein pipelines return de-normalized, unpatchified latents: undo both to get tokens.
        bn = m.ref_vae.bn
        out = Flux2Pipeline._patchify_latents(out)
        out = (out - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4)
        out = Flux2Pipeline._pack_latents(out)
    return out.numpy() if hasattr(out, "numpy") else out


def denoise_phase(budget: int, weights, cfg, *, text: int, width: int, height: int, fused: bool,
                  activations=None):
    """The memory planner's denoise phase (memory.plan_phases) for a transformer alone: `weights` (a
    memory.Weights) of config `cfg` at width x height px and `text` prompt tokens, no text encoder, and an
    empty VAE whose decode needs nothing."""
    import dataclasses

    from flux2_mlx import memory

    acts = dataclasses.replace(activations or memory.Activations(), vae_decode_maps=0)
    plan = memory.plan_phases(budget, transformer=weights, vae=memory.Weights("vae", 0, [], []),
                              text_encoder=None, hidden=cfg.hidden_size, heads=cfg.num_heads, width=width,
                              height=height, compute_bytes=4, fused_attention=fused, activations=acts,
                              text_tokens=text)
    return plan.phase("denoise")


def write_gguf(path, tensors: dict, types: dict, arch: str | None = "flux", prefix: str = "", kv=None):
    """A GGUF file by gguf-py's own GGUFWriter. `types[name]` (a GGMLQuantizationType or its name; F32 when
    absent) picks each tensor's ggml type: gguf-py quantizes the types it can, flux2_mlx.quant the K-quants
    it cannot. arch None: no general.architecture (stable-diffusion.cpp-style files); prefix: before every
    tensor name; kv: key → string value, or a callable given the writer."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter
    from gguf import quants as gq

    from flux2_mlx.quant import quantize

    w = GGUFWriter(str(path), arch or "unused")
    if arch is None:
        del w.kv_data[0]["general.architecture"]
    w.add_quantization_version(2)
    w.add_file_type(7)
    for key, value in (kv or {}).items():
        value(w) if callable(value) else w.add_string(key, value)
    for name, a in tensors.items():
        t = types.get(name, T.F32)
        t = T[t] if isinstance(t, str) else T(t)
        a = np.ascontiguousarray(a, np.float32)
        if t == T.F32:
            w.add_tensor(prefix + name, a)
            continue
        try:
            raw = gq.quantize(a, t)
        except NotImplementedError:  # the K-quants: gguf-py only dequantizes them
            raw = quantize(a, t)
        w.add_tensor(prefix + name, raw, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


class ShapeSource:
    """A WeightSource stand-in that knows shapes only (for full-size key maps without the memory)."""

    def __init__(self, shapes, path="full"):
        self.shapes, self.path = dict(shapes), path

    def keys(self):
        return list(self.shapes)

    def shape(self, k):
        return tuple(self.shapes[k])

    def get(self, k):
        raise AssertionError("shape-only source")


class TinyModel:
    """A tiny random model of one variant, kept as BFL-named arrays plus both on-disk layouts."""

    def __init__(self, name: str, root):
        self.name = name
        self.transformer = random_transformer(self.spec.transformer, seed=1)
        self.vae = random_vae(self.spec.vae, seed=2)
        self.bfl_dir = root / "bfl"
        self.bfl_dir.mkdir()
        save_safetensors(self.bfl_dir / self.spec.transformer_file, self.transformer)
        save_safetensors(self.bfl_dir / "ae.safetensors", self.vae)
        self.ref_transformer = diffusers_transformer(self.spec.transformer, self.transformer)
        self.ref_vae = diffusers_vae(self.spec.vae, self.vae)
        self.diffusers_dir = root / "diffusers"
        # diffusers writes its own folders (config.json + diffusion_pytorch_model.safetensors).
        self.ref_transformer.save_pretrained(self.diffusers_dir / "transformer")
        self.ref_vae.save_pretrained(self.diffusers_dir / "vae")

    @property
    def spec(self):
        """The variant as registered now: a module under `short_prompts` sees its short prompts, and the
        session's shared model does not keep them for the modules after it."""
        return tiny_spec(self.name)



def sigint_as_on_a_terminal() -> None:
    """preexec_fn for a child that a test interrupts: SIGINT back to its default. A child of a background
    job in a non-interactive shell starts with SIGINT ignored, and Python then never raises
    KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    cache = {}

    def get(name: str) -> TinyModel:
        if name not in cache:
            cache[name] = TinyModel(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def write_qwen_tokenizer(path) -> None:
    """A tiny but real byte-level BPE tokenizer.json with the Qwen chat special tokens (< 512 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["A red cat sits on a blue sofa.", "The quick brown fox jumps over the lazy dog.",
            "user assistant think", "A photograph of a mountain lake at sunset, highly detailed."] * 20
    tok.train_from_iterator(text, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def write_tekken_tokenizer(folder):
    """mistral-common's real Tekken vocabulary converted to tokenizer.json by transformers (as the
    Mistral-Small repos ship it) → (tekken.json path, tokenizer.json path). The conversion (~3 s) runs once
    per installed transformers/mistral-common pair, for every xdist worker and later session: its output is
    kept in the temporary folder, written atomically under a lock."""
    import fcntl
    import shutil
    import tempfile
    import warnings
    from pathlib import Path

    import mistral_common
    import transformers
    from transformers.integrations.mistral import convert_tekken_tokenizer

    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tekken_240911.json")
    cache = (Path(tempfile.gettempdir()) / f"flux2-tests-{os.getuid()}" /
             f"tekken-{transformers.__version__}-{mistral_common.__version__}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / "tekken.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cache.is_dir():
            tmp = Path(tempfile.mkdtemp(dir=cache.parent))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                convert_tekken_tokenizer(src).save_pretrained(tmp)
            tmp.rename(cache)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in cache.iterdir():
        shutil.copyfile(f, folder / f.name)
    return src, folder / "tokenizer.json"


def _randomize(model, seed: int):
    """O(1) activations; HF's 0.02-std init would make every prompt look alike."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if p.ndim == 1
                    else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def write_tiny_dev_repo(root):
    """A tiny random FLUX.2 [dev] laid out like its repo: flux2-dev.safetensors, diffusers vae/, a
    Mistral3ForConditionalGeneration text_encoder/ (tiny vision tower) and the real Tekken tokenizer."""
    import dataclasses

    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    spec = tiny_spec("dev")
    te = dataclasses.replace(spec.text_encoder, vocab_size=131072)  # Tekken's ids
    save_safetensors(root / spec.transformer_file, random_transformer(spec.transformer, seed=1))
    diffusers_vae(spec.vae, random_vae(spec.vae, seed=2)).save_pretrained(root / "vae")
    text = MistralConfig(vocab_size=te.vocab_size, hidden_size=te.hidden_size,
                         intermediate_size=te.intermediate_size, num_hidden_layers=te.num_hidden_layers,
                         num_attention_heads=te.num_attention_heads,
                         num_key_value_heads=te.num_key_value_heads,
                         head_dim=te.head_dim, rms_norm_eps=te.rms_norm_eps, sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": te.rope_theta})
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, head_dim=8, image_size=28, patch_size=14)
    model = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision))
    _randomize(model, seed=3).save_pretrained(root / "text_encoder")
    (root / "tokenizer").mkdir()
    write_tekken_tokenizer(root / "tokenizer")
    return spec


def write_tiny_repo(root, name: str = "klein-4b"):
    """A tiny random klein model laid out like the FLUX.2-klein-4B repo: BFL transformer file at the
    root, diffusers vae/, transformers text_encoder/, tokenizer/tokenizer.json."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    spec = tiny_spec(name)
    save_safetensors(root / spec.transformer_file, random_transformer(spec.transformer, seed=1))
    diffusers_vae(spec.vae, random_vae(spec.vae, seed=2)).save_pretrained(root / "vae")
    te = spec.text_encoder
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=te.vocab_size, hidden_size=te.hidden_size, intermediate_size=te.intermediate_size,
        num_hidden_layers=te.num_hidden_layers, num_attention_heads=te.num_attention_heads,
        num_key_value_heads=te.num_key_value_heads, head_dim=te.head_dim, rms_norm_eps=te.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": te.rope_theta}, tie_word_embeddings=True))
    _randomize(model, seed=3).save_pretrained(root / "text_encoder")
    write_qwen_tokenizer(root / "tokenizer" / "tokenizer.json")
    return spec


@pytest.fixture(scope="session")
def te_references(tmp_path_factory):
    """kind ("qwen3" | "mistral") → test_text_encoder_parity.Reference: a tiny random transformers encoder,
    saved, and its hidden states at 512 tokens; built once for the text-encoder and torch-backend tests."""
    from test_text_encoder_parity import Reference

    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = Reference(kind, tmp_path_factory.mktemp("te"))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("FLUX.2-klein-4B")
    write_tiny_repo(root)
    return root


# Prompt tokens where FLUX.2's 512-token length is not what a test checks: the test prompts take at most 42
# with their chat templates (Tekken's system message included), so none is truncated.
SHORT_TEXT = 64


@pytest.fixture(scope="module")
def short_prompts():
    """Every registered variant pads prompts to SHORT_TEXT tokens instead of 512 for the module's tests (the
    tiny models then run 8x less text). Yields the real specs, for a test that wants the real length back
    (monkeypatch.setitem(MODELS, name, real[name])). The 512-token length itself is checked by
    test_pipeline_parity (encode), test_text_encoder_parity and test_torch_pipeline (FP8 encoder)."""
    import dataclasses

    from flux2_mlx.config import MODELS

    real = dict(MODELS)
    with pytest.MonkeyPatch.context() as mp:
        for name, spec in real.items():
            short = dataclasses.replace(spec.text_encoder, max_length=SHORT_TEXT)
            mp.setitem(MODELS, name, dataclasses.replace(spec, text_encoder=short))
        yield real


@pytest.fixture(scope="session", autouse=True)
def torch_one_thread():
    """Tiny forwards: torch's CPU thread pool costs more than it gives, and on a busy machine far more (a
    tiny CLI run took 5x longer with 2 threads on 2 busy cores). Every test: the diffusers/transformers
    references and the CLI's torch backend run tiny models too."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def serve_app(app, on_thread=None, **config):
    """uvicorn serving `app` on a free loopback port, in a thread (running on_thread() there first);
    `config`: more uvicorn.Config settings. (base url, stop())."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))

    def run():
        if on_thread is not None:
            on_thread()
        server.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        thread.join()

    return f"http://127.0.0.1:{port}", stop
