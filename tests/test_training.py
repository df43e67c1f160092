"""Training lowers the loss, runs unchanged under array_api_strict, and resumes exactly."""

import numpy as np
import pytest

import kernels

from engine_helpers import striped_digits
from vaecore import checkpoint
from vaecore.backend import make_backend
from vaecore.config import ModelConfig, TrainConfig
from vaecore.errors import CheckpointError, VaecoreError
from vaecore.model import VAE
from vaecore.optim import Adam
from vaecore.train import Trainer, TrainingDiverged, restore

CONFIG = ModelConfig(image_shape=(1, 8, 8), hidden=(32,), latent_dim=4)


def make_trainer(backend_name, train_config=TrainConfig(batch_size=16, lr=3e-3), data=None, model_config=CONFIG):
    backend = make_backend(backend_name, seed=train_config.seed)
    model = VAE(model_config, backend, init_seed=train_config.seed)
    optimizer = Adam(backend, model.n_params, lr=train_config.lr, clip_norm=train_config.clip_grad)
    data = striped_digits(128) if data is None else data
    return Trainer(model, optimizer, train_config, data, data[:32])


def test_a_few_hundred_steps_lower_the_loss():
    trainer = make_trainer("numpy")
    before = trainer.evaluate(trainer.x_val, seed=0)["val_loss"]
    losses = [trainer.train_epoch(epoch) for epoch in range(1, 41)]     # 40 epochs x 8 steps
    after = trainer.evaluate(trainer.x_val, seed=0)["val_loss"]
    assert after < 0.6 * before, (before, after)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_train_step_runs_on_array_api_strict_device_and_matches_numpy():
    """A non-default array_api_strict device raises on any silent conversion to NumPy."""
    strict = make_trainer("array_api_strict")
    reference = make_trainer("numpy")
    reference.backend.kernels = strict.backend.kernels   # same (reference) kernels on both
    for epoch in (1, 2):
        assert strict.train_epoch(epoch) == pytest.approx(reference.train_epoch(epoch), rel=1e-5)
    assert str(strict.model.params.device) != "CPU_DEVICE"
    np.testing.assert_allclose(strict.backend.to_host(strict.model.params), reference.model.params,
                               rtol=1e-4, atol=1e-6)
    assert strict.evaluate(strict.x_val, seed=0)["val_loss"] == pytest.approx(
        reference.evaluate(reference.x_val, seed=0)["val_loss"], rel=1e-5)


def test_array_api_strict_device_refuses_silent_numpy_conversion():
    """The guard the previous test relies on is real: on device1, np.asarray raises."""
    backend = make_backend("array_api_strict")
    with pytest.raises(RuntimeError):
        np.asarray(backend.zeros((2, 2)))


@pytest.mark.parametrize("variant", [{}, {"binarize": True, "beta": 2.0, "kl_warmup": 2},
                                     {"binarize": True, "iw_samples": 3}])
def test_resume_gives_identical_weights(tmp_path, variant):
    config = TrainConfig(batch_size=16, lr=3e-3, **variant)
    straight = make_trainer("numpy", config)
    for epoch in (1, 2, 3):
        straight.train_epoch(epoch)

    first = make_trainer("numpy", config)
    first.train_epoch(1)
    checkpoint.save(tmp_path / "model.npz", first.model, first.optimizer, first.config, epoch=1)
    resumed = make_trainer("numpy", config)
    restore(resumed.model, resumed.optimizer, checkpoint.load(tmp_path / "model.npz"))
    for epoch in (2, 3):
        resumed.train_epoch(epoch)
    np.testing.assert_array_equal(resumed.model.params, straight.model.params)


def test_divergence_is_reported_with_epoch_and_step():
    data = striped_digits(64)
    trainer = make_trainer("numpy", TrainConfig(batch_size=16, lr=1e-3), data)
    trainer.model.params[:10] = np.nan
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1: .*NaN.*--lr"):
        trainer.train_epoch(1)


def test_data_smaller_than_one_batch_is_refused():
    with pytest.raises(VaecoreError, match="fewer than one batch"):
        make_trainer("numpy", TrainConfig(batch_size=64), striped_digits(10))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "version"])
def test_damaged_checkpoint_is_a_one_line_error(tmp_path, damage):
    trainer = make_trainer("numpy")
    path = checkpoint.save(tmp_path / "model.npz", trainer.model, trainer.optimizer, trainer.config, epoch=1)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a zip at all")
    elif damage == "foreign":
        np.savez(path, weights=np.zeros(3))
    else:
        import json
        with np.load(path) as npz:
            contents = {k: npz[k] for k in npz.files}
        meta = json.loads(str(contents["meta"][()]))
        meta["version"] = 99
        contents["meta"] = np.array(json.dumps(meta))
        np.savez(path, **contents)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_checkpoint_round_trip_keeps_configs_and_arrays(tmp_path):
    trainer = make_trainer("numpy", TrainConfig(batch_size=16, lr=2e-3, seed=7))
    trainer.train_epoch(1)
    path = checkpoint.save(tmp_path / "model.npz", trainer.model, trainer.optimizer, trainer.config, epoch=1)
    loaded = checkpoint.load(path)
    assert loaded.model_config == CONFIG and loaded.train_config == trainer.config
    assert loaded.epoch == 1 and loaded.adam_step == trainer.optimizer.t == 8
    np.testing.assert_array_equal(loaded.arrays["params"], trainer.model.params)
    np.testing.assert_array_equal(loaded.arrays["adam_v"], trainer.optimizer.v)


@pytest.mark.parametrize("batch_size", [4, 16])
def test_cpu_kernels_train_as_the_reference_kernels(batch_size):
    """Batch 4 runs every matmul in the small-batch kernels (and Adam on every core once BLAS rests);
    batch 16 goes through BLAS. Either way two epochs land where the reference kernels do."""
    config = TrainConfig(batch_size=batch_size, lr=3e-3)
    fast, reference = make_trainer("numpy", config), make_trainer("numpy", config)
    reference.backend.kernels = kernels.REFERENCE
    for epoch in (1, 2):
        assert fast.train_epoch(epoch) == pytest.approx(reference.train_epoch(epoch), rel=1e-4)
    np.testing.assert_allclose(fast.model.params, reference.model.params, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("batch_size", [4, 16])
def test_layer_by_layer_updates_train_as_one_adam_step_after_the_backward(batch_size):
    """The CPU table updates each layer inside the backward pass (at batch 4 in its small-batch kernels,
    at 16 in the BLAS split); with that switched off the same run takes the plain backward and one
    Adam call, and lands in the same place. Clipping needs every gradient first, so it never takes the
    layer-by-layer path."""
    import dataclasses

    from kernels import blas_pool, cpu
    from kernels.config import CPU_SMALL_BATCH

    config = TrainConfig(batch_size=batch_size, lr=3e-3)
    fused, plain = make_trainer("numpy", config), make_trainer("numpy", config)
    fast = cpu.parallel_threads() > 1 and (batch_size <= CPU_SMALL_BATCH or blas_pool.splitter() is not None)
    assert fused.backend.kernels.fuses_layer_adam(batch_size) == fast
    plain.backend.kernels = dataclasses.replace(plain.backend.kernels, fuses_layer_adam=lambda batch_size: False)
    for epoch in (1, 2):
        assert fused.train_epoch(epoch) == pytest.approx(plain.train_epoch(epoch), rel=1e-5)
    assert fused.optimizer.t == plain.optimizer.t == 2 * 128 // batch_size
    np.testing.assert_allclose(fused.model.params, plain.model.params, rtol=1e-4, atol=1e-6)
    batch = fused.x_train[:batch_size].copy()
    assert fused.train_step(batch)[2] == pytest.approx(plain.train_step(batch)[2], rel=1e-4)
    assert make_trainer("numpy", TrainConfig(batch_size=4, clip_grad=1.0))._layer_updates is None


@pytest.mark.parametrize("batch_size,size,hidden", [(4, 8, 128), (16, 8, 128), (4, 28, 400)])
def test_warm_training_step_allocates_no_arrays(batch_size, size, hidden):
    """After the first step of a batch size, a step allocates nothing NumPy can see.

    tracemalloc traces NumPy's data allocations; a hidden activation buffer of these models is at
    least 4 x 128 x 4 = 2 KiB, so a peak below 1 KiB means no such array was made (Python's own small
    objects remain). The 784-400 model at batch 4 takes the parallel small-batch kernels, whose
    partial results live in buffers made on the first step.
    """
    import tracemalloc

    wider = ModelConfig(image_shape=(1, size, size), hidden=(hidden,), latent_dim=4)
    trainer = make_trainer("numpy", TrainConfig(batch_size=batch_size, lr=3e-3), model_config=wider,
                           data=striped_digits(128, size=size))
    assert trainer.backend.kernels.name == "cpu"      # the reference kernels allocate temporaries by design
    batch = trainer.x_train[:batch_size].copy()
    for _ in range(3):
        trainer.train_step(batch)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(5):
            trainer.train_step(batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before < 1024, f"a warm step allocated {peak - before} bytes"
