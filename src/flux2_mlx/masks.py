"""Inpainting masks: reading one (white = repaint, black = keep), bringing it to the start image's geometry,
the crop around it, its latent-cell form, outpainting canvases and the final composite.

Numpy and Pillow only.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .images import check_reference, has_alpha, init_geometry, open_image, read_image, to_array

ASPECT_TOLERANCE = 0.01  # a mask may differ from its image's aspect ratio by rounding, not by a crop


def open_mask(source) -> Image.Image:
    """A path, PIL image or array (H, W) / (H, W, 1), uint8 0..255 or float 0..1 → an "L" image.

    A mask with transparency repaints where it is transparent, as OpenAI's image edits and ComfyUI read
    one (the photo with the area to redo erased); an opaque one (alpha 255 everywhere, as many editors
    save) uses its luminance.
    """
    if isinstance(source, np.ndarray):
        a = source[..., 0] if source.ndim == 3 and source.shape[-1] == 1 else source
        if a.ndim != 2:
            raise ValueError(f"a mask array must be (H, W) or (H, W, 1), got shape {source.shape}")
        if a.dtype != np.uint8:
            a = np.round(np.clip(np.asarray(a, np.float64), 0, 1) * 255).astype(np.uint8)
        return Image.fromarray(a, "L")
    img = read_image(source, "mask")
    if has_alpha(img):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return ImageOps.invert(alpha)
    return img.convert("L")


def fit_to(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask at its image's original size: resized (LANCZOS) when it was drawn at another resolution;
    another aspect ratio is an error, never a silent misalignment."""
    if mask.size == size:
        return mask
    (mw, mh), (w, h) = mask.size, size
    if abs(mw * h / (mh * w) - 1) > ASPECT_TOLERANCE:
        raise ValueError(f"the mask is {mw}x{mh} px but the image {w}x{h} px, another aspect ratio; "
                         "draw the mask on the image itself (any resolution of the same shape is fine)")
    return mask.resize(size, Image.Resampling.LANCZOS)


def binarize(mask: Image.Image) -> np.ndarray:
    """(H, W) float32 of 0 and 1: diffusers' mask processor (x / 255, ≥ 0.5 → 1)."""
    a = np.asarray(mask, np.float32) / np.float32(255.0)
    return (a >= 0.5).astype(np.float32)


def latent_mask(mask: Image.Image) -> np.ndarray:
    """The mask per latent cell as tokens (1, h·w, 1): binarized, then bilinearly sampled down 16x as
    diffusers' prepare_mask_latents does (torch interpolate, align_corners False, no antialias). That
    reads only pixels 7 and 8 of each 16-px cell: strokes that miss every cell centre are not repainted
    (check_paints says so instead of doing nothing)."""
    m = binarize(mask)
    h, w = m.shape[0] // 16, m.shape[1] // 16
    rows = (m[7::16][:h] + m[8::16][:h]) * np.float32(0.5)
    cells = (rows[:, 7::16][:, :w] + rows[:, 8::16][:, :w]) * np.float32(0.5)
    return np.ascontiguousarray(cells.reshape(1, h * w, 1))


def check_paints(mask: Image.Image, cells: np.ndarray | None = None) -> None:
    """ValueError when nothing would be repainted (by the mask's pixels, or by its latent `cells`)."""
    if not binarize(mask).any():
        raise ValueError("the mask is black everywhere: nothing to repaint (white = repaint, black = keep)")
    if cells is not None and not cells.any():
        raise ValueError("the mask's white areas miss the centre of every 16-px cell, so nothing would be "
                         "repainted; widen the strokes to 16 px or more")


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """diffusers' VaeImageProcessor.get_crop_region: the box (x1, y1, x2, y2) around every non-zero mask
    pixel, grown by `pad` and then to the aspect ratio width:height, inside the mask."""
    m = np.asarray(mask)
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        diff = int((x2 - x1) / ratio - (y2 - y1))
        y1, y2 = _grow(y1 - diff // 2, y2 + diff - diff // 2, h)
    else:
        diff = int((y2 - y1) * ratio - (x2 - x1))
        x1, x2 = _grow(x1 - diff // 2, x2 + diff - diff // 2, w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, n: int) -> tuple[int, int]:
    """diffusers' shift of a grown [lo, hi) back inside [0, n), clipped when it is longer than n."""
    if hi >= n:
        lo, hi = lo - (hi - n), n
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, n)


def own_crop_region(mask: Image.Image, pad: int, side: int = 64) -> tuple[int, int, int, int]:
    """The box around the mask grown by `pad`, then outwards to multiples of 16 px of at least `side`,
    inside the image: generated at its own resolution, no resampling either way."""
    m = np.asarray(mask)
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    box = []
    for lo, hi, n in ((cols[0] - pad, cols[-1] + 1 + pad, w), (rows[0] - pad, rows[-1] + 1 + pad, h)):
        lo, hi = max(int(lo), 0), min(int(hi), n)
        size = min(max(-(-(hi - lo) // 16) * 16, side), n // 16 * 16)
        lo = min(max(lo - (size - (hi - lo)) // 2, 0), n - size)
        box.append((lo, lo + size))
    (x1, x2), (y1, y2) = box
    return x1, y1, x2, y2


def resize_and_fill(img: Image.Image, width: int, height: int) -> Image.Image:
    """diffusers' VaeImageProcessor._resize_and_fill: scale (LANCZOS) to fit width x height keeping the
    aspect ratio, centre it, and stretch its edge rows or columns over the rest."""
    ratio, src_ratio = width / height, img.width / img.height
    src_w = width if ratio < src_ratio else img.width * height // img.height
    src_h = height if ratio >= src_ratio else img.height * width // img.width
    resized = img.resize((src_w, src_h), Image.Resampling.LANCZOS)
    res = Image.new(img.mode, (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            res.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            res.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return res


def expand_canvas(img: Image.Image, mask: Image.Image | None, borders) -> tuple[Image.Image, Image.Image]:
    """Outpainting: the image padded by (left, top, right, bottom) px, each rounded up to a multiple of 16,
    the new area filled by repeating the edge pixels (a start the model repaints); the mask white over the
    new area (and over the given mask's white, if any)."""
    left, top, right, bottom = (-(-int(b) // 16) * 16 for b in borders)
    a = np.pad(np.asarray(img), ((top, bottom), (left, right), (0, 0)), mode="edge")
    m = np.full(a.shape[:2], 255, np.uint8)
    m[top:top + img.height, left:left + img.width] = 0 if mask is None else np.asarray(mask)
    return Image.fromarray(a), Image.fromarray(m, "L")


def feather(mask: Image.Image, radius: float) -> Image.Image:
    """A Gaussian blur of the mask (diffusers' mask_processor.blur), in px of the image it covers."""
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def composite(source: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """source where the mask is 0, generated where it is 255, linearly between: every kept pixel is the
    source's own bytes."""
    s, g = np.asarray(source, np.float32), np.asarray(generated, np.float32)
    a = np.asarray(mask, np.float32)[..., None] / np.float32(255.0)
    return Image.fromarray(np.round(s + (g - s) * a).astype(np.uint8))


class Masked(NamedTuple):
    """An inpainting's prepared images: what is generated (`init`, (H, W, 3) in [-1, 1], and its latent-cell
    mask `cells`, (1, N, 1)), and what the result is composed on: the whole `source` picture, the feathered
    `mask` on it, and the `box` (x1, y1, x2, y2) the generated picture fills there (None: all of it)."""

    init: np.ndarray
    cells: np.ndarray
    source: Image.Image
    mask: Image.Image
    box: tuple[int, int, int, int] | None


def prepare_masked(image, mask=None, width: int | None = None, height: int | None = None,
                   crop: int | None = None, blur: float = 0.0, expand=None) -> Masked:
    """The start image and its mask (white = repaint; drawn at the image's size or any other of its shape)
    or an outpainting canvas (`expand`: left, top, right, bottom px). The mask goes through the image's own
    preparation (prepare_init), then `blur` feathers it. `crop` (px): only the mask's box grown by that much
    is generated, at width x height when given (diffusers' padding_mask_crop: the box grown to that aspect
    ratio, scaled to fill it), else at its own resolution (the box rounded out to 16 px)."""
    img = open_image(image, "--image")
    check_reference(img, "the --image")
    m = None if mask is None else fit_to(open_mask(mask), img.size)
    if expand is not None:
        if width or height:
            raise ValueError("--expand sets the output size; drop --width/--height")
        source, m = expand_canvas(init_geometry(img), None if m is None else init_geometry(m), expand)
    else:
        own = crop is not None  # a crop's width/height size the generation, not the picture
        source = init_geometry(img, None if own else width, None if own else height)
        m = init_geometry(m, None if own else width, None if own else height)
    m = feather(m, blur)
    box, generated, generated_mask = None, source, m
    if crop is not None:
        check_paints(m)
        if width or height:
            size = (width or source.width, height or source.height)
            box = crop_region(m, *size, crop)
        else:
            box = own_crop_region(m, crop)
            size = (box[2] - box[0], box[3] - box[1])
        generated, generated_mask = (resize_and_fill(a.crop(box), *size) for a in (source, m))
    cells = latent_mask(generated_mask)
    check_paints(generated_mask, cells)
    return Masked(to_array(generated), cells, source, m, box)


def paste_back(masked: Masked, generated: Image.Image, keep_unmasked: bool = True) -> Image.Image:
    """The generated picture on its source: resized into its box (LANCZOS) when cropped, and, with
    keep_unmasked, composed on the source through the feathered mask, so a pixel it does not touch keeps
    its bytes. diffusers' klein pipeline "resizes" the crop with Flux2ImageProcessor's _resize_and_crop,
    which only centre-crops: at another size than the box, its paste is misplaced and mis-scaled."""
    out = generated
    if masked.box is not None:
        x1, y1, x2, y2 = masked.box
        region = generated if generated.size == (x2 - x1, y2 - y1) else \
            generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS)
        out = masked.source.copy()
        out.paste(region, (x1, y1))
    return composite(masked.source, out, masked.mask) if keep_unmasked else out
