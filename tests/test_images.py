"""Reference and start-image preprocessing (docs/architecture.md, 'Reference images'): modes, EXIF, limits,
caps."""

import math

import numpy as np
import pytest
from PIL import Image

from flux2_mlx.images import open_image, prepare_init, prepare_references, reference_pixels


def _gradient(w, h):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) % 256], -1).astype(np.uint8)


def test_rejects_tiny_extreme_and_foreign(tmp_path):
    with pytest.raises(ValueError, match="at least 64 px"):
        prepare_references([Image.new("RGB", (50, 80))])
    with pytest.raises(ValueError, match=r"9\.0:1; the limit is 8:1"):
        prepare_references([Image.new("RGB", (64, 576))])
    prepare_references([Image.new("RGB", (64, 512))])  # exactly 8:1 is allowed
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="is not a readable image"):
        prepare_references([tmp_path / "notes.png"])
    with pytest.raises(ValueError, match="no such file"):
        prepare_references([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="at most 10"):
        prepare_references([Image.new("RGB", (64, 64))] * 11)
    with pytest.warns(UserWarning, match="recommends at most 4"):
        prepare_references([Image.new("RGB", (64, 64))] * 5, "klein-4b")


def test_alpha_and_palette_transparency_become_white():
    rgba = np.zeros((64, 80, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:, :40, 3] = 255  # left half opaque, right half fully transparent (colour under it: dark)
    rgba[:, 40:60, 3] = 128
    out = np.asarray(open_image(Image.fromarray(rgba, "RGBA")))
    assert (out[:, :40] == (10, 20, 30)).all() and (out[:, 60:] == 255).all()
    assert np.abs(out[0, 50].astype(int)
                  - np.round((np.array([10, 20, 30]) * 128 + 255 * 127) / 255)).max() <= 1
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert (np.asarray(open_image(la))[:, 60:] == 255).all()
    pal = Image.fromarray(np.where(np.arange(80)[None, :] < 40, 1, 0).repeat(64, 0).astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0  # index 0 (black) is transparent
    out = np.asarray(open_image(pal))
    assert (out[:, :40] == (200, 0, 0)).all() and (out[:, 40:] == 255).all()


def test_cmyk_greyscale_and_16_bit(tmp_path):
    rgb = Image.fromarray(_gradient(80, 64))
    cmyk = rgb.convert("CMYK")
    assert np.array_equal(np.asarray(open_image(cmyk)), np.asarray(cmyk.convert("RGB")))
    grey = np.asarray(open_image(rgb.convert("L")))
    assert grey.shape == (64, 80, 3) and (grey[..., 0] == grey[..., 2]).all()
    deep = (np.linspace(0, 65535, 80)[None, :].repeat(64, 0)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = np.asarray(open_image(tmp_path / "deep.png"))
    # Scaled, not clipped: convert("L") would turn everything above 255 / 65535 white.
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and abs(int(out[0, 40, 0]) - 40 * 255 // 79) <= 1


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((64, 96, 3), np.uint8)
    a[:8, :8] = (255, 0, 0)  # red top-left corner as stored
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "phone.png", exif=exif)
    out = np.asarray(open_image(tmp_path / "phone.png"))
    assert out.shape == (96, 64, 3)  # displayed portrait
    assert (out[:8, -8:] == (255, 0, 0)).all()  # the stored top-left is now top-right


def test_pixel_cap_crop_and_values_match_the_spec():
    big = Image.fromarray(_gradient(3000, 2000))
    (one,) = prepare_references([big])
    s = math.sqrt(2024 * 2024 / 6e6)  # BFL: 2024² for a single reference
    assert one.shape == (int(2000 * s) // 16 * 16, int(3000 * s) // 16 * 16, 3)
    two = prepare_references([big, Image.new("RGB", (100, 70))])
    s = math.sqrt(1024 * 1024 / 6e6)
    assert two[0].shape == (int(2000 * s) // 16 * 16, int(3000 * s) // 16 * 16, 3)
    assert two[1].shape == (64, 96, 3) and reference_pixels(2) == 1024 * 1024
    assert one.dtype == np.float32 and one.min() >= -1 and one.max() <= 1


def test_several_references_equal_diffusers_preprocessing():
    """Where BFL and diffusers agree (several references: 1024² cap), our arrays equal diffusers'."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    proc = Flux2ImageProcessor(vae_scale_factor=16)
    imgs = [Image.fromarray(_gradient(1500, 900)), Image.fromarray(_gradient(131, 77))]
    ours = prepare_references(imgs)
    for img, arr in zip(imgs, ours):
        if img.width * img.height > 1024 * 1024:
            img = proc._resize_to_target_area(img, 1024 * 1024)
        w, h = img.width // 16 * 16, img.height // 16 * 16
        want = proc.preprocess(img, height=h, width=w, resize_mode="crop")[0].permute(1, 2, 0).numpy()
        assert arr.shape == want.shape and np.abs(arr - want).max() <= 1e-6


def test_init_image_size():
    img = Image.fromarray(_gradient(200, 100))
    assert prepare_init(img).shape == (96, 192, 3)  # its own size, cropped to multiples of 16
    assert prepare_init(img, 64, 64).shape == (64, 64, 3)  # covered and centre-cropped
    assert prepare_init(img, None, 48).shape == (48, 192, 3)
    assert prepare_init(Image.fromarray(_gradient(2000, 1500))).shape[:2] == (880, 1168)  # ≤ 1024² px


def test_decompression_bombs_and_broken_chunks_are_refused_in_one_line(tmp_path):
    Image.new("1", (14000, 14000)).save(tmp_path / "bomb.png")  # 196 MP: Pillow refuses to decode it
    good = tmp_path / "ok.png"
    Image.new("RGB", (64, 64), "red").save(good)
    raw = bytearray(good.read_bytes())
    raw[raw.index(b"IDAT")] = 0x0F  # a chunk type that is not letters: Pillow raises SyntaxError
    (tmp_path / "broken.png").write_bytes(bytes(raw))
    for name in ("bomb.png", "broken.png"):
        with pytest.raises(ValueError, match="not a readable image") as e:
            prepare_references([tmp_path / name], "klein-4b")
        assert "\n" not in str(e.value)
