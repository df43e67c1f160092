"""The whole engine on a GPU: CuPy arrays with the CUDA kernels train as NumPy does, with the step
recorded as a CUDA graph or launched kernel by kernel; the array-API reference kernels run on CuPy
unchanged; a warm step takes no new device memory; a checkpoint written on the GPU loads on the CPU.
Skipped, saying why, unless CuPy reaches a CUDA device (the kernels themselves are compared with their
references in ``test_kernels_cuda_sim.py``)."""

from dataclasses import replace

import numpy as np
import pytest

from engine_helpers import striped_digits
from vaecore import checkpoint, cuda_graph, inference
from vaecore.backend import cupy_status, make_backend
from vaecore.config import ModelConfig, TrainConfig
from vaecore.model import VAE
from vaecore.optim import Adam
from vaecore.train import Trainer, load_model

USABLE, WHY = cupy_status()
pytestmark = pytest.mark.skipif(not USABLE, reason=WHY)

CONFIG = ModelConfig(image_shape=(1, 8, 8), hidden=(32,), latent_dim=4)
TRAIN = TrainConfig(batch_size=16, lr=3e-3)


def make_trainer(backend_name, kernel_table=None, config=TRAIN, cuda_graphs=True):
    backend = make_backend(backend_name, seed=config.seed, kernel_table=kernel_table)
    model = VAE(CONFIG, backend, init_seed=config.seed)
    optimizer = Adam(backend, model.n_params, lr=config.lr, clip_norm=config.clip_grad)
    data = striped_digits(128)
    return Trainer(model, optimizer, config, data, data[:32], cuda_graphs=cuda_graphs)


def assert_close_weights(a, b, steps, lr=TRAIN.lr):
    """Adam's first steps move each weight by about +-lr whatever the gradient's size, so a gradient
    within rounding of zero may take either sign in two runs; almost all weights must agree closely
    and none by more than that."""
    a, b = (t.backend.to_host(t.model.params) for t in (a, b))
    diff = np.abs(a - b)
    assert np.mean(diff <= 1e-5 + 1e-3 * np.abs(b)) > 0.999, diff.max()
    assert diff.max() <= 2 * lr * steps


def assert_same_training(gpu, cpu, epochs=3):
    """Epoch losses and validation loss to float32 rounding; the weights as ``assert_close_weights``."""
    for epoch in range(1, epochs + 1):
        assert gpu.train_epoch(epoch) == pytest.approx(cpu.train_epoch(epoch), rel=1e-4)
    assert gpu.evaluate(gpu.x_val, seed=0)["val_loss"] == pytest.approx(
        cpu.evaluate(cpu.x_val, seed=0)["val_loss"], rel=1e-4)
    assert_close_weights(gpu, cpu, epochs * len(cpu.x_train) // TRAIN.batch_size)


@pytest.mark.parametrize("graphs", [True, False], ids=["graph", "eager"])
def test_cuda_kernels_train_as_numpy_does(graphs):
    gpu = make_trainer("cupy", cuda_graphs=graphs)
    assert gpu.backend.kernels.name == "cuda"
    assert_same_training(gpu, make_trainer("numpy"))
    if graphs:
        assert gpu.graphed_step.disabled is None
        assert gpu.graphed_step._recorded[TRAIN.batch_size].graph is not None


def test_the_recorded_step_follows_the_eager_one_as_its_scalars_change():
    """Replays of the recorded step (one graph per batch size: 48, and 32 at an epoch's end) give the
    eager step's losses and gradient norms, step by step, with the KL weight and Adam's step count
    changing every step."""
    config = replace(TRAIN, batch_size=48)
    graphed, eager = make_trainer("cupy", config=config), make_trainer("cupy", config=config, cuda_graphs=False)
    assert eager.graphed_step is None
    order, start = np.random.default_rng(1).permutation(np.tile(np.arange(128), 4)), 0
    for step in range(10):
        size = 32 if step % 3 == 2 else 48
        batch, start = graphed.x_train[order[start:start + size]], start + size
        kl_weight = (step + 1) / 10
        got = [float(v) for v in graphed.train_step(batch, kl_weight)]
        want = [float(v) for v in eager.train_step(batch, kl_weight)]
        assert got == pytest.approx(want, rel=1e-4), step
    assert graphed.optimizer.t == eager.optimizer.t == 10
    recorded = graphed.graphed_step._recorded
    assert sorted(recorded) == [32, 48] and all(r.graph is not None for r in recorded.values())
    assert_close_weights(graphed, eager, 10)


def test_a_step_that_cannot_be_recorded_runs_eagerly_and_says_why(monkeypatch):
    def refuse(self, cupy, stream, step):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph._Recording, "record", refuse)
    refused, eager = make_trainer("cupy"), make_trainer("cupy", cuda_graphs=False)
    batch = refused.x_train[:TRAIN.batch_size]
    with pytest.warns(RuntimeWarning, match="CUDA graphs are off.*operation not permitted"):
        for _ in range(4):
            got = [float(v) for v in refused.train_step(batch)]
            assert got == pytest.approx([float(v) for v in eager.train_step(batch)], rel=1e-4)
    assert "operation not permitted" in refused.graphed_step.disabled
    assert_close_weights(refused, eager, 4)


def test_reference_kernels_run_on_cupy_unchanged():
    gpu = make_trainer("cupy", kernel_table="reference")
    assert_same_training(gpu, make_trainer("numpy", kernel_table="reference"))


@pytest.mark.parametrize("graphs, pool_sizes", [(True, []), (False, [8, 8, 8, 8, 16])], ids=["graph", "eager"])
def test_a_warm_step_takes_no_new_device_memory(graphs, pool_sizes):
    """No cudaMalloc once warm. A recorded step takes nothing from CuPy's pool either. Launched kernel by
    kernel, it takes five small blocks, pool hits: the 0-d results of the reconstruction and KL sums and
    Adam's [sum of squares, norm] (8, 8 and 16 bytes), and the KL weight and step count as the device
    scalars the kernels read (8 bytes each)."""
    import cupy

    class CountAllocations(cupy.cuda.MemoryHook):
        name = "count-allocations"

        def __init__(self):
            self.pool_sizes, self.device_allocations = [], 0

        def malloc_postprocess(self, **kwargs):
            self.pool_sizes.append(kwargs["size"])

        def alloc_postprocess(self, **kwargs):
            self.device_allocations += 1

    trainer = make_trainer("cupy", cuda_graphs=graphs)
    batch = trainer.x_train[:TRAIN.batch_size]
    for _ in range(3):
        trainer.train_step(batch)
    trainer.backend.synchronize()
    hook = CountAllocations()
    with hook:
        for _ in range(10):
            trainer.train_step(batch)
        trainer.backend.synchronize()
    assert hook.device_allocations == 0
    assert sorted(hook.pool_sizes) == sorted(pool_sizes * 10), hook.pool_sizes[:12]


def test_a_gpu_checkpoint_loads_on_the_cpu(tmp_path):
    gpu = make_trainer("cupy")
    gpu.train_epoch(1)
    checkpoint.save(tmp_path / "model.npz", gpu.model, gpu.optimizer, gpu.config, epoch=1)
    images = striped_digits(5, seed=3)
    on_gpu = inference.reconstruct(gpu.model, images)
    cpu_model, _ = load_model(tmp_path / "model.npz", make_backend("numpy"))
    on_cpu = inference.reconstruct(cpu_model, images)
    assert on_gpu.shape == on_cpu.shape == images.shape and on_gpu.dtype == np.uint8
    assert np.abs(on_gpu.astype(int) - on_cpu.astype(int)).max() <= 1
