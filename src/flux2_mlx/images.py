"""Input images for editing: reading any common file as upright 8-bit RGB, and preparing reference images
(BFL's checks, pixel cap and centre crop: docs/architecture.md, 'Reference images') and the img2img start
image as float arrays in [-1, 1].

Numpy and Pillow only.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_REFERENCES = 10
MIN_SIDE, MAX_ASPECT = 64, 8
INIT_PIXELS = 1024 * 1024  # an img2img image sets the output size: the model's native megapixel at most


def recommended_references(model: str) -> int:
    """BFL's API guidance (docs.bfl.ml editing guide): dev up to 6 references, klein up to 4."""
    return 6 if "dev" in model else 4


def reference_pixels(count: int) -> int:
    """BFL's cap (sampling.py cap_pixels): 2024² px (sic) for a single reference, 1024² each for several.
    diffusers caps every reference at 1024²; BFL is the primary reference."""
    return 2024 * 2024 if count == 1 else 1024 * 1024


def read_image(source, what: str = "image") -> Image.Image:
    """A path, a file's bytes (an upload) or a PIL image → upright (EXIF orientation applied), in its own
    mode; 16-bit greyscale scaled to 8-bit "L", not clipped. A file that is missing or not an image is a
    ValueError naming `what` and it."""
    if isinstance(source, Image.Image):
        img = source
    else:
        fp = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
        where = "" if isinstance(fp, io.BytesIO) else f" {fp}"
        if where and not fp.is_file():
            raise ValueError(f"{what}{where}: no such file")
        try:
            img = Image.open(fp)
            img.load()
        # Pillow reports some damaged files as SyntaxError, and refuses decompression bombs (> 179 MP).
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"{what}{where} is not a readable image ({e}); "
                             "use a PNG, JPEG or WebP") from None
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I"):
        # convert("L") would clip 16-bit values at 255; scale 0..65535 to 0..255 instead.
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")
    return img


def has_alpha(img: Image.Image) -> bool:
    """RGBA, LA, palette or colour-key transparency."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def open_image(source, what: str = "image") -> Image.Image:
    """A path or PIL image → upright 8-bit RGB (read_image). Transparency is composited on white rather
    than dropped, so a cut-out does not sit on black; CMYK, palette, greyscale and other modes are
    converted."""
    img = read_image(source, what)
    if has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def check_reference(img: Image.Image, what: str) -> None:
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ValueError(f"{what} is {w}x{h} px; both sides must be at least {MIN_SIDE} px: "
                         "use a larger image")
    if max(w / h, h / w) > MAX_ASPECT:
        raise ValueError(f"{what} is {w}x{h} px, an aspect ratio of {max(w / h, h / w):.1f}:1; the limit is "
                         f"{MAX_ASPECT}:1: crop it")


def cap_pixels(img: Image.Image, cap: int) -> Image.Image:
    """Scale down (LANCZOS, sizes floored) to at most `cap` pixels; smaller images are left alone."""
    w, h = img.size
    if w * h <= cap:
        return img
    s = math.sqrt(cap / (w * h))
    return img.resize((int(w * s), int(h * s)), Image.Resampling.LANCZOS)


def crop_to_16(img: Image.Image) -> Image.Image:
    """Centre crop (no resize) to multiples of 16 px."""
    w, h = img.size
    cw, ch = w // 16 * 16, h // 16 * 16
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def to_array(img: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [-1, 1], computed as diffusers does (x / 255, then 2x − 1)."""
    return np.asarray(img, dtype=np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)


def prepare_references(images, model: str = "") -> list[np.ndarray]:
    """Paths or PIL images → one (H_k, W_k, 3) array per reference, sizes multiples of 16."""
    images = list(images)
    if len(images) > MAX_REFERENCES:
        raise ValueError(f"{len(images)} reference images; at most {MAX_REFERENCES} are supported")
    if len(images) > recommended_references(model):
        warnings.warn(f"{len(images)} reference images; BFL recommends at most "
                      f"{recommended_references(model)} for {model or 'this model'}, "
                      "more may blend them poorly", stacklevel=3)
    out = []
    cap = reference_pixels(len(images))
    for k, source in enumerate(images):
        what = f"reference image {k + 1}" + (f" ({source})" if isinstance(source, (str, Path)) else "")
        img = open_image(source, f"reference image {k + 1}")  # open_image adds the path itself
        check_reference(img, what)
        out.append(to_array(crop_to_16(cap_pixels(img, cap))))
    return out


def prepare_init(image, width: int | None = None, height: int | None = None) -> np.ndarray:
    """The img2img start image as (H, W, 3). Its own size when width/height are not given (scaled down to at
    most 1024² px and cropped to multiples of 16, like a reference); else scaled (LANCZOS) to cover the
    asked size and centre-cropped."""
    img = open_image(image, "--image")
    check_reference(img, "the --image")
    return to_array(init_geometry(img, width, height))


def init_geometry(img: Image.Image, width: int | None = None, height: int | None = None) -> Image.Image:
    """prepare_init's pixels before scaling to [-1, 1]; an inpainting mask goes through the same."""
    own = crop_to_16(cap_pixels(img, INIT_PIXELS))
    size = (width or own.width, height or own.height)
    return own if own.size == size else ImageOps.fit(img, size, Image.Resampling.LANCZOS)
