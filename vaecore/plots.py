"""Plots of a run: ``vaecore plot RUN``.

- ``loss_curves.png``: negative ELBO (train and validation), reconstruction MSE and KL per epoch,
  from the run's ``metrics.jsonl``;
- ``latent_scatter.png``: the test set's posterior means coloured by label (the two coordinates
  themselves when the latent space is 2-D, else its first two principal components);
- ``manifold.png``: the decoded 2-D latent manifold, when the latent space is 2-D.

Matplotlib draws the plots (through its Agg canvas on a ``Figure``, never pyplot's global state) and
is imported only here, only when a plot is made: ``import vaecore`` does not need it. The manifold
is an image grid, made with Pillow like the other pictures. Every file is written atomically.
"""

import json
import math
from pathlib import Path

import numpy as np

from . import images
from .errors import VaecoreError
from .fileio import atomic_path
from .inference import posterior_means
from .latent_pictures import MANIFOLD_STEPS, manifold_grid

METRIC_KEYS = ("epoch", "train_loss", "val_loss", "recon_mse", "kl")
SCATTER_POINTS = 5000        # at most this many test images in the scatter, so it stays readable


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise VaecoreError("plots need matplotlib: .venv/bin/pip install matplotlib "
                           "(or pip install 'vaecore[plot]')") from None
    return Figure


def read_metrics(path):
    """The records of ``metrics.jsonl``, in epoch order; a one-line VaecoreError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise VaecoreError(f"{path}: no such file (is this a run directory written by vaecore train?)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise VaecoreError(f"{path}: cannot read ({e})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise VaecoreError(f"{path}: line {number} is not JSON") from None
        missing = [k for k in METRIC_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise VaecoreError(f"{path}: line {number} has no {missing[0]!r}")
        try:
            records.append({k: float(record[k]) if record[k] is not None else math.nan for k in METRIC_KEYS})
        except (TypeError, ValueError):
            raise VaecoreError(f"{path}: line {number} holds a value that is not a number") from None
    if not records:
        raise VaecoreError(f"{path}: no epochs recorded yet")
    return sorted(records, key=lambda r: r["epoch"])


def _save(figure, path):
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return Path(path)


def loss_curves(records, path, title=""):
    """Three panels over epochs: negative ELBO (train and validation), reconstruction MSE, KL."""
    Figure = _figure_class()
    epochs = [r["epoch"] for r in records]
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    elbo, mse, kl = figure.subplots(1, 3)
    marker = "o" if len(epochs) < 30 else None
    elbo.plot(epochs, [r["train_loss"] for r in records], marker=marker, label="train")
    elbo.plot(epochs, [r["val_loss"] for r in records], marker=marker, label="validation")
    elbo.set_title("negative ELBO (nats per image)")
    elbo.legend()
    mse.plot(epochs, [r["recon_mse"] for r in records], marker=marker, color="tab:green")
    mse.set_title("reconstruction MSE (validation)")
    kl.plot(epochs, [r["kl"] for r in records], marker=marker, color="tab:red")
    kl.set_title("KL (nats per image, validation)")
    for axes in (elbo, mse, kl):
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def project_2d(means):
    """(N, Z) -> (N, 2) and the axis names: the coordinates themselves when Z <= 2 (padded with 0
    for Z = 1), else the first two principal components (SVD of the centred means)."""
    means = np.asarray(means, dtype=np.float64)
    z_dim = means.shape[1]
    if z_dim == 2:
        return means, ("z[0]", "z[1]")
    if z_dim == 1:
        return np.concatenate([means, np.zeros_like(means)], axis=1), ("z[0]", "")
    centred = means - means.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    share = singular ** 2 / max(float(np.sum(singular ** 2)), 1e-300)
    return centred @ vt[:2].T, tuple(f"PC{i + 1} ({100 * share[i]:.0f}% of variance)" for i in range(2))


def latent_scatter(means, labels, path, classes=None, title=""):
    """The posterior means (N, Z), projected to 2-D, one colour per label."""
    Figure = _figure_class()
    points, (x_name, y_name) = project_2d(means)
    labels = np.asarray(labels)
    if len(points) > SCATTER_POINTS:              # a fixed, even subsample keeps every class in view
        keep = np.random.default_rng(0).choice(len(points), SCATTER_POINTS, replace=False)
        points, labels = points[keep], labels[keep]
    figure = Figure(figsize=(7, 6), layout="constrained")
    axes = figure.subplots()
    values = np.unique(labels)
    colours = _colours(len(values))
    for colour, value in zip(colours, values):
        chosen = labels == value
        name = classes[value] if classes is not None and 0 <= value < len(classes) else str(value)
        axes.scatter(points[chosen, 0], points[chosen, 1], s=4, alpha=0.6, color=colour, label=name,
                     linewidths=0)
    axes.set_xlabel(x_name)
    axes.set_ylabel(y_name)
    axes.set_title(title or "posterior means of the test set")
    axes.legend(markerscale=3, fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _colours(n):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def plot_run(run_dir, model=None, dataset=None, out_dir=None, log=None):
    """Writes the plots of the run in ``run_dir`` into ``out_dir`` (default ``run_dir``); returns
    the written paths.

    ``loss_curves.png`` always; with ``model`` (the run's, see :func:`vaecore.train.load_model`) and a
    ``dataset`` whose test split has labels, ``latent_scatter.png``; with a 2-D latent model,
    ``manifold.png``. The scatter uses ``dataset.x_test`` as given (binarize it first for a
    binarized model if you like; the means barely change).
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    records = read_metrics(run_dir / "metrics.jsonl")
    written = [loss_curves(records, out_dir / "loss_curves.png", title=str(run_dir))]
    if model is not None and dataset is not None and getattr(dataset, "y_test", None) is not None \
            and len(dataset.x_test):
        means = posterior_means(model, dataset.x_test)
        written.append(latent_scatter(means, dataset.y_test, out_dir / "latent_scatter.png",
                                      classes=getattr(dataset, "classes", None),
                                      title=f"{getattr(dataset, 'name', 'test set')}: posterior means "
                                            f"of the test set"))
    elif log is not None and model is not None:
        log("no labelled test split: skipping latent_scatter.png")
    if model is not None and model.config.latent_dim == 2:
        picture = images.grid(manifold_grid(model, MANIFOLD_STEPS), ncols=MANIFOLD_STEPS, scale=2, pad=0)
        written.append(images.save_png(picture, out_dir / "manifold.png"))
    return written
