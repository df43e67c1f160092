"""The command line end to end on small data: train, resume, predict, sample, evaluate, and errors."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from engine_helpers import striped_digits
from vaecore.backend import cupy_status

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "32", "--latent-dim", "4", "--batch-size", "16", "--backend", "numpy"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "bars.npz"
    np.savez(path, x_train=striped_digits(160, seed=1), x_test=striped_digits(40, seed=2))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    run = tmp_path_factory.mktemp("runs") / "vae"
    assert cli.main(["train", "--data", str(data), "--epochs", "2", "--limit", "128", "--out", str(run), *SMALL]) == 0
    return run


def test_train_writes_the_run_directory(trained, capsys):
    names = sorted(p.name for p in trained.iterdir())
    assert names == ["metrics.jsonl", "model.npz", "reconstructions_epoch001.png", "reconstructions_epoch002.png",
                     "samples_epoch001.png", "samples_epoch002.png"]
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert set(records[0]) == {"epoch", "train_loss", "val_loss", "recon_mse", "kl", "seconds", "samples_per_s"}
    assert all(np.isfinite(r["val_loss"]) and r["val_loss"] > 0 for r in records)


def test_train_prints_an_epoch_table(data, tmp_path, capsys):
    assert cli.main(["train", "--data", str(data), "--epochs", "1", "--limit", "64", "--out", str(tmp_path), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "epoch  train_loss   val_loss  recon_mse       kl  seconds  samples/s" in out
    assert "data: bars, 64 train / 40 validation images of 1x8x8" in out
    assert f"wrote {tmp_path / 'model.npz'}" in out


def test_resume_continues_exactly(data, trained, tmp_path):
    run = tmp_path / "run"
    common = ["train", "--data", str(data), "--limit", "128", "--out", str(run), *SMALL]
    assert cli.main([*common, "--epochs", "1"]) == 0
    assert cli.main(["train", "--resume", "--epochs", "2", "--out", str(run), "--backend", "numpy"]) == 0
    resumed = np.load(run / "model.npz")["params"]
    straight = np.load(trained / "model.npz")["params"]
    np.testing.assert_array_equal(resumed, straight)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_predict_writes_side_by_side_and_prints_mse(trained, tmp_path, capsys):
    drawing = np.full((50, 50), 255, dtype=np.uint8)
    drawing[10:40, 22:28] = 0
    Image.fromarray(drawing).save(tmp_path / "mine.png")
    assert cli.main(["predict", str(tmp_path / "mine.png"), "--checkpoint", str(trained / "model.npz"),
                     "--backend", "numpy", "--out", str(tmp_path / "pred"), "--scale", "4"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    target = tmp_path / "pred" / "mine_reconstruction.png"
    assert line.startswith(str(target)) and "mse 0." in line
    assert Image.open(target).size == ((2 + 2 * 10) * 4, (2 + 10) * 4)   # two 8x8 images side by side, padded


def test_sample_writes_a_grid(trained, tmp_path, capsys):
    assert cli.main(["sample", "--n", "9", "--checkpoint", str(trained / "model.npz"), "--backend", "numpy",
                     "--out", str(tmp_path / "s.png"), "--scale", "1"]) == 0
    assert Image.open(tmp_path / "s.png").size == (2 + 3 * 10, 2 + 3 * 10)


def test_evaluate_json(trained, data, capsys):
    assert cli.main(["evaluate", "--checkpoint", str(trained / "model.npz"), "--data", str(data),
                     "--backend", "numpy", "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1                       # nothing but the JSON line on stdout
    result = json.loads(out)
    assert result["n"] == 40 and set(result) == {"test_loss", "recon_mse", "kl", "active_units", "nll_is",
                                                 "iw_samples", "n"}
    assert 0 < result["recon_mse"] < 1 and result["kl"] >= 0
    assert result["iw_samples"] == 1000 and 0 < result["nll_is"] < result["test_loss"]
    assert 0 <= result["active_units"] <= 4


def test_evaluate_text_binarized_and_without_importance_sampling(trained, data, capsys):
    assert cli.main(["evaluate", "--checkpoint", str(trained / "model.npz"), "--data", str(data),
                     "--backend", "numpy", "--iw-samples", "0", "--binarize"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "test split (binarized), 40 images: negative ELBO" in line and "active units" in line
    assert "importance sampled" not in line


def test_train_variants_run_and_are_recorded(data, tmp_path, capsys):
    from vaecore import checkpoint

    run = tmp_path / "iwae"
    assert cli.main(["train", "--data", str(data), "--epochs", "1", "--limit", "64", "--out", str(run),
                     "--iw-samples", "3", "--binarize", *SMALL]) == 0
    assert "IWAE bound with K=3, binarized" in capsys.readouterr().out
    config = checkpoint.load(run / "model.npz").train_config
    assert config.iw_samples == 3 and config.binarize
    run = tmp_path / "beta"
    assert cli.main(["train", "--data", str(data), "--epochs", "2", "--limit", "64", "--out", str(run),
                     "--beta", "4", "--kl-warmup", "2", "--activation", "tanh", *SMALL]) == 0
    assert "tanh, beta 4, KL warm-up over 2 epochs" in capsys.readouterr().out
    assert checkpoint.load(run / "model.npz").train_config.beta == 4.0


def test_interpolate_and_traverse_write_pictures(trained, tmp_path, capsys):
    for name, seed in (("a", 1), ("b", 2)):
        Image.fromarray(striped_digits(1, seed=seed)[0, 0]).save(tmp_path / f"{name}.png")
    assert cli.main(["interpolate", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--steps", "5",
                     "--checkpoint", str(trained / "model.npz"), "--backend", "numpy", "--scale", "1",
                     "--out", str(tmp_path / "line.png")]) == 0
    assert Image.open(tmp_path / "line.png").size == (2 + 7 * 10, 2 + 10)        # A, 5 steps, B
    assert f"wrote {tmp_path / 'line.png'}" in capsys.readouterr().out
    assert cli.main(["traverse", "--dims", "0,3", "--steps", "4", "--checkpoint", str(trained / "model.npz"),
                     "--backend", "numpy", "--scale", "1", "--out", str(tmp_path / "t.png")]) == 0
    assert Image.open(tmp_path / "t.png").size == (2 + 4 * 10, 2 + 2 * 10)
    assert cli.main(["traverse", "--dims", "4", "--checkpoint", str(trained / "model.npz"),
                     "--backend", "numpy", "--out", str(tmp_path / "t.png")]) == 1
    assert "latent dimension 4 does not exist" in capsys.readouterr().err


def test_plot_writes_curves_and_the_latent_scatter(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    labelled = tmp_path / "labelled.npz"
    x = striped_digits(40, seed=2)
    np.savez(labelled, x_train=x, x_test=x, y_train=np.arange(40) % 2, y_test=np.arange(40) % 2)
    assert cli.main(["plot", str(trained), "--data", str(labelled), "--backend", "numpy",
                     "--out", str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["latent_scatter.png", "loss_curves.png"]
    assert cli.main(["plot", str(tmp_path), "--curves-only"]) == 1
    assert "metrics.jsonl: no such file" in capsys.readouterr().err


def test_checkpoint_from_numpy_loads_under_array_api_strict(trained):
    from vaecore import inference
    from vaecore.backend import make_backend
    from vaecore.train import load_model

    images = striped_digits(5, seed=3)
    results = []
    for name in ("numpy", "array_api_strict"):
        model, _ = load_model(trained / "model.npz", make_backend(name))
        results.append(inference.reconstruct(model, images))
    assert np.abs(results[0].astype(int) - results[1].astype(int)).max() <= 1


def run_cli(*args):
    """``python cli.py ARGS`` from an empty folder, so the default ``runs/vae`` is nobody's real run."""
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                              cwd=cwd, timeout=120)


@pytest.mark.parametrize("args, code, message", [
    (["predict", "nowhere.png", "--checkpoint", "nowhere/model.npz"], 1, "no such checkpoint"),
    pytest.param(["train", "--backend", "cupy", "--limit", "10"], 1, "--backend cupy",
                 marks=pytest.mark.skipif(cupy_status()[0], reason="a GPU answers here, so --backend cupy is no error")),
    (["train", "--batch-size", "0"], 2, "--batch-size"),
    (["train", "--iw-samples", "5", "--beta", "2", "--limit", "10"], 1, "drop --beta and --kl-warmup"),
    (["train", "--lr", "-1"], 2, "--lr"),
    (["train", "--latent-dim", "0"], 2, "--latent-dim"),
    (["train", "--backend", "tpu"], 2, "--backend"),
    (["train", "--hidden", "400,x"], 2, "--hidden"),
])
def test_bad_input_is_one_line_and_nonzero(args, code, message):
    result = run_cli(*args)
    assert result.returncode == code
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_a_warning_is_one_line(monkeypatch, capsys):
    import warnings

    monkeypatch.setitem(cli.COMMANDS, "info", lambda args: warnings.warn("CUDA graphs are off", RuntimeWarning))
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().err == "warning: CUDA graphs are off\n"


def test_predict_on_a_text_file_is_one_line(trained, tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    result = run_cli("predict", str(tmp_path / "notes.png"), "--checkpoint", str(trained / "model.npz"),
                     "--backend", "numpy")
    assert result.returncode == 1 and "not an image" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_resume_refuses_changed_settings(trained):
    result = run_cli("train", "--resume", "--lr", "0.1", "--out", str(trained))
    assert result.returncode == 1 and "drop --lr" in result.stderr


def test_unwritable_output_folder_is_one_line(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("train", "--data", str(data), "--epochs", "1", "--out", str(blocker / "run"), *SMALL)
    assert result.returncode == 1 and "cannot write" in result.stderr
    assert "Traceback" not in result.stderr


def test_divergence_keeps_the_last_good_checkpoint(data, trained, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.npz").write_bytes((trained / "model.npz").read_bytes())
    before = (run / "model.npz").read_bytes()
    result = run_cli("train", "--data", str(data), "--epochs", "1", "--lr", "1e30", "--out", str(run),
                     "--overwrite", *SMALL)
    assert result.returncode == 1
    assert "diverged at epoch 1, step" in result.stderr and "--lr" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (run / "model.npz").read_bytes() == before


def test_a_new_run_never_replaces_a_model_silently(data, trained):
    before = (trained / "model.npz").read_bytes()
    result = run_cli("train", "--data", str(data), "--epochs", "1", "--out", str(trained), *SMALL)
    assert result.returncode == 1 and "--resume" in result.stderr and "--overwrite" in result.stderr
    assert (trained / "model.npz").read_bytes() == before


def test_bench_prints_a_table_for_one_configuration():
    result = run_cli("bench", "--configs", "seed-b4", "--seconds", "0.2")
    assert result.returncode == 0, result.stderr
    assert "seed-b4" in result.stdout and "ours" in result.stdout


def test_bench_refuses_an_unknown_configuration():
    result = run_cli("bench", "--configs", "huge-b9")
    assert result.returncode == 2 and "huge-b9" in result.stderr


def test_an_image_folder_run_resumes_and_evaluates_at_its_own_size(tmp_path):
    """--image-size and --channels are given once, to train; the model remembers them."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "pictures" / label).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "pictures" / label / f"{i}.png")
    run = tmp_path / "run"
    common = ["--out", str(run), "--backend", "numpy"]
    assert cli.main(["train", "--data", str(tmp_path / "pictures"), "--image-size", "12", "--channels", "3",
                     "--epochs", "1", "--batch-size", "8", "--hidden", "16", "--latent-dim", "2", *common]) == 0
    assert cli.main(["train", "--resume", "--epochs", "2", *common]) == 0
    assert cli.main(["evaluate", "--checkpoint", str(run / "model.npz"), "--iw-samples", "5",
                     "--backend", "numpy", "--json"]) == 0
    from vaecore import checkpoint
    assert checkpoint.load(run / "model.npz").epoch == 2
