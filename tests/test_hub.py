"""Model acquisition without a network: local layouts, cache reuse, shard selection, error messages."""

import fnmatch
import json
import os
import time
from pathlib import Path

import httpx2
import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import constants, errors

from flux2_mlx import hub
from flux2_mlx.config import get_spec
from flux2_mlx.weights import BF16, SafetensorsFile, WeightsError, WeightSource, save_safetensors

KLEIN = get_spec("klein-4b")
DEV = get_spec("dev")
HASH = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def hub_env(tmp_path, monkeypatch):
    """An empty cache of our own, online unless a test says otherwise; no test may reach the network."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(*a, **k):
        raise AssertionError("network download attempted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)


def _st(path, **tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, tensors or {"w": np.ones((2, 3), np.float32)})


def _text_encoder(folder, shards=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")):
    """A 2-shard Qwen3-style encoder: layers 0-26 in shard 1, 27-35 + norm in shard 2."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {"model.embed_tokens.weight": shards[0], "model.norm.weight": shards[1]}
    for n in range(36):
        weight_map[f"model.layers.{n}.mlp.up_proj.weight"] = shards[0] if n < 27 else shards[1]
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for s in shards:
        _st(folder / s)


def _repo(root, layout):
    """A downloaded klein-4B folder: BFL single files, or the diffusers sub-folders."""
    if layout == "bfl":
        _st(root / KLEIN.transformer_file)
        _st(root / KLEIN.vae_file)
        (root / "tokenizer.json").parent.mkdir(parents=True, exist_ok=True)
        (root / "tokenizer.json").write_text("{}")
    else:
        _st(root / "transformer" / "diffusion_pytorch_model.safetensors")
        _st(root / "vae" / "diffusion_pytorch_model.safetensors")
        (root / "tokenizer").mkdir(parents=True)
        (root / "tokenizer" / "tokenizer.json").write_text("{}")
    _text_encoder(root / "text_encoder")
    return root


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_locate_in_a_repo_folder(tmp_path, layout):
    root = _repo(tmp_path / "repo", layout)
    got = hub.locate(KLEIN, model_path=root)
    bfl = layout == "bfl"
    assert got == {
        "transformer": root / (KLEIN.transformer_file if bfl else "transformer"),
        "vae": root / ("ae.safetensors" if bfl else "vae"),
        "text_encoder": root / "text_encoder",
        "tokenizer": root / ("tokenizer.json" if bfl else "tokenizer/tokenizer.json"),
    }


def test_explicit_paths_win_and_must_exist(tmp_path):
    root = _repo(tmp_path / "repo", "diffusers")
    other = tmp_path / "my-ae.safetensors"
    _st(other)
    got = hub.locate(KLEIN, model_path=root, vae=other)
    assert got["vae"] == other and got["transformer"] == root / "transformer"
    with pytest.raises(WeightsError, match="text encoder .*nope.*no such file"):
        hub.locate(KLEIN, model_path=root, text_encoder=tmp_path / "nope")
    with pytest.raises(WeightsError, match="model path .*missing"):
        hub.locate(KLEIN, model_path=tmp_path / "missing")


def test_a_transformer_inside_a_repo_finds_its_siblings(tmp_path):
    root = _repo(tmp_path / "repo", "diffusers")
    _st(root / KLEIN.transformer_file)
    got = hub.locate(KLEIN, transformer=root / KLEIN.transformer_file)
    assert got["vae"] == root / "vae" and got["text_encoder"] == root / "text_encoder"
    got = hub.locate(KLEIN, transformer=root / "transformer" / "diffusion_pytorch_model.safetensors")
    assert got["vae"] == root / "vae" and got["tokenizer"] == root / "tokenizer" / "tokenizer.json"
    # A single file passed as the model path is the transformer.
    assert hub.locate(KLEIN, model_path=root / KLEIN.transformer_file)["vae"] == root / "vae"


def _cache(cache, repo_id, files, commit=HASH):
    """A Hugging Face cache entry as huggingface_hub writes it: blobs, snapshot symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for rel, make in files.items():
        blob = repo / "blobs" / f"{abs(hash((commit, rel))):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        make(blob)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snap / rel).parent), snap / rel)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def _st_blob(path):
    save_safetensors(path, {"w": np.ones(4, np.float32)})


def _json_blob(obj=None):
    return lambda path: path.write_text(json.dumps(obj or {}))


def _klein_cache(cache, *, skip=()):
    st, text = _st_blob, _json_blob()
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "model.layers.30.mlp.up_proj.weight": "model-00002-of-00002.safetensors"}}
    files = {KLEIN.transformer_file: st, "vae/config.json": text,
             "vae/diffusion_pytorch_model.safetensors": st, "text_encoder/config.json": text,
             "text_encoder/model.safetensors.index.json": _json_blob(index),
             "text_encoder/model-00001-of-00002.safetensors": st, "tokenizer/tokenizer.json": text}
    return _cache(cache, KLEIN.repo_id, {k: v for k, v in files.items() if k not in skip})


def test_locate_reuses_the_hf_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = _klein_cache(tmp_path / "hf-cache")
    got = hub.locate(KLEIN)
    assert got == {"transformer": snap / KLEIN.transformer_file, "vae": snap / "vae",
                   "text_encoder": snap / "text_encoder", "tokenizer": snap / "tokenizer" / "tokenizer.json"}
    # Only the shard with needed layers was downloaded (layer 30 >= 27 is not needed): still complete.
    assert hub.fetch(KLEIN, got) == got
    assert WeightSource(got["vae"]).keys() == ["w"]
    # An explicit cache_dir works the same way.
    other = tmp_path / "other"
    assert hub.locate(KLEIN, cache_dir=other)["vae"] is None
    snap = _klein_cache(other)
    assert hub.locate(KLEIN, cache_dir=other)["vae"] == snap / "vae"


def test_partial_cache_entries_do_not_count(tmp_path):
    _klein_cache(tmp_path / "hf-cache", skip=("text_encoder/model-00001-of-00002.safetensors",
                                              "vae/diffusion_pytorch_model.safetensors"))
    got = hub.locate(KLEIN)
    assert got["vae"] is None and got["text_encoder"] is None and got["transformer"] is not None


def test_dev_vae_in_the_cache_serves_klein(tmp_path):
    snap = _cache(tmp_path / "hf-cache", DEV.repo_id, {"ae.safetensors": _st})
    assert hub.locate(KLEIN)["vae"] == snap / "ae.safetensors"


def test_offline_without_cache_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as e:
        hub.fetch(KLEIN, hub.locate(KLEIN))
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and KLEIN.repo_id in msg and "--model-path" in msg and "HF_HUB_OFFLINE" in msg
    assert KLEIN.transformer_file in msg and "tokenizer/*" in msg


def test_remote_files():
    assert hub.remote_files(KLEIN, "transformer") == (KLEIN.repo_id, ["flux-2-klein-4b.safetensors"])
    assert hub.remote_files(KLEIN, "vae") == (KLEIN.repo_id, ["vae/*"])
    for name in ("klein-9b", "klein-9b-kv", "klein-base-4b", "klein-base-9b"):
        spec = get_spec(name)
        assert {hub.remote_files(spec, c)[0] for c in hub.COMPONENTS} == {spec.repo_id}
    assert hub.remote_files(DEV, "transformer") == (DEV.repo_id, ["flux2-dev.safetensors"])
    assert hub.remote_files(DEV, "vae") == ("black-forest-labs/FLUX.2-dev", ["ae.safetensors"])
    assert hub.remote_files(DEV, "text_encoder") == (DEV.repo_id, ["text_encoder/*"])
    assert hub.remote_files(DEV, "tokenizer") == (DEV.repo_id, ["tokenizer/*"])


def _mistral_index():
    """Mistral3ForConditionalGeneration, legacy names: vision tower alone in shard 1, 40 text layers."""
    shard = "model-{:05d}-of-00009.safetensors".format
    wm = {f"vision_tower.transformer.layers.{n}.attention.q_proj.weight": shard(1) for n in range(24)}
    wm["multi_modal_projector.linear_1.weight"] = shard(1)
    wm["language_model.model.embed_tokens.weight"] = shard(2)
    bounds = [(0, 7), (7, 14), (14, 21), (21, 28), (28, 32), (32, 36), (36, 40)]  # shards 2..8
    for i, (lo, hi) in enumerate(bounds):
        for n in range(lo, hi):
            for w in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
                wm[f"language_model.model.layers.{n}.{w}"] = shard(i + 2)
    wm["language_model.model.norm.weight"] = shard(9)
    wm["language_model.lm_head.weight"] = shard(9)
    return {"metadata": {"total_size": 1}, "weight_map": wm}, shard


def test_text_encoder_shard_selection():
    index, shard = _mistral_index()
    # Layers 0-29 live in shards 2-6 (shard 6 straddles 28-31); 7-9 hold layers >= 32, norm, lm_head.
    assert hub.text_encoder_shards(index, DEV) == [shard(i) for i in range(2, 7)]
    current = {"weight_map": {k.replace("language_model.model.", "model.language_model."): v
                              for k, v in index["weight_map"].items()}}
    assert hub.text_encoder_shards(current, DEV) == [shard(i) for i in range(2, 7)]


class FakeHub:
    """snapshot_download against an in-memory repo, writing a real cache layout; records each call."""

    def __init__(self, repo_id, files):
        self.repo_id, self.files, self.calls = repo_id, files, []

    def __call__(self, repo_id, *, allow_patterns, cache_dir, **kw):
        assert repo_id == self.repo_id
        self.calls.append(list(allow_patterns))
        picked = {k: v for k, v in self.files.items()
                  if any(fnmatch.fnmatch(k, p) for p in allow_patterns)}
        return str(_cache(Path(cache_dir), repo_id, picked) if picked else
                   Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / HASH)


def test_fetch_downloads_only_needed_encoder_shards(tmp_path, monkeypatch):
    index, shard = _mistral_index()
    files = {"flux2-dev.safetensors": _st_blob, "ae.safetensors": _st_blob,
             "text_encoder/config.json": _json_blob(), "text_encoder/model.safetensors.index.json":
             _json_blob(index), "tokenizer/tokenizer.json": _json_blob(),
             "tokenizer/tokenizer_config.json": _json_blob()}
    files.update({f"text_encoder/{shard(i)}": _st_blob for i in range(1, 10)})
    fake = FakeHub(DEV.repo_id, files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    got = hub.fetch(DEV, hub.locate(DEV), progress=False)
    assert set(got) == set(hub.COMPONENTS) and all(p.exists() for p in got.values())
    assert got["tokenizer"].name == "tokenizer.json" and got["vae"].name == "ae.safetensors"
    assert ["text_encoder/*.json"] in fake.calls
    assert [f"text_encoder/{shard(i)}" for i in range(2, 7)] in fake.calls
    present = sorted(p.name for p in got["text_encoder"].glob("*.safetensors"))
    assert present == [shard(i) for i in range(2, 7)]
    assert hub.locate(DEV) == got  # and the next run finds it all in the cache


def _response(status):
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))


@pytest.mark.parametrize("exc, expect", [
    (errors.GatedRepoError("403 gated", response=_response(403)),
     ["black-forest-labs/FLUX.2-dev is gated", "https://huggingface.co/black-forest-labs/FLUX.2-dev",
      "hf auth login", "--model-path"]),
    (errors.RepositoryNotFoundError("404", response=_response(404)), ["was not found", "--model-path"]),
    (errors.LocalEntryNotFoundError("An error happened\nPlease check your connection"),
     ["cannot reach huggingface.co", "flux2-dev.safetensors from black-forest-labs/FLUX.2-dev",
      "--model-path"]),
    (httpx2.ConnectError("[Errno 101] Network is unreachable"), ["cannot reach huggingface.co", "--vae"]),
    (errors.OfflineModeIsEnabled("offline"), ["cannot reach huggingface.co"]),
    (errors.HfHubHTTPError("500 Server Error\nbody", response=_response(500)),
     ["failed (500 Server Error)", "try again"]),
])
def test_hub_errors_become_one_line_messages(monkeypatch, exc, expect):
    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(WeightsError) as e:
        hub.fetch(DEV, hub.locate(DEV))
    msg = str(e.value)
    assert "\n" not in msg
    for s in expect:
        assert s in msg


def test_a_stale_snapshot_without_the_files_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(KLEIN.repo_id, {}))
    with pytest.raises(WeightsError, match="did not arrive.*--model-path"):
        hub.fetch(KLEIN, hub.locate(KLEIN))


def test_describe_reads_headers_only(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    root.mkdir()
    tensors = {"a": np.zeros((1000, 1000), np.float32), "b": np.zeros(10, np.float16), "c": np.zeros(4, BF16)}
    save_safetensors(root / KLEIN.transformer_file, tensors)
    _text_encoder(root / "text_encoder")
    (root / "tokenizer.json").write_text("{}")

    def no_data(*a, **k):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(SafetensorsFile, "get", no_data)
    monkeypatch.setattr(WeightSource, "get", no_data)
    lines = hub.describe(KLEIN, hub.locate(KLEIN, model_path=root))
    assert len(lines) == 4
    assert lines[0] == f"transformer: {root / KLEIN.transformer_file} (4 MB, 1 M params, BF16/F16/F32)"
    assert lines[1] == (f"vae: download from {KLEIN.repo_id} (vae/*)")
    assert lines[2].startswith(f"text_encoder: {root / 'text_encoder'} (") and "12 params, F32" in lines[2]
    assert lines[3].startswith("tokenizer: ") and "tokenizer.json" in lines[3]
    assert "only shards with layers < 30" in hub.describe(DEV, dict.fromkeys(hub.COMPONENTS))[2]
