"""Pictures in and out: user images made to look like training data, and grids people look at.

All images here are uint8 arrays (N, C, H, W) or (C, H, W), the layout of the data sets; Pillow
does the decoding and resampling. Every PNG is written atomically.
"""

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import VaecoreError
from .fileio import atomic_path

INVERT_CHOICES = ("auto", "yes", "no")
FIT_CHOICES = ("center", "stretch")


def to_uint8(images, image_shape):
    """Floats in [0, 1], (N, D) on the host -> uint8 (N, C, H, W)."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    return np.rint(images * 255.0).astype(np.uint8).reshape(-1, *image_shape)


def _to_pil(image):
    """(C, H, W) uint8 -> a Pillow image (L or RGB)."""
    c = image.shape[0]
    return Image.fromarray(image[0] if c == 1 else np.transpose(image, (1, 2, 0)), "L" if c == 1 else "RGB")


def grid(images, ncols, scale=1, pad=2, background=64):
    """Tiles (N, C, H, W) uint8 images into a grid with a thin border, enlarged ``scale`` times."""
    n, c, h, w = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    canvas = np.full((c, pad + nrows * (h + pad), pad + ncols * (w + pad)), background, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y:y + h, x:x + w] = images[i]
    picture = _to_pil(canvas)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def comparison(top, bottom, scale=3):
    """A row of ``top`` images over a row of ``bottom`` ones (true over reconstructed)."""
    n = len(top)
    return grid(np.concatenate([top, bottom]), ncols=n, scale=scale)


def save_png(picture, path):
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        picture.save(tmp, format="PNG")
    return path


def read_image(path, image_shape, invert="auto", fit="center"):
    """Reads any image Pillow can and makes it look like a training image: (C, H, W) uint8.

    MNIST-like data is light ink on a dark background, centred with a margin. A photo or drawing is
    usually the opposite, so ``invert='auto'`` inverts when the border is lighter than the middle
    grey, and ``fit='center'`` crops to the ink, scales it into the central 20/28 of the frame
    keeping its aspect ratio, as MNIST was made; ``fit='stretch'`` resizes the whole picture.
    """
    c, h, w = image_shape
    picture = open_image(path)
    if picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info:
        picture = _flatten_transparency(picture.convert("RGBA"))
    picture = picture.convert("L" if c == 1 else "RGB")
    pixels = np.asarray(picture, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if invert not in INVERT_CHOICES:
        raise VaecoreError(f"--invert must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
    if invert == "yes" or (invert == "auto" and _border_mean(pixels) > 127.5):
        pixels = 255 - pixels
    pixels = _paper_to_black(pixels)
    if fit == "center":
        pixels = _fit_centered(pixels, h, w)
    elif fit == "stretch":
        pixels = _resize(pixels, h, w)
    else:
        raise VaecoreError(f"--fit must be one of {', '.join(FIT_CHOICES)}, got {fit!r}")
    return np.ascontiguousarray(np.transpose(pixels, (2, 0, 1)))


def open_image(path):
    """Pillow's image, fully decoded, or a one-line error; the decompression-bomb guard stays on,
    and its warning band (1 to 2 times ``Image.MAX_IMAGE_PIXELS``) is refused too."""
    path = Path(path)
    if not path.exists():
        raise VaecoreError(f"{path}: no such file")
    if path.is_dir():
        raise VaecoreError(f"{path}: is a folder, not an image")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its pixel limit and twice it; a picture that large is no digit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(path)
            picture.load()
        return picture
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise VaecoreError(f"{path}: refused, too many pixels for a safe decode ({e})") from None
    except UnidentifiedImageError:
        raise VaecoreError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise VaecoreError(f"{path}: cannot read image ({e})") from None


def _flatten_transparency(rgba):
    """Puts a transparent drawing on paper that contrasts with its ink: dark strokes on white,
    light strokes on black, so neither vanishes into its background."""
    pixels = np.asarray(rgba, dtype=np.float32)
    alpha = pixels[..., 3] / 255.0
    ink = float((pixels[..., :3].mean(axis=2) * alpha).sum() / max(alpha.sum(), 1e-6))
    paper = (255, 255, 255, 255) if ink < 128 else (0, 0, 0, 255)
    return Image.alpha_composite(Image.new("RGBA", rgba.size, paper), rgba)


def _border_mean(pixels):
    border = np.concatenate([pixels[0].ravel(), pixels[-1].ravel(), pixels[:, 0].ravel(), pixels[:, -1].ravel()])
    return float(border.mean())


def _paper_to_black(pixels):
    """Stretches levels so the background is exactly 0 and the brightest ink 255.

    Photographed or JPEG paper is never pure white, and after inversion its grey would read as
    faint ink everywhere; training images have a background of exactly zero.
    """
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.float32)
    paper, top = float(np.median(border)), float(pixels.max())
    if top - paper < 1:
        return pixels
    stretched = (pixels.astype(np.float32) - paper) * (255.0 / (top - paper))
    return np.clip(np.rint(stretched), 0, 255).astype(np.uint8)


def _resize(pixels, h, w):
    picture = _to_pil(np.transpose(pixels, (2, 0, 1)))
    resized = np.asarray(picture.resize((w, h), Image.LANCZOS), dtype=np.uint8)
    return resized if resized.ndim == 3 else resized[:, :, None]


def _fit_centered(pixels, h, w):
    ink = pixels.max(axis=2) > 32
    if not ink.any():
        return _resize(pixels, h, w)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    crop = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    box_h, box_w = max(1, round(h * 20 / 28)), max(1, round(w * 20 / 28))
    ratio = min(box_h / crop.shape[0], box_w / crop.shape[1])
    new_h, new_w = max(1, round(crop.shape[0] * ratio)), max(1, round(crop.shape[1] * ratio))
    glyph = _resize(crop, new_h, new_w)
    frame = np.zeros((h, w, pixels.shape[2]), dtype=np.uint8)
    top, left = (h - new_h) // 2, (w - new_w) // 2
    frame[top:top + new_h, left:left + new_w] = glyph
    return frame
