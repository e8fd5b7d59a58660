"""`flux2 generate --mask / --expand` end to end on the tiny klein repo: the PNG records the mask settings,
the regenerate line reproduces it byte for byte, kept pixels are the source's; bad input is one line."""

import json
import shlex

import numpy as np
import pytest
from PIL import Image
from test_cli import run
from test_inpaint import _mask, _textured

from flux2_mlx.cli import regenerate_command
from flux2_mlx.pipeline import prepare_inputs

pytestmark = pytest.mark.usefixtures("short_prompts")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A grainy 96x64 photo, its mask drawn at half resolution, and a mask with transparency (the photo
    with the area to repaint erased)."""
    d = tmp_path_factory.mktemp("inpaint")
    _textured(96, 64, 7).save(d / "photo.png")
    _mask(48, 32, (12, 8, 36, 24)).save(d / "mask.png")
    rgba = np.full((64, 96, 4), 255, np.uint8)
    rgba[..., :3] = 0  # black everywhere: only the alpha says where to paint
    rgba[16:48, 24:72, 3] = 0
    Image.fromarray(rgba, "RGBA").save(d / "layer.png")
    return d


def _regenerate(out, tiny_repo, again):
    command = run("info", out).output.strip().splitlines()[-1].removeprefix("regenerate: ")
    r = run(*shlex.split(command)[1:], "--model-path", tiny_repo, "-o", again)
    assert r.exit_code == 0, r.output
    return command


def test_inpaint_is_recorded_and_regenerated(tiny_repo, pictures, tmp_path):
    """--mask-crop and --mask-blur: the crop (generated at its own 80x64 px) pasted back, every pixel
    outside the feathered mask the photo's own; the regenerate line makes the same file."""
    photo, out = pictures / "photo.png", tmp_path / "out.png"
    flags = ["--mask-crop", "4", "--mask-blur", "1.5"]
    r = run("generate", "a cat", "--model-path", tiny_repo, "--image", photo, "--mask", pictures / "mask.png",
            "--strength", 0.75, "--steps", 2, "--seed", 4, *flags, "-o", out)
    assert r.exit_code == 0, r.output
    meta = json.loads(Image.open(out).info["flux2"])
    assert meta["mask"] == str(pictures / "mask.png") and (meta["width"], meta["height"]) == (96, 64)
    assert meta["keep_unmasked"] is True and "mask_crop_size" not in meta
    command = _regenerate(out, tiny_repo, tmp_path / "again.png")
    assert "--mask-crop 4 --mask-blur 1.5" in command and "--width" not in command
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()
    got, src = np.asarray(Image.open(out), np.int16), np.asarray(Image.open(photo), np.int16)
    inputs = prepare_inputs("klein-4b", image=photo, mask=pictures / "mask.png", mask_crop=4, mask_blur=1.5)
    assert (inputs.width, inputs.height) == (80, 64)  # the box: the feather's faint tail counts
    kept = np.asarray(inputs.masked.mask) == 0
    assert kept.sum() > 3000 and np.array_equal(got[kept], src[kept])
    assert np.abs(got - src)[24:40, 32:64].mean() > 10
    r = run("generate", "a cat", "--model-path", tiny_repo, "--image", photo, "--mask", pictures / "mask.png",
            *flags, "--dry-run")
    assert f"output 96x64; generating the mask's box {inputs.masked.box} at 80x64" in r.output


def test_regenerate_line_of_every_mask_setting():
    meta = dict(prompt="p", model="klein-4b", seed=1, steps=4, guidance=1.0, width=96, height=64,
                dtype="float32", image="a.png", strength=0.75, mask="m.png", mask_crop=8, mask_blur=0.0,
                mask_crop_size=[128, 96], keep_unmasked=False)
    assert regenerate_command(meta) == ("flux2 generate p --model klein-4b --width 128 --height 96 --steps 4 "
                                        "--guidance 1 --seed 1 --dtype float32 --image a.png --strength 0.75 "
                                        "--mask m.png --mask-crop 8 --no-keep-unmasked")


def test_outpaint_keeps_the_picture_and_grows_the_canvas(tiny_repo, pictures, tmp_path):
    """--expand 16,0,8,0: 8 rounds up to 16; the old pixels are kept, the new columns are drawn (not the
    repeated edge the canvas started with); the regenerate line reproduces it."""
    photo, out = pictures / "photo.png", tmp_path / "wide.png"
    r = run("generate", "a wider view", "--model-path", tiny_repo, "--image", photo, "--expand", "16,0,8,0",
            "--steps", 2, "--seed", 5, "-o", out)
    assert r.exit_code == 0, r.output
    got, src = np.asarray(Image.open(out), np.int16), np.asarray(Image.open(photo), np.int16)
    assert got.shape == (64, 128, 3) and np.array_equal(got[:, 16:112], src)
    for border in (got[:, :16], got[:, 112:]):
        assert border.std(axis=1).mean() > 5  # an edge repeated would be flat along each row
    meta = json.loads(Image.open(out).info["flux2"])
    assert meta["expand"] == [16, 0, 8, 0] and meta["strength"] == 1.0
    assert "--width" not in _regenerate(out, tiny_repo, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()


def test_mask_alpha_and_resolution(pictures):
    """A mask with transparency paints where it is transparent; one drawn at half size is scaled to the
    image's, not misaligned; an array of 0..1 is a mask too."""
    half = prepare_inputs("klein-4b", image=pictures / "photo.png", mask=pictures / "mask.png")
    layer = prepare_inputs("klein-4b", image=pictures / "photo.png", mask=pictures / "layer.png")
    want = np.zeros((64, 96), np.uint8)
    want[16:48, 24:72] = 255
    assert np.array_equal(np.asarray(half.masked.mask) >= 128, want > 0)
    assert np.array_equal(np.asarray(layer.masked.mask), want)
    array = prepare_inputs("klein-4b", image=pictures / "photo.png", mask=want[..., None] / 255.0)
    assert np.array_equal(array.masked.cells, layer.masked.cells) and array.masked.cells.sum() == 6


@pytest.mark.parametrize("args,message", [
    (["--mask", "black.png"], "the mask is black everywhere: nothing to repaint"),
    (["--mask", "thin.png"], "miss the centre of every 16-px cell"),
    (["--mask", "square.png"], "the mask is 64x64 px but the image 96x64 px, another aspect ratio"),
    (["--mask", "notes.png"], "is not a readable image"),
    (["--expand", "1024"], "the limit is 4 MP"),
    (["--expand", "1,2"], "--expand: '1,2': give LEFT,TOP,RIGHT,BOTTOM"),
    (["--expand", "16", "-W", "96"], "--expand sets the output size"),
    (["--mask-blur", "2"], "--mask-blur: works only with --mask or --expand"),
])
def test_bad_masks_are_one_line(tiny_repo, pictures, tmp_path, args, message):
    Image.new("L", (96, 64)).save(tmp_path / "black.png")
    _mask(96, 64, (0, 0, 96, 6)).save(tmp_path / "thin.png")
    _mask(64, 64, (8, 8, 40, 40)).save(tmp_path / "square.png")
    (tmp_path / "notes.png").write_text("not a picture")
    args = [tmp_path / a if str(a).endswith(".png") else a for a in args]
    out = tmp_path / "out.png"
    r = run("generate", "a cat", "--model-path", tiny_repo, "--image", pictures / "photo.png", *args,
            "--steps", 1, "-o", out)
    assert r.exit_code == 2 and not out.exists()
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr


def test_mask_without_image_is_one_line(tiny_repo, pictures, tmp_path):
    r = run("generate", "a cat", "--model-path", tiny_repo, "--mask", pictures / "mask.png",
            "-o", tmp_path / "out.png")
    assert r.exit_code == 2 and r.stderr == "error: --mask: works only with --image PICTURE; add one or " \
                                            "drop --mask\n"
