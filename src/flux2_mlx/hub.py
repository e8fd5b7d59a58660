"""Find the files a FLUX.2 model needs (local folders, the Hugging Face cache) and download the rest.

Numpy core: never imports mlx or torch. huggingface_hub is imported inside functions so that
`flux2 --help` stays light.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path

from .config import ModelSpec
from .weights import INDEX_NAMES, SafetensorsFile, WeightsError

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
LOCAL_HINT = "pass local files with --model-path DIR or --transformer/--vae/--text-encoder/--tokenizer"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _cache_root(cache_dir) -> Path:
    # huggingface_hub reads HF_HUB_CACHE once at import; read it at call time too, and hand the result
    # to every huggingface_hub call so that both always agree.
    if cache_dir is None:
        cache_dir = os.environ.get("HF_HUB_CACHE")
    if cache_dir is None:
        from huggingface_hub import constants
        cache_dir = constants.HF_HUB_CACHE
    return Path(cache_dir).expanduser()


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def text_encoder_shards(index: dict, spec: ModelSpec) -> list[str]:
    """Shards of a sharded encoder that hold what FLUX.2 uses: embeddings and layers < the deepest output.

    Prefix-agnostic (`model.layers.N`, `language_model.model.layers.N`, `model.language_model.layers.N`);
    the vision tower's own `layers.N` never count.
    """
    depth = max(spec.text_encoder.output_layers)
    keep = set()
    for name, shard in index["weight_map"].items():
        if "vision_tower" in name or "multi_modal_projector" in name:
            continue
        layer = _LAYER.search(name)
        if "embed_tokens" in name or (layer and int(layer.group(1)) < depth):
            keep.add(shard)
    return sorted(keep)


def _remote(spec: ModelSpec, component: str) -> tuple[str, list[str], str]:
    """(repo, allow_patterns, path of the component inside the repo)."""
    if component == "transformer":
        return spec.repo_id, [spec.transformer_file], spec.transformer_file
    if component == "vae" and spec.repo_id == spec.vae_repo_id:  # dev: BFL's ae.safetensors
        return spec.vae_repo_id, [spec.vae_file], spec.vae_file
    if component == "vae":  # klein: the repo's own diffusers vae/, so the gated dev repo is not needed
        return spec.repo_id, ["vae/*"], "vae"
    if component == "text_encoder":
        return spec.repo_id, ["text_encoder/*"], "text_encoder"
    if component == "tokenizer":
        return spec.repo_id, ["tokenizer/*"], "tokenizer/tokenizer.json"
    raise ValueError(f"unknown component {component!r}; choose one of: {', '.join(COMPONENTS)}")


def remote_files(spec: ModelSpec, component: str) -> tuple[str, list[str]]:
    """The repo and allow_patterns `fetch` downloads for one component (the encoder: needed shards only)."""
    repo_id, patterns, _ = _remote(spec, component)
    return repo_id, patterns


def _in_folder(spec: ModelSpec, root: Path) -> dict[str, Path | None]:
    """Components inside a downloaded repo folder: BFL single files at the root or diffusers folders."""
    names = {
        "transformer": (spec.transformer_file, "transformer"),
        "vae": ("vae", spec.vae_file),
        "text_encoder": ("text_encoder",),
        "tokenizer": ("tokenizer/tokenizer.json", "tokenizer.json"),
    }
    return {c: next((root / n for n in ns if (root / n).exists()), None) for c, ns in names.items()}


def _complete(spec: ModelSpec, component: str, path: Path) -> bool:
    """Whether a cached component is whole: a partial download must be finished, not loaded."""
    if not path.is_dir():
        return path.is_file()
    index = next((path / n for n in INDEX_NAMES if (path / n).exists()), None)
    if index is None:
        return any(path.glob("*.safetensors"))
    try:
        index_json = json.loads(index.read_text())
        shards = (text_encoder_shards(index_json, spec) if component == "text_encoder"
                  else set(index_json["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # damaged: download again
        return False
    return all((path / s).exists() for s in shards)


def _snapshots(repo_id: str, cache_dir) -> list[Path]:
    """Cached snapshots of a repo: the one refs/main names first, then the others, newest first."""
    repo = _cache_root(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    if not (repo / "snapshots").is_dir():
        return []
    snaps = sorted((repo / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    ref = repo / "refs" / "main"
    main = repo / "snapshots" / ref.read_text().strip() if ref.is_file() else None
    return ([main] if main in snaps else []) + [s for s in snaps if s != main]


def _cached(spec: ModelSpec, component: str, cache_dir) -> Path | None:
    repo_id, _, rel = _remote(spec, component)
    # Also what diffusers or BFL's own code may have put there: the other layout, the dev repo's VAE.
    candidates = [(repo_id, rel), *{
        "transformer": [(spec.repo_id, "transformer")],
        "vae": [(spec.repo_id, "vae"), (spec.repo_id, spec.vae_file), (spec.vae_repo_id, spec.vae_file)],
    }.get(component, [])]
    for repo, name in candidates:
        for snap in _snapshots(repo, cache_dir):
            if _complete(spec, component, snap / name):
                return snap / name
    return None


def locate(spec: ModelSpec, *, model_path=None, transformer=None, vae=None, text_encoder=None,
           tokenizer=None, cache_dir=None) -> dict[str, Path | None]:
    """Local paths of the four components, or None where a download is needed. No network.

    Order: explicit paths, then `model_path` (a downloaded repo folder, either layout), then the
    folder an explicit transformer lies in, then the Hugging Face cache.
    """
    explicit = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
                "tokenizer": tokenizer}
    if model_path is not None and Path(model_path).is_file() and transformer is None:
        explicit["transformer"], model_path = model_path, None  # a single file: the transformer
    found: dict[str, Path | None] = {}
    for c, p in explicit.items():
        if p is not None:
            if not Path(p).exists():
                raise WeightsError(f"{c.replace('_', ' ')} {p}: no such file or folder; check the path")
            found[c] = Path(p)
    roots = []
    if model_path is not None:
        if not Path(model_path).is_dir():
            raise WeightsError(f"model path {model_path}: no such folder; pass a downloaded "
                               f"{spec.repo_id} folder")
        roots.append(Path(model_path))
    if explicit["transformer"] is not None:  # its siblings: repo/flux-2-….safetensors, repo/transformer
        root = found["transformer"].absolute().parent
        roots.append(root.parent if root.name == "transformer" else root)
    for root in roots:
        for c, p in _in_folder(spec, root).items():
            if found.get(c) is None:
                found[c] = p
    return {c: found.get(c) or _cached(spec, c, cache_dir) for c in COMPONENTS}


def _wanted(spec: ModelSpec, components) -> str:
    by_repo: dict[str, list[str]] = {}
    for c in components:
        repo_id, patterns = remote_files(spec, c)
        by_repo.setdefault(repo_id, []).extend(patterns)
    return "; ".join(f"{repo} ({', '.join(p)})" for repo, p in by_repo.items())


@contextmanager
def _hub_errors(repo_id: str, patterns: list[str], hint: str = LOCAL_HINT):
    """huggingface_hub's exceptions as one-line WeightsErrors that say what to do (`hint`: the local way)."""
    from huggingface_hub import errors as e

    what = f"{', '.join(patterns)} from {repo_id}"
    offline = (e.LocalEntryNotFoundError, e.OfflineModeIsEnabled, ConnectionError, TimeoutError)
    try:
        yield
    except e.GatedRepoError as err:
        raise WeightsError(f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id} "
                           f"and log in with `hf auth login`, or {hint}") from err
    except e.RepositoryNotFoundError as err:
        raise WeightsError(f"{repo_id} was not found on huggingface.co (a private repo needs "
                           f"`hf auth login`); {hint}") from err
    except offline as err:  # LocalEntryNotFoundError: no connection and not in the cache
        raise WeightsError(f"cannot reach huggingface.co to download {what}, and it is not in the "
                           f"cache; check the network, or {hint}") from err
    except e.EntryNotFoundError as err:
        raise WeightsError(f"{repo_id} has no {', '.join(patterns)}; {hint}") from err
    except e.HfHubHTTPError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise WeightsError(f"downloading {what} failed ({reason}); try again, or {hint}") from err
    except e.HTTPError as err:  # transport errors (httpx in huggingface_hub 1.x/2.x)
        raise WeightsError(f"cannot reach huggingface.co to download {what} ({type(err).__name__}); "
                           f"check the network, or {hint}") from err


def lora_file(name, cache_dir=None) -> Path:
    """A LoRA file: a local path, else `owner/repo/path/in/repo.safetensors` on Hugging Face, taken from the
    HF cache or downloaded into it (one-line WeightsErrors, as for the model files)."""
    path = Path(name)
    if path.is_file():
        return path
    parts = str(name).split("/")
    # A path that starts somewhere on this machine is a local path, missing or not.
    local = path.is_absolute() or str(name).startswith((".", "~")) or Path(parts[0]).exists()
    if local or len(parts) < 3 or not str(name).endswith(".safetensors") or path.exists():
        raise WeightsError(f"LoRA {name}: no such file; give a .safetensors path, or "
                           f"owner/repo/file.safetensors on Hugging Face")
    import huggingface_hub as hf

    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    with _hub_errors(repo_id, [filename], hint="pass a downloaded LoRA file's path"):
        return Path(hf.hf_hub_download(repo_id, filename, cache_dir=str(_cache_root(cache_dir))))


def _download(spec: ModelSpec, component: str, cache_dir) -> Path:
    import huggingface_hub as hf

    repo_id, patterns, rel = _remote(spec, component)
    cache = str(_cache_root(cache_dir))
    with _hub_errors(repo_id, patterns):
        if component == "text_encoder":
            # Config and index first, then only the shards with layers FLUX.2 runs (dev: ~17B of 24B).
            snap = Path(hf.snapshot_download(repo_id, allow_patterns=["text_encoder/*.json"],
                                             cache_dir=cache))
            index = snap / "text_encoder" / "model.safetensors.index.json"
            try:
                shards = text_encoder_shards(json.loads(index.read_text()), spec) if index.exists() else None
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                shards = None  # a damaged index: fetch every shard rather than guess
            patterns = [f"text_encoder/{s}" for s in shards] if shards else ["text_encoder/*.safetensors"]
        snap = Path(hf.snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache))
    if not _complete(spec, component, snap / rel):
        # snapshot_download returns a stale partial snapshot when the Hub cannot be asked.
        raise WeightsError(f"{', '.join(patterns)} from {repo_id} did not arrive (not in the repo, or "
                           f"huggingface.co unreachable or refusing access); {LOCAL_HINT}")
    return snap / rel


def fetch(spec: ModelSpec, located: dict[str, Path | None], *, progress: bool = True,
          cache_dir=None) -> dict[str, Path]:
    """Download into the Hugging Face cache what `locate` left as None; local paths of the components
    in `located` (all four from `locate`, or just the ones a caller needs now)."""
    out = {c: located[c] or _cached(spec, c, cache_dir) for c in located}
    missing = [c for c in out if out[c] is None]
    if not missing:
        return out
    if _offline():  # fail fast: no network attempt, our message instead of huggingface_hub's
        raise WeightsError(f"HF_HUB_OFFLINE is set and the Hugging Face cache lacks "
                           f"{_wanted(spec, missing)}; unset HF_HUB_OFFLINE to download, or {LOCAL_HINT}")
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = not progress and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        for c in missing:
            out[c] = _download(spec, c, cache_dir)
    finally:
        if quiet:
            enable_progress_bars()
    return out


def _fmt(n: float, units: tuple[str, ...]) -> str:
    k = min(int(math.log10(n) // 3), len(units) - 1) if n >= 1 else 0
    return f"{n / 1000 ** k:.3g} {units[k]}".rstrip()


def _summary(path: Path) -> str:
    """Size, parameter count and dtypes from safetensors headers only; no tensor data is read."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if path.is_file() and path.suffix != ".safetensors":
        return f" ({_fmt(path.stat().st_size, ('B', 'KB', 'MB', 'GB'))})"
    if not files:
        return " (no .safetensors files)"
    size, params, dtypes = 0, 0, set()
    for f in files:
        st = SafetensorsFile(f)
        size += f.stat().st_size
        for k in st.keys():
            params += math.prod(st.shape(k))
            dtypes.add(st.dtype(k))
    return (f" ({_fmt(size, ('B', 'KB', 'MB', 'GB'))}, {_fmt(params, ('', 'K', 'M', 'B'))} params, "
            f"{'/'.join(sorted(dtypes))})")


def describe(spec: ModelSpec, located: dict[str, Path | None]) -> list[str]:
    """One line per component for --dry-run: the local path with size and dtypes, or what to download."""
    lines = []
    for c in COMPONENTS:
        p = located.get(c)
        if p is None:
            repo_id, patterns = remote_files(spec, c)
            note = (f", only shards with layers < {max(spec.text_encoder.output_layers)}"
                    if c == "text_encoder" else "")
            lines.append(f"{c}: download from {repo_id} ({', '.join(patterns)}{note})")
        else:
            lines.append(f"{c}: {p}{_summary(Path(p))}")
    return lines
