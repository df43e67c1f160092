"""Data sets for vaecore: every source becomes a :class:`Dataset` of uint8 ``(N, C, H, W)`` images.

Sources, chosen by :func:`load_dataset` from the one string a user types:
- ``mnist`` (the default) and ``fashion-mnist``: by name, cached, checksummed (:mod:`.mnist`);
- a folder of IDX files (:mod:`.idx_folder`); a folder of images (:mod:`.image_folder`);
- an ``.npz`` file (:mod:`.npz`).
A name wins over a folder of the same name; write ``./mnist`` for the folder.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .catalog import NAMED, named_dataset
from .dataset import Dataset, describe
from .idx_folder import load_idx_folder, looks_like_idx_folder
from .image_folder import load_image_folder
from .mnist import load_named
from .npz import load_npz

__all__ = ["Dataset", "load_dataset", "fetch", "describe"]


def load_dataset(source: str, *, seed: int = 0, image_size: int = 28, channels: int = 1,
                 skip_bad: bool = False, cache_dir: str | None = None, log=print) -> Dataset:
    """The data set ``source`` names. ``image_size``, ``channels`` and ``skip_bad`` apply to image
    folders only (other sources have one fixed shape); ``seed`` picks the validation split of sources
    without a test split; ``log`` receives one-line progress messages."""
    spec = named_dataset(source)
    if spec is not None:
        return load_named(spec, cache_dir=cache_dir, log=log)
    path = Path(source).expanduser()
    if path.is_dir():
        if looks_like_idx_folder(path):
            return load_idx_folder(path, seed=seed, log=log)
        return load_image_folder(path, seed=seed, image_size=image_size, channels=channels,
                                 skip_bad=skip_bad, log=log)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return load_npz(path, seed=seed, log=log)
        raise DataError(f"{path}: not a data set; expected a folder (IDX files or images) or an .npz file")
    raise DataError(f"{source}: no such file or folder, and not a known name ({', '.join(NAMED)})")


def fetch(name: str, *, cache_dir=None, log=print) -> Dataset:
    """Makes sure the named data set is in the cache (fetching it if needed) and returns it."""
    spec = named_dataset(name)
    if spec is None:
        raise DataError(f"{name}: not a data set that can be fetched by name (known: {', '.join(NAMED)})")
    return load_named(spec, cache_dir=cache_dir, log=log, require_cache=True)
