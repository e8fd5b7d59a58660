"""The `flux2` command: a thin click wrapper over the Python API. Heavy imports happen inside commands."""

from __future__ import annotations

import json
import math
import secrets
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import click

from . import __version__
from .config import DEFAULT_STRENGTH, MODELS, default_strength
from .generation import META_KEY

DTYPES = ("bfloat16", "float16", "float32")
BACKENDS = ("auto", "mlx", "torch")


def _backend_options(f):
    f = click.option("--device", metavar="NAME",
                     help="mlx: gpu or cpu; torch: cuda, cuda:N, mps or cpu. "
                          "Default: the GPU when there is one.")(f)
    return click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                        help="auto: MLX on Apple silicon, else PyTorch when installed (on CUDA, or on a CPU, "
                             "where it is the faster), else MLX.")(f)


def _component_options(f):
    """--vae, --text-encoder, --tokenizer: the components besides the transformer (generate, serve)."""
    f = click.option("--tokenizer", type=click.Path(exists=True, path_type=Path),
                     help="tokenizer.json or its folder.")(f)
    f = click.option("--text-encoder", type=click.Path(exists=True, path_type=Path),
                     help="A text_encoder/ folder.")(f)
    return click.option("--vae", type=click.Path(exists=True, path_type=Path),
                        help="ae.safetensors or a vae/ folder.")(f)


def _fail(message: str, code: int = 2):
    """One line on stderr (a message's own line breaks become "; ") and exit `code`; 2 says bad input is
    the user's to fix, not a crash."""
    lines = (line.strip() for line in str(message).splitlines())
    click.echo(f"error: {'; '.join(line for line in lines if line)}", err=True)
    sys.exit(code)


def _usage_message(e: click.ClickException) -> str:
    """click's message without its usage block, naming the option first (`--steps: 0 is not in …`)."""
    if isinstance(e, click.BadParameter) and not isinstance(e, click.MissingParameter):
        if e.param_hint is not None:
            return f"{e.param_hint}: {e.message}"
        if e.param is not None:
            name = (max(e.param.opts, key=len) if isinstance(e.param, click.Option)
                    else e.param.human_readable_name)
            return f"{name}: {e.message}"
    message = e.format_message().rstrip(".")
    ctx = getattr(e, "ctx", None)
    return f"{message}; see '{ctx.command_path} --help'" if ctx is not None else message


class _Group(click.Group):
    """Every command's errors in the project's style: one `error: …` line on stderr, exit 2 for bad input
    and 130 for Ctrl-C; never click's usage block or a traceback."""

    def main(self, args=None, prog_name=None, **extra):
        extra["standalone_mode"] = False  # click then raises its errors here instead of printing them
        try:
            code = super().main(args, prog_name, **extra)
        except click.ClickException as e:
            _fail(_usage_message(e), e.exit_code)
        except click.Abort:  # click's form of a Ctrl-C while it parses the command line
            _fail("interrupted", 130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # here, before click turns it into an Abort that prints a blank line first
            # A Ctrl-C inside a constructor (tqdm's, as a bar starts) leaves an object whose finalizer fails
            # at exit with "Exception ignored …": the run is over, so say only that it was interrupted.
            sys.unraisablehook = lambda _: None
            _fail("interrupted", 130)


# No help block for a bare `flux2` either: "Missing command" in one line, like every other usage error.
@click.group(cls=_Group, no_args_is_help=False, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flux2")
def main():
    """FLUX.2 image generation and editing on MLX."""


def _outputs(output: Path, seeds: list[int], overwrite: bool) -> list[Path]:
    if output.suffix.lower() != ".png":
        raise click.BadParameter("the output must be a .png file", param_hint="--output")
    if not output.parent.is_dir():
        what = "is a file, not a folder" if output.parent.exists() else "does not exist"
        raise click.BadParameter(f"folder {output.parent} {what}", param_hint="--output")
    paths = [output] if len(seeds) == 1 else [output.with_name(f"{output.stem}-{s}.png") for s in seeds]
    taken = [str(p) for p in paths if p.exists()]
    if taken and not overwrite:
        raise click.BadParameter(f"{', '.join(taken)} already exists; pass --overwrite or choose another "
                                 f"name", param_hint="--output")
    _check_writable(output.parent, "--output")
    return paths


def _check_writable(folder: Path, hint: str) -> None:
    """Fail before any loading if no file can be made in `folder`. A real (anonymous, self-deleting)
    temporary file, since root passes os.access whatever the permission bits say."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise click.BadParameter(f"cannot write in folder {folder} ({e.strerror}); choose another folder",
                                 param_hint=hint) from None


def save_png(path: Path, png: bytes) -> None:
    """Write via a temporary name and rename, so an interrupted run leaves no half-written PNG."""
    from .atomic import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_bytes(png)


_UNITS = {"encode": "prompt", "denoise": "step", "decode": "image"}
_GUIDANCE = {"embedded": "embedded guidance", "none": "no guidance", "cfg": "true CFG"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MODEL_HELP = ("The variant [default: what the files say they are (model_index.json, file names, a GGUF's "
              "metadata); without files, klein-4b].")


def _choose_model(model, model_path=None, transformer=None, detection=None) -> str:
    """The variant to run (variants.choose; `detection`: the files' own, when already made), said in a
    line when it was detected; a contradiction or files that could be several variants are one error
    line."""
    from .variants import choose
    from .weights import WeightsError

    try:
        name, detection = choose(model, model_path, transformer, detection)
    except WeightsError as e:
        _fail(str(e))
    if model is None and detection is not None:
        click.echo(f"model {name} ({detection.signal})")
    return name


@main.command()
@click.argument("prompt")
@click.option("-m", "--model", type=click.Choice(list(MODELS)), help=MODEL_HELP)
@click.option("--model-path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A downloaded model folder (BFL or diffusers layout).")
@click.option("--transformer", "--weights", "transformer", type=click.Path(exists=True, path_type=Path),
              help="Transformer: a .safetensors file or a diffusers transformer/ folder.")
@_component_options
@click.option("-W", "--width", type=click.IntRange(min=16),
              help="A multiple of 16; width x height at most 4 MP. "
                   "Default: the --image's or first --ref's size, else 1024.")
@click.option("-H", "--height", type=click.IntRange(min=16),
              help="A multiple of 16; width x height at most 4 MP "
                   "(default as for --width).")
@click.option("--ref", "refs", type=click.Path(dir_okay=False, path_type=Path),
              multiple=True, metavar="IMAGE",
              help="A reference image to edit from or draw on; repeat for up to 10 (BFL recommends at most 6 "
                   "for dev, 4 for klein).")
@click.option("--image", "init", type=click.Path(dir_okay=False, path_type=Path),
              help="Image-to-image: start from this picture instead of pure noise.")
@click.option("--strength", type=click.FloatRange(0, 1, min_open=True),
              help=f"With --image: how much of the schedule runs (default {DEFAULT_STRENGTH:g}, 1 with "
                   f"--expand); 1 ignores the image's content.")
@click.option("--mask", type=click.Path(dir_okay=False, path_type=Path), metavar="IMAGE",
              help="Inpaint the --image: white = repaint, black = keep (with transparency: transparent = "
                   "repaint); drawn at the image's size or any other of its shape.")
@click.option("--mask-crop", type=click.IntRange(min=0), metavar="PX",
              help="Generate only the mask's box grown by PX and paste it back (at -W x -H if given, else "
                   "at its own resolution).")
@click.option("--mask-blur", type=click.FloatRange(min=0), default=0, metavar="PX",
              help="Feather the mask's edge by a Gaussian blur of PX.")
@click.option("--keep-unmasked/--no-keep-unmasked", default=True, show_default=True,
              help="Pixels outside the (feathered) mask keep the --image's exact bytes.")
@click.option("--expand", metavar="L,T,R,B",
              help="Outpaint: grow the --image's canvas by these px (one number: every side), each rounded "
                   "up to a multiple of 16, and generate the new borders.")
@click.option("--steps", type=click.IntRange(min=1), help="Default: the model's (klein 4, base and dev 50).")
@click.option("--guidance", type=click.FloatRange(min=0), help="Default: the model's (4 for dev and base).")
@click.option("--negative-prompt", help="Base variants only (true CFG); default the empty prompt.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), multiple=True,
              help="Repeat for several images; random when absent.")
@click.option("-n", "--num-images", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images from consecutive seeds, one prompt encoding.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default="flux2.png",
              show_default=True, help="PNG path; several images get -SEED suffixes.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Default: bfloat16 on a GPU, float32 on CPU.")
@_backend_options
@click.option("--memory-budget", type=click.FloatRange(min=0, min_open=True), metavar="GB",
              help="Memory the model may use; components that do not fit are streamed block by block. "
                   "Default: the GPU's recommended working set (80 % of RAM on CPU).")
@click.option("--stream-from", type=click.Choice(["ram", "disk"]),
              help="Where streamed blocks come from: a host copy (ram) or the file each step (disk). "
                   "Default: ram when it fits beside the budget.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch: compile the transformer blocks (the first step of a size compiles; later ones run "
                   "faster).")
@click.option("--fp8-matmul", is_flag=True,
              help="torch: multiply an FP8 text encoder's weights in FP8, its activations quantized to FP8 "
                   "too (FP8 tensor cores on a GPU; changes the prompt embeddings, as W8A8 does).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Apply a LoRA at SCALE (default 1; negative subtracts it): a .safetensors file, or "
                   "owner/repo/file.safetensors on Hugging Face. Repeat to stack several.")
@click.option("--dry-run", is_flag=True, help="Show the files and the memory plan; load nothing.")
def generate(prompt, model, model_path, transformer, vae, text_encoder, tokenizer, width, height, refs, init,
             strength, mask, mask_crop, mask_blur, keep_unmasked, expand, steps, guidance, negative_prompt,
             seed, num_images, output, overwrite, dtype, backend, device, memory_budget, stream_from,
             compile_, fp8_matmul, loras, dry_run):
    """Generate images from PROMPT and save them as PNGs with their settings embedded. With --ref: edit
    or combine reference images; with --image: image-to-image, with --mask inpainting, with --expand
    outpainting."""
    from .pipeline import check_size
    from .weights import WeightsError

    model = _choose_model(model, model_path, transformer)
    spec = MODELS[model]
    for name, value in (("--strength", strength), ("--mask", mask), ("--expand", expand)):
        if value is not None and init is None:
            raise click.BadParameter(f"works only with --image PICTURE; add one or drop {name}",
                                     param_hint=name)
    for name, value in (("--mask-crop", mask_crop), ("--mask-blur", mask_blur or None),
                        ("--no-keep-unmasked", None if keep_unmasked else True)):
        if value is not None and mask is None and expand is None:
            raise click.BadParameter("works only with --mask or --expand", param_hint=name)
    expand = _parse_expand(expand) if expand is not None else None
    strength = default_strength(expand is not None) if strength is None else strength
    try:
        check_size(width or 1024, height or 1024)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--width/--height") from None
    if negative_prompt is not None and spec.guidance_mode != "cfg":
        raise click.BadParameter(f"{model} takes no negative prompt (only klein-base-4b/9b do)",
                                 param_hint="--negative-prompt")
    if guidance is not None and spec.guidance_mode == "none" and guidance != 1.0:
        click.echo(f"warning: {model} is guidance-distilled and ignores --guidance {guidance:g}", err=True)
        guidance = None
    if len(seed) > 1 and num_images > 1 and len(seed) != num_images:
        raise click.BadParameter("give either one --seed per image or --num-images", param_hint="--seed")
    if len(seed) > 1:
        seeds = list(seed)
    else:
        first = seed[0] if seed else secrets.randbelow(2**31)
        seeds = [first + i for i in range(num_images)]
    loras = _parse_loras(loras)
    paths = _outputs(output, seeds, overwrite)
    paths_kw = dict(model_path=model_path, transformer=transformer, vae=vae, text_encoder=text_encoder,
                    tokenizer=tokenizer)
    # Library warnings (a truncated prompt, a NaN image) become one plain line each.
    warnings.showwarning = lambda message, *_args, **_kw: click.echo(f"warning: {message}", err=True)
    edit = dict(width=width, height=height, images=list(refs) or None, image=init, mask=mask,
                mask_crop=mask_crop, mask_blur=mask_blur, expand=expand)
    try:
        from .hub import lora_file

        # (as given, local file, scale); a missing file fails here, before anything loads
        loras = [(name, lora_file(name), scale) for name, scale in loras]
        budget = dict(memory_budget=memory_budget, stream_from=stream_from, backend=backend, device=device)
        if dry_run:
            for _, f, scale in loras:
                click.echo(f"lora: {f} at {scale:g}")
            _dry_run(spec, paths_kw, dtype, edit, steps, guidance, budget, loras)
            return
        settings = dict(prompt=prompt, negative_prompt=negative_prompt, strength=strength, steps=steps,
                        guidance=guidance, keep_unmasked=keep_unmasked)
        _generate(spec, paths_kw, edit, settings, seeds, paths, dtype, budget, compile_, fp8_matmul, loras)
    except (WeightsError, ValueError, OSError) as e:
        _fail(str(e))


def _parse_expand(value: str) -> list[int]:
    """"L,T,R,B" or one "N" for every side → four px counts, not all zero."""
    try:
        sides = [int(v) for v in value.split(",")]
    except ValueError:
        sides = []
    if len(sides) == 1:
        sides *= 4
    if len(sides) != 4 or min(sides) < 0 or not any(sides):
        raise click.BadParameter(f"{value!r}: give LEFT,TOP,RIGHT,BOTTOM px (or one number for all four), "
                                 f"whole numbers ≥ 0, not all 0", param_hint="--expand")
    return sides


def _parse_loras(values) -> list[tuple[str, float]]:
    """FILE[:SCALE] → (FILE, SCALE), split as lora.split_spec does."""
    from .lora import split_spec

    out = []
    for value in values:
        name, tail = split_spec(value)
        if tail is None:
            out.append((value, 1.0))
            continue
        try:
            scale = float(tail)
        except ValueError:
            scale = math.nan
        if not math.isfinite(scale):
            raise click.BadParameter(f"{value}: the scale {tail!r} is not a number; write FILE:SCALE, e.g. "
                                     f"style.safetensors:0.8", param_hint="--lora")
        out.append((name, scale))
    return out


def _dry_run(spec, paths_kw, dtype, edit, steps, guidance, budget, loras=()):
    from . import hub
    from .pipeline import prepare_inputs

    steps = spec.default_steps if steps is None else steps
    guidance = spec.default_guidance if guidance is None else guidance
    click.echo(f"{spec.name}: {steps} steps, guidance {guidance:g} ({_GUIDANCE[spec.guidance_mode]})")
    located = hub.locate(spec, **paths_kw)
    for line in hub.describe(spec, located):
        click.echo(line)
    from .pipeline import dtype_name, open_backend

    be, name, device = open_backend(budget["backend"], budget["device"])
    click.echo(f"backend: {name} on {device}, dtype {dtype_name(be, be.resolve_dtype(dtype))} (VAE float32)")
    inputs = prepare_inputs(spec.name, **edit)
    if inputs.refs or inputs.init is not None:
        sizes = ", ".join(f"{r.shape[1]}x{r.shape[0]}" for r in inputs.refs)
        masked = inputs.masked
        width, height = masked.source.size if masked is not None else (inputs.width, inputs.height)
        box = masked is not None and masked.box
        click.echo(f"output {width}x{height}"
                   + (f"; generating the mask's box {box} at {inputs.width}x{inputs.height}" if box else "")
                   + (f"; references {sizes} ({inputs.ref_tokens} tokens)" if sizes else ""))
    click.echo(_memory_plan_without_loading(spec, located, dtype, inputs, guidance, budget, loras).describe())


def _memory_plan_without_loading(spec, files, dtype, inputs, guidance, budget, loras=()):
    """The memory plan from file headers only (components not downloaded are sized from their shapes);
    loras: (name, local file, scale), read for what they add beside quantized weights."""
    from .config import transformer_shapes
    from .dit_names import transformer_entries
    from .lora import read_lora
    from .pipeline import DTYPE_BYTES, dtype_name, memory_plan_from_files, open_backend, uses_cfg
    from .weights import WeightSource

    be, _, _ = open_backend(budget["backend"], budget["device"])
    size = DTYPE_BYTES[dtype_name(be, be.resolve_dtype(dtype))]
    shapes = transformer_shapes(spec.transformer)
    if loras and files.get("transformer") is not None:  # the file's own shapes, as the pipeline reads them
        entries = transformer_entries(WeightSource(files["transformer"]))
        shapes = {k: tuple(e.shape) for k, e in entries.items()}
    return memory_plan_from_files(spec, files, be, size, inputs.width, inputs.height,
                                  budget_gb=budget["memory_budget"], stream_from=budget["stream_from"],
                                  cfg=uses_cfg(spec, guidance), ref_tokens=inputs.ref_tokens,
                                  image_size=inputs.image_size,
                                  loras=[(read_lora(f, shapes), scale) for _, f, scale in loras])


def _generate(spec, paths_kw, edit, settings, seeds, paths, dtype, budget, compile_, fp8_matmul, loras):
    """settings: the GenerationRequest's prompt, negative_prompt, strength, steps, guidance and
    keep_unmasked; loras:
    (name as given, local file, scale)."""
    from .pipeline import GenerationRequest, load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(spec, dtype=dtype, **paths_kw, **budget, compile=compile_, fp8_matmul=fp8_matmul,
                         loras=[(f, scale) for _, f, scale in loras])
    pipe.settings(settings["steps"], settings["guidance"])  # bad steps fail here, before any model loads
    inputs = pipe.prepare_inputs(**edit)  # a bad image fails here, before any model loads
    request = GenerationRequest(inputs, seeds[0], **settings)
    # An impossible budget fails here, before any model loads.
    plan = pipe.plan(inputs.width, inputs.height, request.guidance, inputs)
    if any(p.streamed or p.tile for p in plan.phases):
        click.echo(plan.describe())
    # the file as given, so that the regenerate line finds it again; the digest says which file it was
    lora_meta = [{**record, "file": name} for (name, _, _), record in zip(loras, pipe.lora_records)]
    try:
        _run(pipe, request, plan, seeds, paths, edit, lora_meta)
    except Exception as e:
        if not _out_of_memory(e):
            raise
        _fail(_oom_message(e, pipe, request, plan))
    click.echo(f"done in {time.perf_counter() - start:.1f} s, peak memory "
               f"{pipe.backend.peak_memory() / 2**30:.2f} GiB")


def _out_of_memory(e: Exception) -> bool:
    """torch's OutOfMemoryError, MLX's allocation failures (RuntimeErrors saying so), Python's MemoryError."""
    text = str(e).lower()
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("out of memory" in text or "malloc" in text))


def _oom_message(e: Exception, pipe, request, plan) -> str:
    """What ran out, what the plan expected, and the smallest budget the planner can meet by streaming."""
    from .memory import GB, MemoryPlanError

    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    head = (f"{pipe.device} ran out of memory ({first}); the plan expected a peak of {plan.peak / GB:.2f} GB "
            f"within a {plan.budget / GB:.2f} GB budget, more than was free")
    inputs = request.inputs
    lo, hi = 0.0, plan.budget / GB  # bisect for the smallest budget that still plans (headers only: cheap)
    for _ in range(12):
        mid = (lo + hi) / 2
        try:
            pipe.plan(inputs.width, inputs.height, request.guidance, inputs, budget_gb=mid)
            hi = mid
        except MemoryPlanError:
            lo = mid
    if hi * GB >= 0.9 * plan.peak:
        return f"{head}; streaming would not make it much smaller: close other programs or use a smaller " \
               f"quantization"
    return (f"{head}: pass --memory-budget {float(f'{hi * 1.05:.2g}'):g} (or lower) "
            f"to stream more of the model")


def _run(pipe, request, plan, seeds, paths, edit, lora_meta):
    """A progress bar per phase (encode, each seed's denoise and decode); each seed's PNG saved."""
    from tqdm import tqdm

    from .generation import Phase, Step, images

    bar = None
    try:
        for event in images(pipe, request, plan, seeds, edit, lora_meta):
            if isinstance(event, Step):
                bar.update()
                continue
            if bar is not None:  # the phase before has ended
                bar.update(bar.total - bar.n)
                bar.close()
            if isinstance(event, Phase):
                if event.name == "denoise":
                    click.echo(f"seed {event.seed}")
                bar = tqdm(total=event.total, desc=event.name, unit=_UNITS[event.name])
            else:
                bar = None
                save_png(paths[event.index], event.png)
                click.echo(f"saved {paths[event.index]}")
    finally:
        if bar is not None:
            bar.close()


def read_metadata(path: Path) -> dict:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            raw = im.info.get(META_KEY)
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image") from None
    if raw is None:
        raise ValueError(f"{path} has no flux2 settings (it was not made by flux2 generate)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: a deeply nested `[[[[…`
        raise ValueError(f"{path}: its flux2 settings are not valid JSON") from None
    _check_metadata(meta, path)
    return meta


# What `flux2 generate` stores and `regenerate_command` reads; float means any finite number.
_META_TYPES = {"prompt": str, "model": str, "seed": int, "steps": int, "guidance": float, "width": int,
               "height": int, "dtype": str, "negative_prompt": str, "refs": list, "image": str,
               "strength": float, "backend": str, "device": str, "compile": bool,
               "fp8_matmul": bool, "loras": "loras", "mask": str, "mask_crop": int, "mask_blur": float,
               "keep_unmasked": bool, "expand": "sizes", "mask_crop_size": "sizes"}
_META_REQUIRED = ("prompt", "model", "seed", "steps", "guidance", "width", "height", "dtype")
_META_KINDS = {str: "text", int: "a whole number", float: "a number", list: "a list of paths",
               bool: "true or false", "loras": "a list of {file, sha256, scale}",
               "sizes": "a list of whole numbers ≥ 0"}


def _is(value, kind) -> bool:
    if kind == "loras":
        return isinstance(value, list) and all(
            isinstance(v, dict) and set(v) == {"file", "sha256", "scale"} and _is(v["file"], str)
            and _is(v["sha256"], str) and _is(v["scale"], float) for v in value)
    if kind == "sizes":
        return isinstance(value, list) and all(_is(v, int) and v >= 0 for v in value)
    if isinstance(value, bool) or kind is bool:  # JSON true/false are Python ints
        return isinstance(value, bool) and kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def _check_metadata(meta, path: Path) -> None:
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its flux2 settings are not a JSON object")
    missing = [k for k in _META_REQUIRED if k not in meta]
    if "image" in meta and "strength" not in meta:
        missing.append("strength")
    if ("mask" in meta or "expand" in meta) and "image" not in meta:
        missing.append("image")
    if missing:
        raise ValueError(f"{path}: its flux2 settings lack {', '.join(missing)}")
    for key, kind in _META_TYPES.items():
        if key in meta and not _is(meta[key], kind):
            raise ValueError(f"{path}: its flux2 setting {key!r} should be {_META_KINDS[kind]}, not "
                             f"{json.dumps(meta[key])[:40]}")


def regenerate_command(meta: dict) -> str:
    """The `flux2 generate` line that reproduces an image from its metadata."""
    # an outpainting's size is the grown canvas, a crop's is the picture's: neither is a -W/-H
    size = meta.get("mask_crop_size") or ([] if "expand" in meta or "mask_crop" in meta
                                          else [meta["width"], meta["height"]])
    args = ["flux2", "generate", meta["prompt"], "--model", meta["model"]]
    if size:
        args += ["--width", str(size[0]), "--height", str(size[1])]
    args += ["--steps", str(meta["steps"]), "--guidance", f"{meta['guidance']:g}",
             "--seed", str(meta["seed"]), "--dtype", meta["dtype"]]
    for key in ("backend", "device"):  # absent from PNGs made before there were two backends
        if key in meta:
            args += [f"--{key}", meta[key]]
    if meta.get("compile"):
        args.append("--compile")
    if meta.get("fp8_matmul"):
        args.append("--fp8-matmul")
    for lora in meta.get("loras", []):
        args += ["--lora", f"{lora['file']}:{float(lora['scale'])!r}"]  # repr: the exact scale
    if "negative_prompt" in meta:
        args += ["--negative-prompt", meta["negative_prompt"]]
    for ref in meta.get("refs", []):
        args += ["--ref", ref]
    if "image" in meta:
        args += ["--image", meta["image"], "--strength", f"{meta['strength']!r}"]
    if "mask" in meta:
        args += ["--mask", meta["mask"]]
    if "expand" in meta:
        args += ["--expand", ",".join(str(v) for v in meta["expand"])]
    if "mask_crop" in meta:
        args += ["--mask-crop", str(meta["mask_crop"])]
    if meta.get("mask_blur"):
        args += ["--mask-blur", f"{float(meta['mask_blur'])!r}"]
    if meta.get("keep_unmasked") is False:
        args.append("--no-keep-unmasked")
    return shlex.join(args)


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--plan", "show_plan", is_flag=True,
              help="Also print the memory plan for generating with PATH "
                   "(a model folder or transformer file).")
@click.option("-m", "--model", type=click.Choice(list(MODELS)), help="With --plan. " + MODEL_HELP)
@click.option("-W", "--width", type=click.IntRange(min=16), default=1024, show_default=True,
              help="With --plan: a multiple of 16; width x height at most 4 MP.")
@click.option("-H", "--height", type=click.IntRange(min=16), default=1024, show_default=True,
              help="With --plan: a multiple of 16; width x height at most 4 MP.")
@click.option("--memory-budget", type=click.FloatRange(min=0, min_open=True), metavar="GB",
              help="With --plan.")
@click.option("--dtype", type=click.Choice(DTYPES), help="With --plan.")
@_backend_options
def info(path, show_plan, model, width, height, memory_budget, dtype, backend, device):
    """Show the settings stored in a PNG made by `flux2 generate` and how to make it again; or, for a
    .gguf, .safetensors or model folder: the model, tensor count, bytes per type and memory on MLX."""
    if path.is_dir() or path.suffix.lower() in (".gguf", ".safetensors"):
        from . import hub
        from .pipeline import Inputs, check_size
        from .weights import WeightsError

        try:
            from .info import describe
            from .variants import detect

            for line in describe(path):
                click.echo(line)
            where = {"model_path": path} if path.is_dir() else {"transformer": path}
            try:
                detected = detect(**where)
            except WeightsError:  # a VAE or text encoder file: no variant to tell
                detected = None
            if detected is not None and detected.variant is not None:
                click.echo(f"variant: {detected.variant} ({detected.signal})")
            elif detected is not None:
                click.echo(f"variant: one of {', '.join(detected.candidates)} ({detected.signal} fit all)")
            if show_plan:
                check_size(width, height)
                spec = MODELS[_choose_model(model, **where, detection=detected)]
                files = hub.locate(spec, **where)
                budget = dict(memory_budget=memory_budget, stream_from=None, backend=backend, device=device)
                plan = _memory_plan_without_loading(spec, files, dtype, Inputs(width, height), None, budget)
                click.echo(plan.describe())
        except (WeightsError, ValueError, OSError) as e:
            _fail(str(e))
        return
    try:
        meta = read_metadata(path)
    except (ValueError, OSError) as e:
        _fail(str(e))
    for key in sorted(meta):
        click.echo(f"{key}: {meta[key]}")
    click.echo(f"regenerate: {regenerate_command(meta)}")


@main.command()
def models():
    """List the FLUX.2 variants with their default steps, guidance and weights."""
    for spec in MODELS.values():
        click.echo(f"{spec.name:14} {spec.default_steps:>2} steps, guidance {spec.default_guidance:g} "
                   f"({_GUIDANCE[spec.guidance_mode]})  {spec.repo_id}/{spec.transformer_file}")


@main.command()
@click.option("-m", "--model", "models", type=click.Choice(list(MODELS)), multiple=True,
              help="The model loaded at start [default: the files' variant, else klein-4b]. Repeat to let "
                   "requests switch to others, taken from the Hugging Face cache (downloaded on first use).")
@click.option("--model-path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The first model's downloaded folder (BFL or diffusers layout).")
@click.option("--transformer", "--weights", "transformer", type=click.Path(exists=True, path_type=Path),
              help="The first model's transformer: a .safetensors file or a diffusers transformer/ folder.")
@_component_options
@click.option("--dtype", type=click.Choice(DTYPES), help="Default: bfloat16 on a GPU, float32 on CPU.")
@_backend_options
@click.option("--memory-budget", type=click.FloatRange(min=0, min_open=True), metavar="GB",
              help="Memory the model may use; components that do not fit are streamed block by block.")
@click.option("--stream-from", type=click.Choice(["ram", "disk"]), help="As for generate.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The interface to listen on; anything but loopback should have an --api-key.")
@click.option("--port", type=click.IntRange(1, 65535), default=8188, show_default=True)
@click.option("--api-key", metavar="KEY", envvar="FLUX2_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every API request (env FLUX2_API_KEY).")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also save every image here as a PNG with its settings.")
@click.option("--max-queue", type=click.IntRange(min=1), default=16, show_default=True,
              help="Jobs that may wait; more get 429.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=50, show_default=True,
              help="The largest request body (images included).")
def serve(models, model_path, transformer, vae, text_encoder, tokenizer, dtype, backend, device,
          memory_budget, stream_from, host, port, api_key, output_dir, max_queue, max_upload_mb):
    """Serve the model over HTTP: OpenAI's images API (/v1/images/generations, /v1/images/edits), jobs with
    progress events (/v1/jobs), and a web page at /. Needs pip install 'flux2-mlx[serve]'."""
    try:
        import uvicorn

        from .server import ImageServer
    except ModuleNotFoundError as e:
        _fail(f"flux2 serve needs {e.name}: pip install 'flux2-mlx[serve]'")
    from .pipeline import load_pipeline
    from .weights import WeightsError

    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        _check_writable(output_dir, "--output-dir")
    try:  # a port in use is one error line before minutes of loading, not uvicorn's after them
        import socket

        with socket.create_server((host, port)):
            pass
    except OSError as e:
        _fail(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host")
    loopback = host in LOOPBACK
    if api_key is None and not loopback:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this port can "
                   f"use the server", err=True)
    first = _choose_model(models[0] if models else None, model_path, transformer)  # as generate does
    names = list(dict.fromkeys([first, *models[1:]]))
    kw = dict(dtype=dtype, backend=backend, device=device, memory_budget=memory_budget,
              stream_from=stream_from)
    # The file options are the first model's: klein and klein base have the same shapes, so another model
    # given the same files would run the wrong weights without a word.
    files = dict(model_path=model_path, transformer=transformer, vae=vae, text_encoder=text_encoder,
                 tokenizer=tokenizer)

    def load(name):
        return load_pipeline(name, **kw, **(files if name == names[0] else {}))

    server = ImageServer(load, [MODELS[n] for n in names], api_key=api_key, output_dir=output_dir,
                         max_queue=max_queue, max_upload=int(max_upload_mb * 2**20),
                         hosts=LOOPBACK if loopback else None)
    server.start()
    try:
        server.wait_ready()  # a missing or wrong file is an error line now, not a server that fails every job
    except (WeightsError, ValueError, OSError) as e:
        _fail(str(e))
    click.echo(f"serving {', '.join(names)} on http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(server.app, host=host, port=port, log_level="warning")


@main.command()
@click.argument("src")
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-t", "--type", "qtype", required=True, metavar="TYPE",
              help="Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q4_0, Q4_1, Q5_0, Q5_1, Q3_K_M, Q2_K, "
                   "BF16, F16 (a GGUF); FP8, NVFP4, MXFP8 (a ComfyUI .safetensors, transformers only).")
@click.option("--force", is_flag=True, help="Replace an existing DST.")
@click.option("--all-layers", is_flag=True,
              help="Text encoders: keep every layer, not only those FLUX.2 uses.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None, metavar="N",
              help="Quantize with N threads (default: one per CPU core).")
def convert(src, dst, qtype, force, all_layers, jobs):
    """Convert SRC (a model name, a BFL .safetensors file, a diffusers transformer folder or a text-encoder
    folder) to a GGUF file DST that ComfyUI-GGUF, stable-diffusion.cpp and llama.cpp read, or (--type FP8,
    NVFP4 or MXFP8) a transformer to a .safetensors file that ComfyUI reads."""
    if dst.parent.is_dir():  # a missing folder is convert()'s to report
        _check_writable(dst.parent, "DST")
    from .convert import convert as run_convert
    from .weights import WeightsError

    warnings.showwarning = lambda message, *_args, **_kw: click.echo(f"warning: {message}", err=True)
    start = time.perf_counter()
    try:
        out = run_convert(src, dst, qtype, force=force, all_layers=all_layers, jobs=jobs)
    except (WeightsError, ValueError, OSError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail(f"interrupted; {dst} was not written", 130)
    click.echo(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s")
