"""Which variant a folder or file holds (flux2_mlx.variants), end to end on the CLI.

The registry is swapped for tiny models of the real relationships: klein [base] 4B share shapes, the three
9B variants share larger ones, dev has a guidance embedding. Each variant is laid out as its repo is: a
diffusers folder with its real model_index.json, a BFL single file under its real name, a GGUF our
converter wrote (renamed: only its metadata speaks), and the Hugging Face cache's models--owner--repo.
"""

import dataclasses
import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import random_transformer

from flux2_mlx.cli import main
from flux2_mlx.config import MODELS, tiny_spec
from flux2_mlx.convert import convert
from flux2_mlx.dit_names import transformer_to_diffusers
from flux2_mlx.variants import choose, detect, variant_from_name
from flux2_mlx.weights import GGUFFile, WeightsError, save_safetensors

VARIANTS = ["dev", "klein-4b", "klein-9b", "klein-9b-kv", "klein-base-4b", "klein-base-9b"]
PIPELINES = {"dev": ("Flux2Pipeline", None), "klein-4b": ("Flux2KleinPipeline", True),
             "klein-9b": ("Flux2KleinPipeline", True), "klein-9b-kv": ("Flux2KleinKVPipeline", True),
             "klein-base-4b": ("Flux2KleinPipeline", False), "klein-base-9b": ("Flux2KleinPipeline", False)}


def _tiny(name):
    spec = tiny_spec(name)
    if "9b" in name:  # wider than the tiny 4B, as the real 9B is
        spec = dataclasses.replace(spec, transformer=dataclasses.replace(spec.transformer, hidden_size=384,
                                                                         num_heads=3))
    return dataclasses.replace(spec, name=name)


@pytest.fixture(scope="module")
def registry():
    with pytest.MonkeyPatch.context() as mp:
        for name in VARIANTS:
            mp.setitem(MODELS, name, _tiny(name))
        yield


def _model_index(variant: str) -> dict:
    cls, distilled = PIPELINES[variant]
    encoder = "Mistral3ForConditionalGeneration" if variant == "dev" else "Qwen3ForCausalLM"
    index = {"_class_name": cls, "_diffusers_version": "0.37.0.dev0",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", encoder], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
             "transformer": ["diffusers", "Flux2Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLFlux2"]}
    return index if distilled is None else {**index, "is_distilled": distilled}


@pytest.fixture(scope="module")
def repos(registry, tmp_path_factory):
    """variant → {layout: the path a user would pass}."""
    root = tmp_path_factory.mktemp("variants")
    weights = {size: random_transformer(_tiny(size).transformer, seed=1)
               for size in ("dev", "klein-4b", "klein-9b")}
    out = {}
    for i, v in enumerate(VARIANTS):
        w = weights["dev" if v == "dev" else "klein-9b" if "9b" in v else "klein-4b"]
        bfl = root / f"bfl{i}" / MODELS[v].transformer_file  # a folder that says nothing
        bfl.parent.mkdir()
        save_safetensors(bfl, w)
        diffusers = root / f"diffusers{i}"
        (diffusers / "transformer").mkdir(parents=True)
        save_safetensors(diffusers / "transformer" / "diffusion_pytorch_model.safetensors",
                         transformer_to_diffusers(w))
        (diffusers / "model_index.json").write_text(json.dumps(_model_index(v)))
        gguf = root / f"gguf{i}" / "model.gguf"
        gguf.parent.mkdir()
        convert(bfl, gguf, "BF16", progress=False)
        repo = {"dev": "FLUX.2-dev", "klein-9b-kv": "FLUX.2-klein-9B-kv"}.get(v, f"FLUX.2-{v}")
        cache = root / f"hub{i}" / f"models--black-forest-labs--{repo}" / "snapshots" / "0123abcd"
        cache.mkdir(parents=True)
        (cache / "model.safetensors").symlink_to(bfl)  # as the cache links its blobs
        out[v] = {"diffusers": diffusers, "bfl": bfl, "gguf": gguf, "cache": cache / "model.safetensors"}
    anonymous = root / "anonymous"
    anonymous.mkdir()
    save_safetensors(anonymous / "model.safetensors", weights["klein-4b"])
    out["anonymous"] = anonymous / "model.safetensors"
    return out


@pytest.mark.parametrize("layout", ["diffusers", "bfl", "gguf", "cache"])
def test_every_variant_in_every_layout(repos, layout):
    for v in VARIANTS:
        path = repos[v][layout]
        found = detect(model_path=path) if path.is_dir() else detect(transformer=path)
        assert (found.variant, found.strong) == (v, True), (v, found)
        assert {"diffusers": "model_index.json", "bfl": "the file name flux", "gguf": "its flux2.model",
                "cache": "the folder name models--black-forest-labs--FLUX.2-"}[layout] in found.signal
    assert GGUFFile(repos["klein-base-9b"]["gguf"]).metadata["flux2.model"] == "klein-base-9b"


def test_names_as_people_write_them():
    for name, v in [("flux-2-klein-base-4b.safetensors", "klein-base-4b"),
                    ("FLUX.2-klein-9B-kv", "klein-9b-kv"), ("flux2-dev-Q4_K_M.gguf", "dev"),
                    ("FLUX.2-klein-4B-Q8_0.gguf", "klein-4b"),
                    ("models--black-forest-labs--FLUX.2-klein-base-9B", "klein-base-9b"),
                    ("flux-2-klein-9b.safetensors", "klein-9b"), ("ae.safetensors", None),
                    ("model.gguf", None),
                    # BFL's quantized releases
                    ("flux-2-klein-4b-fp8.safetensors", "klein-4b"),
                    ("flux-2-klein-9b-nvfp4.safetensors", "klein-9b"),
                    ("flux2-dev-nvfp4-mixed.safetensors", "dev"),
                    ("models--black-forest-labs--FLUX.2-klein-base-4b-fp8", "klein-base-4b")]:
        assert variant_from_name(name) == v, name


def test_shapes_alone_name_the_size_and_every_variant_of_it(repos):
    found = detect(transformer=repos["anonymous"])
    assert (found.variant, found.candidates, found.strong) == (None, ("klein-4b", "klein-base-4b"), False)
    with pytest.raises(WeightsError, match=r"model\.safetensors: nothing in these files says which of "
                                           r"klein-4b, klein-base-4b they are \(the tensor shapes fit all\); "
                                           r"name the model \(-m/--model\)"):
        choose(None, transformer=repos["anonymous"])
    # an explicit model where nothing but the shapes speaks is accepted
    assert choose("klein-base-4b", transformer=repos["anonymous"])[0] == "klein-base-4b"
    assert detect(transformer=repos["dev"]["cache"]).variant == "dev"


def test_a_name_that_contradicts_the_shapes_is_refused(repos, tmp_path):
    wrong = tmp_path / "flux-2-klein-4b.safetensors"
    shutil.copy(repos["klein-9b"]["bfl"], wrong)
    with pytest.raises(WeightsError, match=r"the file name flux-2-klein-4b\.safetensors says klein-4b, but "
                                           r"its tensors have the shapes of klein-9b / klein-9b-kv / "
                                           r"klein-base-9b"):
        detect(transformer=wrong)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_runs_the_detected_variant_with_its_defaults(repos, tmp_path, variant):
    spec = MODELS[variant]
    how = {"embedded": "embedded guidance", "none": "no guidance", "cfg": "true CFG"}[spec.guidance_mode]
    r = run("generate", "a fox", "--model-path", repos[variant]["diffusers"], "-W", 64, "-H", 64, "--dry-run",
            "-o", tmp_path / "x.png")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith(f"model {variant} (its model_index.json (")
    assert f"{variant}: {spec.default_steps} steps, guidance {spec.default_guidance:g} ({how})" in lines
    r = run("info", repos[variant]["gguf"])
    assert r.exit_code == 0 and f"variant: {variant} (its flux2.model = {variant})" in r.output


@pytest.mark.parametrize("variant, given", [("klein-base-4b", "klein-4b"), ("klein-9b-kv", "klein-9b")])
def test_a_contradicting_model_is_one_line(repos, tmp_path, variant, given):
    for layout in ("diffusers", "bfl"):
        r = run("generate", "a fox", "-m", given, "--model-path", repos[variant][layout].parent
                if layout == "bfl" else repos[variant][layout], "-o", tmp_path / "x.png")
        assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
        assert r.output.startswith("error: ") and f"this is {variant}, not {given}" in r.output
        assert not (tmp_path / "x.png").exists()


def test_files_that_could_be_several_variants_name_them(repos, tmp_path):
    r = run("generate", "a fox", "--transformer", repos["anonymous"], "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "which of klein-4b, klein-base-4b they are" in r.output and not (tmp_path / "x.png").exists()
