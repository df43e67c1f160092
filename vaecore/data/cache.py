"""The local copy of a named data set: ``<cache>/<name>.npz``, where ``<cache>`` is ``$VAECORE_DATA``
or ``~/.cache/vaecore``.

One uncompressed ``.npz`` per data set (``x_train``, ``y_train``, ``x_test``, ``y_test`` and a
``source`` string saying where it was fetched from) loads in a fraction of a second, with no pickle.
It is written atomically, and only after its contents matched the published checksums; on load the
checksums are verified again (SHA-256 of 55 MB costs tens of milliseconds), so a cache that loads is
exactly the published data set. A cache that fails is reported, not silently replaced: vaecore never
writes a bad one, so a bad one means something else changed it, and the user should know.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..fileio import atomic_path
from ..npzread import read_npz_arrays
from .catalog import NamedDataset
from .idx import UBYTE, idx_sha256

KEYS = ("x_train", "y_train", "x_test", "y_test")


def default_cache_dir() -> Path:
    return Path(os.environ.get("VAECORE_DATA") or Path.home() / ".cache" / "vaecore").expanduser()


def cache_path(spec: NamedDataset, cache_dir=None) -> Path:
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return folder / f"{spec.name}.npz"


def checksum_mismatches(spec: NamedDataset, arrays: dict[str, np.ndarray]) -> list[str]:
    """Roles whose arrays differ from the published files (empty when all four match)."""
    bad = []
    for role, key in (("train-images", "x_train"), ("train-labels", "y_train"),
                      ("test-images", "x_test"), ("test-labels", "y_test")):
        array = arrays[key]
        if key.startswith("x"):
            array = array[:, 0]  # IDX images have no channel axis
        elif array.size and (array.min() < 0 or array.max() > 255):
            bad.append(role)
            continue
        if idx_sha256(array, UBYTE) != spec.file(role).raw_sha256:
            bad.append(role)
    return bad


def save_cache(path: Path, arrays: dict[str, np.ndarray], source: str):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: arrays[k] for k in KEYS}, source=np.array(source))
            f.flush()
            os.fsync(f.fileno())


def load_cache(spec: NamedDataset, path: Path):
    """(arrays, source) from a verified cache file, or None when there is none."""
    if not path.exists():
        return None
    arrays = read_npz_arrays(path, DataError, KEYS + ("source",))
    hint = "delete it to fetch the data set again"
    missing = [k for k in KEYS + ("source",) if k not in arrays]
    if missing:
        raise DataError(f"cache {path} is missing {', '.join(missing)}; {hint}")
    expect = {
        "x_train": (np.uint8, (spec.train_count, 1, 28, 28)), "y_train": (np.int64, (spec.train_count,)),
        "x_test": (np.uint8, (spec.test_count, 1, 28, 28)), "y_test": (np.int64, (spec.test_count,)),
    }
    for key, (dtype, shape) in expect.items():
        a = arrays[key]
        if a.dtype != dtype or a.shape != shape:
            raise DataError(f"cache {path}: {key} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} {shape}; {hint}")
    source = arrays["source"]
    if source.dtype.kind != "U" or source.ndim != 0:
        raise DataError(f"cache {path}: source entry is not a string; {hint}")
    bad = checksum_mismatches(spec, arrays)
    if bad:
        raise DataError(f"cache {path}: {', '.join(bad)} differ from the published {spec.name} checksums; {hint}")
    return {k: arrays[k] for k in KEYS}, str(source)
