"""Interruptions lose nothing: a signal saves the last completed step, and resuming is exact;
a process killed while writing leaves the previous file intact."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine_helpers import striped_digits
from vaecore import checkpoint

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--hidden", "256", "--latent-dim", "4", "--batch-size", "2", "--backend", "numpy", "--seed", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "bars.npz"
    np.savez(path, x_train=striped_digits(12000, size=16, seed=1), x_test=striped_digits(50, size=16, seed=2))
    return path


def cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-u", str(ROOT / "cli.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def finish(process):
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_and_resume_matches_an_uninterrupted_run(data, tmp_path, signum, code):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    common = ["train", "--data", str(data), "--epochs", "3", *SETTINGS]
    assert finish(cli(*common, "--out", str(straight)))[0] == 0

    process = cli(*common, "--out", str(interrupted))
    for line in process.stdout:                   # wait for epoch 1's row, then interrupt epoch 2
        if line.split()[:1] == ["1"]:
            break
    time.sleep(0.1)                               # into epoch 2 (each epoch is 6,000 steps)
    process.send_signal(signum)
    rc, _, err = finish(process)
    assert rc == code, err
    match = re.search(r"interrupted at epoch (\d), step (\d+); saved (\S+), continue with --resume", err)
    assert match and match[3] == str(interrupted / "model.npz"), err
    saved = checkpoint.load(interrupted / "model.npz")            # a mid-epoch checkpoint
    assert saved.epoch == int(match[1]) - 1 and saved.epoch_state.step == int(match[2]) > 0

    rc, out, err = finish(cli("train", "--resume", "--out", str(interrupted), "--backend", "numpy"))
    assert rc == 0, err
    assert f"resuming {interrupted / 'model.npz'} at epoch {match[1]}, step {match[2]}" in out
    np.testing.assert_array_equal(np.load(interrupted / "model.npz")["params"],
                                  np.load(straight / "model.npz")["params"])
    losses = [[json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (straight, interrupted)]
    assert losses[0] == losses[1]


KILL_WHILE_SAVING = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_training import make_trainer
from vaecore import checkpoint
from vaecore.config import ModelConfig
trainer = make_trainer("numpy", model_config=ModelConfig(image_shape=(1, 8, 8), hidden=(2048, 2048), latent_dim=4))
print("ready", flush=True)
epoch = 1
while True:
    trainer.model.params[0] = epoch
    checkpoint.save({path!r}, trainer.model, trainer.optimizer, trainer.config, epoch)
    epoch += 1
"""


def test_killing_the_process_mid_write_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "model.npz"
    script = KILL_WHILE_SAVING.format(tests=str(Path(__file__).parent), path=str(path))
    rng = np.random.default_rng(0)
    for attempt in range(4):
        process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        while not path.exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.5))
        process.kill()                            # SIGKILL: no handler, no cleanup
        process.wait()
        saved = checkpoint.load(path)             # whichever version is there is complete
        assert saved.arrays["params"][0] == saved.epoch
