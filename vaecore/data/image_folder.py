"""A folder of a user's own images: one sub-folder per class, or all images in one flat folder.

Every image is decoded with Pillow (its decompression-bomb guard left on), turned upright by its
EXIF orientation, converted to grayscale (``channels=1``) or RGB (``channels=3``) and resized to
``image_size`` x ``image_size`` with a Lanczos filter (the aspect ratio is not kept, as in the original
project). Transparent pixels are composited over black, the background of MNIST-like data, rather
than revealing whatever colour happens to be stored under them. 16-bit grayscale is scaled to 8 bits.

Files are classified by extension: other files are skipped and counted; a file with an image
extension that does not decode is an error naming it (or skipped and counted with ``skip_bad``).
Class labels follow the sorted sub-folder names; hidden files and folders are ignored. There is no
test split in a folder, so a seeded 80/20 split gives the validation set.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DataError
from .dataset import Dataset, split_train_validation

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
MAX_IMAGE_SIZE = 4096


def load_image_folder(folder, *, seed: int = 0, image_size: int = 28, channels: int = 1,
                      skip_bad: bool = False, log=print) -> Dataset:
    folder = Path(folder)
    if channels not in (1, 3):
        raise DataError(f"{folder}: channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise DataError(f"{folder}: image size must be between 1 and {MAX_IMAGE_SIZE}, got {image_size}")
    images, classes, other = _list_images(folder)
    if not images:
        raise DataError(f"{folder}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))}; {other} other files)")

    x = np.empty((len(images), channels, image_size, image_size), dtype=np.uint8)
    y = np.empty(len(images), dtype=np.int64)
    kept, bad = 0, 0
    for path, label in images:
        try:
            x[kept] = decode_image(path, image_size, channels)
        except DataError:
            if not skip_bad:
                raise
            bad += 1
            continue
        y[kept] = label
        kept += 1
    if kept < 2:
        raise DataError(f"{folder}: {kept} readable images; at least 2 are needed for a training and a validation set")
    x, y = x[:kept], (y[:kept] if classes else None)

    x_train, x_val, y_train, y_val = split_train_validation(x, y, seed, str(folder))
    kind = f"{len(classes)} classes" if classes else "no classes"
    skipped = f", skipped {other} non-image files" + (f" and {bad} unreadable images" if bad else "")
    origin = (f"image folder {folder} ({kept} images, {kind}, {'gray' if channels == 1 else 'RGB'} "
              f"{image_size}x{image_size}; 20% validation split, seed {seed})")
    log(f"data: {origin}{skipped}")
    name = folder.resolve().name or str(folder)
    return Dataset(name, origin, x_train, x_val, y_train, y_val, classes=tuple(classes) or None)


def _list_images(folder: Path):
    """([(path, label)], class names, number of non-image files); classes are sorted sub-folders."""
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"{folder}: cannot list ({e.strerror or e})") from None
    subdirs = [p for p in entries if p.is_dir()]
    other = 0
    if not subdirs:  # flat folder: no labels
        files = [p for p in entries if p.is_file()]
        images = [(p, -1) for p in files if _is_image(p)]
        return images, [], len(files) - len(images)
    other += sum(1 for p in entries if p.is_file())  # files beside the class folders belong to no class
    images, classes = [], []
    for d in subdirs:
        files = sorted(p for p in d.rglob("*") if p.is_file() and not _hidden(p, d))
        found = [p for p in files if _is_image(p)]
        other += len(files) - len(found)
        if found:
            images += [(p, len(classes)) for p in found]
            classes.append(d.name)
    return images, classes, other


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def decode_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as uint8 (channels, size, size), or a DataError naming the file."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its pixel limit and twice it; refuse that band as well
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            img.draft("L" if channels == 1 else "RGB", (size, size))  # JPEG: decode at a reduced scale
            img = ImageOps.exif_transpose(img)
            img = _convert(img, channels)
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.LANCZOS)
            array = np.asarray(img, dtype=np.uint8)
    # Pillow's decoders report damaged files with many exception types (OSError, SyntaxError,
    # ValueError, struct.error, DecompressionBombError, ...); the block holds only decoding.
    except Exception as e:
        raise DataError(f"{path}: unreadable image ({e.__class__.__name__}: {e})") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _convert(img: Image.Image, channels: int) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit gray: Pillow's convert would clip
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGB", rgba.size, 0)
        black.paste(rgba, mask=rgba.getchannel("A"))
        img = black
    return img.convert("L" if channels == 1 else "RGB")
