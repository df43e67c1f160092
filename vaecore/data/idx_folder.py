"""A folder of MNIST-style IDX files: the four files, found by the names they are usually given.

Accepted names are ``[prefix-](train|t10k|test)-(images|labels)(-|.)idxN-ubyte[.gz]`` (the dot
variant is how some copies spell it; a prefix such as ``emnist-digits-`` is allowed). Training images
are required; labels are optional; without test images a seeded 80/20 split stands in for them.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import DataError
from .dataset import Dataset, split_train_validation
from .idx import images_from_idx, labels_from_idx, read_idx

IDX_NAME = re.compile(r"^(?:.*-)?(train|t10k|test)-(images|labels)[-.]idx\d-ubyte(\.gz)?$", re.IGNORECASE)


def looks_like_idx_folder(folder: Path) -> bool:
    return any(IDX_NAME.match(p.name) for p in folder.iterdir() if p.is_file())


def find_idx_files(folder: Path) -> dict[str, Path]:
    """Role ("train-images", "test-labels", ...) -> file; a raw file wins over its ``.gz`` twin."""
    found: dict[str, dict[str, Path]] = {}
    for p in sorted(folder.iterdir()):
        m = IDX_NAME.match(p.name)
        if not m or not p.is_file():
            continue
        split = "train" if m.group(1).lower() == "train" else "test"
        role = f"{split}-{m.group(2).lower()}"
        base = p.name[:-3] if m.group(3) else p.name
        found.setdefault(role, {}).setdefault(base.lower(), p)
        if not m.group(3):  # raw beats gzipped: same data, faster to read
            found[role][base.lower()] = p
    roles = {}
    for role, by_base in found.items():
        if len(by_base) > 1:
            names = ", ".join(p.name for p in by_base.values())
            raise DataError(f"{folder}: more than one {role} file ({names}); keep one set per folder")
        roles[role] = next(iter(by_base.values()))
    return roles


def load_idx_arrays(files: dict[str, Path]):
    """(x_train, y_train, x_test, y_test) from found files; missing optional parts are None."""
    out = {}
    for split in ("train", "test"):
        img_path = files.get(f"{split}-images")
        lab_path = files.get(f"{split}-labels")
        if img_path is None:
            if lab_path is not None:
                raise DataError(f"{lab_path}: labels without a matching {split}-images file")
            out[split] = (None, None)
            continue
        x = images_from_idx(read_idx(img_path), img_path.name)
        y = None
        if lab_path is not None:
            y = labels_from_idx(read_idx(lab_path), lab_path.name, len(x), img_path.name)
        out[split] = (x, y)
    return out["train"][0], out["train"][1], out["test"][0], out["test"][1]


def load_idx_folder(folder, *, seed: int = 0, log=print) -> Dataset:
    folder = Path(folder)
    files = find_idx_files(folder)
    if "train-images" not in files:
        raise DataError(f"{folder}: no training images (train-images-idx3-ubyte[.gz]) among its IDX files")
    x_train, y_train, x_test, y_test = load_idx_arrays(files)
    if x_test is not None and x_test.shape[1:] != x_train.shape[1:]:
        raise DataError(
            f"{files['test-images']}: images are {x_test.shape[2:]}, training images are {x_train.shape[2:]}"
        )
    origin = f"IDX folder {folder}"
    if x_test is None:
        x_train, x_test, y_train, y_test = split_train_validation(x_train, y_train, seed, str(folder))
        origin += f" (no test files; 20% validation split, seed {seed})"
    log(f"data: {len(x_train)} training and {len(x_test)} test images from {origin}")
    return Dataset(folder.name, origin, x_train, x_test, y_train, y_test)
