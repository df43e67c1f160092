"""The one shape every data source is turned into, and what can be done with it without knowing the source.

Images stay uint8 ``(N, C, H, W)`` on the host: a quarter of the memory of float32, exact, and the
engine converts one batch at a time to float32 in [0, 1] on its backend. Labels are optional because
a VAE does not need them; they only colour plots and summaries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import DataError


@dataclass
class Dataset:
    name: str  # "mnist", "fashion-mnist", or the folder / file name
    origin: str  # where it came from, one line
    x_train: np.ndarray  # uint8 (N, C, H, W), C-contiguous
    x_test: np.ndarray  # uint8 (M, C, H, W): the test split, or a seeded 20% validation split
    y_train: np.ndarray | None = None  # int64 (N,)
    y_test: np.ndarray | None = None  # int64 (M,)
    classes: tuple[str, ...] | None = None  # label i is classes[i], when the source names them

    def __post_init__(self):
        # Checked here so that no loader can hand the engine something it would misread later.
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(f"{self.name}: x_{split} must be a uint8 array of shape (N, C, H, W)")
            setattr(self, f"x_{split}", np.ascontiguousarray(x))
            if y is not None:
                if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (len(x),):
                    raise DataError(f"{self.name}: y_{split} must be int64 of shape ({len(x)},)")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train images are {_shape_text(self.x_train.shape[1:])} "
                f"but test images are {_shape_text(self.x_test.shape[1:])}"
            )
        if len(self.x_train) == 0:
            raise DataError(f"{self.name}: no training images")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def take(self, n: int) -> Dataset:
        """The first ``n`` training images; the test split stays whole so evaluations stay comparable."""
        if n < 1:
            raise DataError(f"{self.name}: cannot take {n} training images; the limit must be at least 1")
        y = None if self.y_train is None else self.y_train[:n]
        return replace(self, x_train=self.x_train[:n], y_train=y)


def split_train_validation(x, y, seed: int, source: str, fraction: float = 0.2):
    """Seeded random split for sources that have no test split of their own.

    The training part keeps the shuffled order, so ``take(n)`` on a folder sorted by class still
    gets a mix of classes rather than the first class only.
    """
    n = len(x)
    if n < 2:
        raise DataError(f"{source}: need at least 2 images to split off a validation set, found {n}")
    n_val = min(max(1, round(n * fraction)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    train, val = order[n_val:], order[:n_val]
    y_train = None if y is None else y[train]
    y_val = None if y is None else y[val]
    return np.ascontiguousarray(x[train]), np.ascontiguousarray(x[val]), y_train, y_val


def describe(ds: Dataset) -> str:
    """A summary a person can check at a glance: right images, right count, plausible brightness."""
    lines = [f"name:    {ds.name}", f"origin:  {ds.origin}"]
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        mean = float(x.mean(dtype=np.float64)) / 255.0 if x.size else float("nan")
        lines.append(f"{split + ':':8} {len(x)} images of {_shape_text(x.shape[1:])}, {x.dtype}, pixel mean {mean:.4f}")
        lines.append(f"         labels: {_label_summary(y, ds.classes)}")
    return "\n".join(lines)


def _shape_text(shape) -> str:
    return " x ".join(str(d) for d in shape) + " (C x H x W)"


def _label_summary(y, classes, limit: int = 20) -> str:
    if y is None:
        return "none"
    if classes is not None and (len(y) == 0 or y.max() < len(classes)):
        values, counts = np.arange(len(classes)), np.bincount(y, minlength=len(classes))
    else:
        values, counts = np.unique(y, return_counts=True)
    parts = []
    for v, c in zip(values[:limit], counts[:limit]):
        named = classes is not None and v < len(classes) and classes[v] != str(v)
        parts.append(f"{v} {classes[v]}: {c}" if named else f"{v}: {c}")
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return f"{len(values)} class{'es' if len(values) != 1 else ''}; " + ", ".join(parts) + more
