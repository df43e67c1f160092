"""The command line end to end on small data: train, resume, predict, sample, evaluate, and errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from engine_helpers import striped_digits

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
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 40 and set(result) == {"test_loss", "recon_mse", "kl", "n"}
    assert 0 < result["recon_mse"] < 1 and result["kl"] >= 0


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
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("args, code, message", [
    (["predict", "nowhere.png", "--checkpoint", "nowhere/model.npz"], 1, "no such checkpoint"),
    (["train", "--backend", "cupy", "--limit", "10"], 1, "--backend cupy"),
    (["train", "--batch-size", "0"], 2, "--batch-size"),
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
