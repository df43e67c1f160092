"""Pictures: latent interpolation and traversal, the manifold, and the plots of a run directory."""

import importlib.util
import json
import sys

import numpy as np
import pytest
from PIL import Image

from engine_helpers import striped_digits
from vaecore.backend import make_backend
from vaecore.config import ModelConfig
from vaecore.data import Dataset
from vaecore.errors import VaecoreError
from vaecore.latent_pictures import interpolation_strip, manifold_grid, manifold_latents, traversal_grid
from vaecore.model import VAE
from vaecore.plots import plot_run, project_2d, read_metrics

SHAPE = (1, 8, 8)
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (pip install 'vaecore[plot]')")


def model_with(latent_dim):
    return VAE(ModelConfig(image_shape=SHAPE, hidden=(16,), latent_dim=latent_dim), make_backend("numpy"),
               init_seed=0)


def write_metrics(run_dir, epochs=3):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"epoch": e, "train_loss": 50.0 / e, "val_loss": 52.0 / e, "recon_mse": 0.05 / e,
                         "kl": 5.0 + e, "seconds": 1.0, "samples_per_s": 100.0}) for e in range(1, epochs + 1)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def labelled(n=40, labels=True):
    x = striped_digits(n, seed=3)
    y = (np.arange(n) % 3).astype(np.int64) if labels else None
    return Dataset("bars", "test", x, x, y, y, classes=("zero", "one", "two") if labels else None)


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.width > 50 and picture.height > 50


# -- latent pictures ---------------------------------------------------------------------------------
def test_interpolation_strip_runs_between_the_two_reconstructions():
    from vaecore.inference import reconstruct

    model = model_with(3)
    a, b = striped_digits(2, seed=1)
    strip = interpolation_strip(model, a, b, steps=7)
    assert strip.shape == (7, *SHAPE) and strip.dtype == np.uint8
    np.testing.assert_array_equal(strip[[0, -1]], reconstruct(model, np.stack([a, b])))


def test_interpolation_needs_two_steps_and_model_shaped_images():
    model = model_with(3)
    a, b = striped_digits(2)
    with pytest.raises(VaecoreError, match="at least 2"):
        interpolation_strip(model, a, b, steps=1)
    with pytest.raises(VaecoreError, match="the model takes"):
        interpolation_strip(model, a[:, :4], b, steps=3)


def test_traversal_grid_has_one_row_per_dimension():
    model = model_with(4)
    grid = traversal_grid(model, [0, 2, 3], steps=5)
    assert grid.shape == (15, *SHAPE) and grid.dtype == np.uint8
    # the middle column of every row decodes the base latent (0) itself
    middle = grid.reshape(3, 5, *SHAPE)[:, 2]
    np.testing.assert_array_equal(middle[0], middle[1])
    base = np.full(4, 0.5, dtype=np.float32)
    assert not np.array_equal(traversal_grid(model, [1], steps=5, base=base), traversal_grid(model, [1], steps=5))


@pytest.mark.parametrize("dims, message", [([4], "does not exist"), ([], "no latent"), ([-1], "does not exist")])
def test_traversal_refuses_missing_dimensions(dims, message):
    with pytest.raises(VaecoreError, match=message):
        traversal_grid(model_with(4), dims)


def test_manifold_latents_follow_the_normal_quantiles():
    z = manifold_latents(4)
    assert z.shape == (16, 2)
    assert np.allclose(z[:4, 1], z[0, 1]) and z[0, 1] > 0 > z[-1, 1]    # top row: highest z_2
    assert np.allclose(z[0::4, 0], z[0, 0]) and z[0, 0] < 0 < z[3, 0]    # left column: lowest z_1
    np.testing.assert_allclose(z[:4, 0], -z[:4, 0][::-1], atol=1e-6)     # symmetric about 0


def test_manifold_needs_a_two_dimensional_latent_space():
    assert manifold_grid(model_with(2), steps=3).shape == (9, *SHAPE)
    with pytest.raises(VaecoreError, match="2-D latent"):
        manifold_grid(model_with(3))


# -- plots ----------------------------------------------------------------------------------------
@needs_matplotlib
def test_plot_run_without_a_model_draws_the_loss_curves(tmp_path):
    run = write_metrics(tmp_path / "run")
    written = plot_run(run)
    assert [p.name for p in written] == ["loss_curves.png"]
    assert_png(written[0])
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "no temporary file left behind"


@needs_matplotlib
def test_plot_run_with_labels_adds_a_pca_scatter(tmp_path):
    run = write_metrics(tmp_path / "run")
    written = plot_run(run, model=model_with(5), dataset=labelled(), out_dir=tmp_path / "plots")
    assert [p.name for p in written] == ["loss_curves.png", "latent_scatter.png"]
    assert all(p.parent == tmp_path / "plots" for p in written)
    for path in written:
        assert_png(path)


@needs_matplotlib
def test_plot_run_without_labels_skips_the_scatter(tmp_path):
    run = write_metrics(tmp_path / "run", epochs=1)
    messages = []
    written = plot_run(run, model=model_with(3), dataset=labelled(labels=False), log=messages.append)
    assert [p.name for p in written] == ["loss_curves.png"]
    assert "skipping latent_scatter.png" in messages[0]


@needs_matplotlib
def test_plot_run_with_two_latents_adds_the_manifold(tmp_path):
    run = write_metrics(tmp_path / "run")
    written = plot_run(run, model=model_with(2), dataset=labelled())
    assert [p.name for p in written] == ["loss_curves.png", "latent_scatter.png", "manifold.png"]
    for path in written:
        assert_png(path)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "no epochs recorded"),
    ("{not json\n", "line 1 is not JSON"),
    ('{"epoch": 1}\n', "line 1 has no 'train_loss'"),
    ('[1, 2]\n', "line 1 has no 'epoch'"),
])
def test_missing_or_corrupt_metrics_are_one_line_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(VaecoreError, match=message) as info:
        plot_run(tmp_path)
    assert "\n" not in str(info.value)


def test_metrics_are_read_in_epoch_order_with_null_as_nan(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"epoch": 2, "train_loss": 1, "val_loss": null, "recon_mse": 0.1, "kl": 3}\n'
        '{"epoch": 1, "train_loss": 2, "val_loss": 2, "recon_mse": 0.2, "kl": 2}\n')
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and np.isnan(records[1]["val_loss"])


def test_projection_keeps_two_dimensions_and_finds_the_main_axis():
    means = np.random.default_rng(0).standard_normal((200, 2))
    points, names = project_2d(means)
    np.testing.assert_array_equal(points, means)
    assert names == ("z[0]", "z[1]")
    stretched = np.random.default_rng(1).standard_normal((500, 6)) * np.array([0.1, 5.0, 0.1, 0.1, 2.0, 0.1])
    points, names = project_2d(stretched)
    assert points.shape == (500, 2) and names[0].startswith("PC1")
    assert np.var(points[:, 0]) > np.var(points[:, 1]) > 3.0     # the 5.0 and 2.0 axes come first


def test_importing_vaecore_never_needs_matplotlib():
    import subprocess

    code = ("import sys, vaecore, vaecore.plots, vaecore.evaluation, vaecore.iwae, vaecore.latent_pictures; "
            "sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_missing_matplotlib_is_a_one_line_error(tmp_path, monkeypatch):
    write_metrics(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)        # import now raises ImportError
    with pytest.raises(VaecoreError, match="plots need matplotlib"):
        plot_run(tmp_path)
