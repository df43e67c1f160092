"""The CPU step replayed from its recorded kernel launches is the eager step, bit for bit, and a step
whose launches are not all of its work is never replayed."""

import dataclasses
import threading

import numpy as np
import pytest

from engine_helpers import striped_digits
from kernels import blas_pool, cpu
from vaecore.backend import make_backend
from vaecore.cpu_replay import _unreplayable
from vaecore.config import ModelConfig, TrainConfig
from vaecore.model import VAE
from vaecore.optim import Adam
from vaecore.train import Trainer

# a 784-400-400 / 200-400-784 network like seed-b4's takes each kernel's parallel way at a batch of 4;
# the small layers of this one take the serial kernels (linear_act as matmul and bias_act): both recorded
SEED_LIKE = ModelConfig(image_shape=(1, 28, 28), hidden=(400,), latent_dim=200)
SMALL = ModelConfig(image_shape=(1, 8, 8), hidden=(32,), latent_dim=4)


@pytest.fixture(autouse=True)
def fused_updates(monkeypatch):
    """A step is replayed where each layer is updated in the backward pass, which the CPU table does on
    a fast Numba pool (two or more threads, kernels/config.py). Its kernels are as right on one thread,
    so these tests take that way on any machine."""
    monkeypatch.setattr(cpu, "_pool_is_fast", lambda: True)


def trainers(model_config, size, lr=1e-3, **train):
    """Two trainers from the same start: one replays its steps, one runs them eagerly."""
    made = []
    for replay in (True, False):
        backend = make_backend("numpy", seed=0)
        model = VAE(model_config, backend, init_seed=0)
        data = striped_digits(64, size=size)
        made.append(Trainer(model, Adam(backend, model.n_params, lr=lr), TrainConfig(batch_size=4, lr=lr, **train),
                            data, data[:8], cpu_replay=replay))
    return made


def same_state(a, b):
    assert a.optimizer.t == b.optimizer.t
    for name in ("params", "m", "v"):
        owner_a, owner_b = (a.model, b.model) if name == "params" else (a.optimizer, b.optimizer)
        np.testing.assert_array_equal(getattr(owner_a, name), getattr(owner_b, name), err_msg=name)


def step_both(replayed, eager, batch, kl_weight):
    got, want = replayed.train_step(batch, kl_weight), eager.train_step(batch, kl_weight)
    assert got == want                                   # rec, kl and the gradient norm, exactly


@pytest.mark.parametrize("model_config, size", [(SEED_LIKE, 28), (SMALL, 8)])
def test_replayed_steps_are_the_eager_steps_bit_for_bit(model_config, size):
    """With the KL weight changing every step (a warm-up) and batches taking turns: 4, 3 and 1 in the
    CPU's own small-batch kernels, 24 in products split over one-thread OpenBLAS calls."""
    replayed, eager = trainers(model_config, size)
    assert eager.replayed_step is None
    rng = np.random.default_rng(1)
    for step in range(16):
        n = (4, 3, 1, 24)[step % 4]
        batch = np.ascontiguousarray(replayed.x_train[rng.choice(64, n, replace=False)])
        step_both(replayed, eager, batch, kl_weight=step / 16)
    same_state(replayed, eager)
    stepper = replayed.replayed_step
    assert all(stepper.replays(n) for n in (1, 3, 4)) and set(stepper.refused) <= {24}
    # without a split (an OpenBLAS that cannot lend its threads) batch 24 takes the plain eager step; with
    # one, a layer the split would cut otherwise (the seed-like decoder's first, on two threads) takes
    # plain products that NumPy makes, and its batch size is refused
    if blas_pool.splitter() is None:
        assert not stepper.replays(24) and not stepper.refused
    else:
        refused = stepper.refused == {24: "layer_backward_adam does work here that is not one of its launches"}
        assert stepper.replays(24) != refused                 # the one or the other
        assert model_config is SEED_LIKE or stepper.replays(24)


def test_a_change_to_adam_the_thread_or_the_table_records_again():
    """The launches hold Adam's settings, the recording thread's scratch buffers and the kernel table's
    functions."""
    replayed, eager = trainers(SMALL, 8)
    batch = replayed.x_train[:4].copy()
    for _ in range(3):
        step_both(replayed, eager, batch, 1.0)
    first = replayed.replayed_step._recorded[4]
    for trainer in (replayed, eager):
        trainer.optimizer.lr = 3e-4
    step_both(replayed, eager, batch, 1.0)
    second = replayed.replayed_step._recorded[4]
    assert second is not first

    worker = threading.Thread(target=step_both, args=(replayed, eager, batch, 1.0))
    worker.start()
    worker.join()
    third = replayed.replayed_step._recorded[4]
    assert third is not second
    step_both(replayed, eager, batch, 1.0)
    assert replayed.replayed_step._recorded[4] is not third          # back on this thread: again

    table, forwards = replayed.backend.kernels, []

    def linear_act(*args):
        forwards.append(args)
        return table.linear_act(*args)

    replayed.backend.kernels = dataclasses.replace(table, linear_act=linear_act)
    step_both(replayed, eager, batch, 1.0)              # recorded through the new table
    assert len(forwards) == len(replayed.model.layers)
    same_state(replayed, eager)


def test_a_step_that_is_not_all_launches_is_refused_and_runs_eagerly():
    """A Gaussian likelihood's wrapper turns its kernel's sum into the loss in Python: replaying the
    kernel alone would return the wrong sum. Its batch size takes the eager step from the first step on."""
    gaussian = ModelConfig(image_shape=(1, 8, 8), hidden=(32,), latent_dim=4, likelihood="gaussian")
    replayed, eager = trainers(gaussian, 8)
    batch = replayed.x_train[:4].copy()
    for _ in range(3):
        step_both(replayed, eager, batch, 1.0)
    assert replayed.replayed_step.refused == {4: "gaussian_nll_grad does work here that is not one of its launches"}
    assert not replayed.replayed_step.handles(4) and not replayed.replayed_step._recorded
    same_state(replayed, eager)


def test_a_number_where_a_knob_belongs_leaves_a_gap_in_the_recording():
    """A number goes through the thread's own knob, which the next call overwrites: a launch recorded
    with it would replay with whatever value came last, so the log says so instead."""
    rng = np.random.default_rng(0)
    stats = rng.standard_normal((2, 6), dtype=np.float32)
    eps, dz = rng.standard_normal((2, 3), dtype=np.float32), rng.standard_normal((2, 3), dtype=np.float32)
    out, knob = np.empty_like(stats), np.array([0.5])
    with cpu.recording() as log:
        cpu.reparameterize_kl_backward_cpu(stats, eps, dz, knob, out)
        cpu.reparameterize_kl_backward_cpu(stats, eps, dz, 0.5, out)
    (launch, _), gap, (second, _) = log
    assert launch.args[3] is knob and launch.whole == "reparameterize_kl_backward"
    assert gap == (None, "kl_weight was a number, not a knob") and second.args[3] is not knob
    expected = out.copy()
    knob[0] = 2.0                                       # a replay reads the knob as it is then
    cpu.replay(cpu.replayable([launch]), [None])
    cpu.reparameterize_kl_backward_cpu(stats, eps, dz, 2.0, expected)
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="kl_weight: expected a number or a float64 array of shape"):
        cpu.reparameterize_kl_backward_cpu(stats, eps, dz, np.array([0.5], np.float32), out)
    with cpu.recording(), pytest.raises(RuntimeError, match="already recording"):
        with cpu.recording():
            pass


def test_each_reason_a_recording_is_refused():
    """``calls`` as the noting table makes them: (name, [(Launch, result), ...] it logged, its result)."""
    def launch(whole):
        return cpu.Launch(print, (), False, None, whole)

    result = 1.5
    fine = [("linear_act", [(launch("linear_act"), None)], None),
            ("linear_act", [(launch("matmul"), None), (launch("bias_act"), None)], None),
            ("reparameterize_kl", [(launch("reparameterize_kl"), result)], result)]
    assert _unreplayable(fine, 4) is None
    assert _unreplayable(fine, 5) == "a launch outside the kernel table's calls"
    assert _unreplayable([("matmul", [], None)], 0) == "matmul does work here that is not one of its launches"
    assert (_unreplayable([("linear_act", [(launch("bias_act"), None)], None)], 1)
            == "linear_act does work here that is not one of its launches")
    assert (_unreplayable([("reparameterize_kl", [(launch("reparameterize_kl"), result)], -result)], 1)
            == "reparameterize_kl returns more than its launch's result")
    assert (_unreplayable([("layer_backward_adam", [(None, "step was a number, not a knob")], 0.0)], 1)
            == "layer_backward_adam: step was a number, not a knob")
