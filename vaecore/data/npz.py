"""``.npz`` files of a user's own arrays.

Reading is careful in the same way as IDX (:mod:`vaecore.npzread`): pickled objects are never loaded,
and each member's header is checked against the archive's own sizes before its data is allocated, so
a corrupt or hostile file is a one-line :class:`DataError`, not a huge allocation.

Accepted image arrays (``x_train``, ``x_test``), and how they are read:
- dtype ``uint8`` as is, or a float dtype with every value in [0, 1], scaled by 255 and rounded;
- shape ``(N, H, W)`` -> one channel; ``(N, C, H, W)`` with C in {1, 3}; ``(N, H, W, C)`` with
  C in {1, 3} (channels-first wins when both readings are possible); ``(N, D)`` with D a perfect
  square -> one channel of sqrt(D) x sqrt(D), as flattened MNIST is often stored.
Labels (``y_train``, ``y_test``) are optional integer vectors. Without ``x_test``, a seeded 80/20
split of ``x_train`` stands in for it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..npzread import read_npz_arrays
from .dataset import Dataset, split_train_validation


def load_npz(path, *, seed: int = 0, log=print) -> Dataset:
    path = Path(path)
    arrays = read_npz_arrays(path, DataError, ("x_train", "y_train", "x_test", "y_test"))
    if "x_train" not in arrays:
        found = ", ".join(arrays) or "none of x_train, y_train, x_test, y_test"
        raise DataError(f"{path}: no x_train array (found: {found})")
    x_train = images_from_array(arrays["x_train"], f"{path}: x_train")
    y_train = labels_from_array(arrays.get("y_train"), len(x_train), f"{path}: y_train")
    origin = f"file {path}"
    if "x_test" in arrays:
        x_test = images_from_array(arrays["x_test"], f"{path}: x_test")
        y_test = labels_from_array(arrays.get("y_test"), len(x_test), f"{path}: y_test")
        if x_test.shape[1:] != x_train.shape[1:]:
            raise DataError(
                f"{path}: x_test images are {x_test.shape[1:]} but x_train images are {x_train.shape[1:]} (C, H, W)"
            )
    else:
        if "y_test" in arrays:
            raise DataError(f"{path}: has y_test but no x_test")
        x_train, x_test, y_train, y_test = split_train_validation(x_train, y_train, seed, str(path))
        origin += f" (no x_test; 20% validation split, seed {seed})"
    log(f"data: {len(x_train)} training and {len(x_test)} test images from {origin}")
    return Dataset(path.stem, origin, x_train, x_test, y_train, y_test)


def images_from_array(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == np.uint8:
        pass
    elif x.dtype.kind == "f":
        if x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise DataError(f"{where}: float images must lie in [0, 1] (found values outside, or NaN/inf)")
        x = np.rint(x * 255).astype(np.uint8)
    else:
        raise DataError(f"{where}: dtype {x.dtype} not supported; use uint8 (0..255) or float in [0, 1]")
    x = _to_nchw(x, where)
    if len(x) == 0 or 0 in x.shape[2:]:
        raise DataError(f"{where}: holds no images (shape {x.shape})")
    return np.ascontiguousarray(x)


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 2:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1] or side == 0:
            raise DataError(f"{where}: flat images of {x.shape[1]} pixels are not square; store them as (N, H, W)")
        return x.reshape(len(x), 1, side, side)
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[3] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    raise DataError(
        f"{where}: shape {x.shape} not understood; expected (N, H, W), (N, C, H, W) or (N, H, W, C) with C of 1 or 3"
    )


def labels_from_array(y: np.ndarray | None, count: int, where: str) -> np.ndarray | None:
    if y is None:
        return None
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, found {y.dtype}")
    if y.shape != (count,):
        raise DataError(f"{where}: shape {y.shape} does not match {count} images")
    if count and y.min() < 0:
        raise DataError(f"{where}: negative labels")
    return y.astype(np.int64)
