"""Our training step for a benchmark configuration: the engine's own ``Trainer.train_step``.

Nothing is re-implemented here: the step timed is exactly what ``vaecore train`` runs per batch --
uint8 pixels converted to float32 on the backend, noise drawn, forward, hand-written backward and the
fused Adam update over the flat parameter buffer.
"""

import numpy as np

from ..backend import make_backend
from ..config import TrainConfig
from ..model import VAE
from ..optim import Adam
from ..train import Trainer
from .configs import BETA1, BETA2, LR, BenchConfig, fixed_images


def make_trainer(config: BenchConfig, x_train, x_val=None, backend="numpy", seed=0, cuda_graphs=True):
    """A :class:`~vaecore.train.Trainer` of ``config``'s network (Adam as in every implementation) over
    uint8 images, on a fresh backend (``VaecoreError`` when cupy has no device). ``cuda_graphs=False``
    launches the CuPy step's kernels one by one (to compare)."""
    backend = make_backend(backend, seed=seed) if isinstance(backend, str) else backend
    model = VAE(config.model_config(), backend, init_seed=seed)
    optimizer = Adam(backend, model.n_params, lr=LR, beta1=BETA1, beta2=BETA2)
    train_config = TrainConfig(batch_size=config.batch, lr=LR, beta1=BETA1, beta2=BETA2, seed=seed)
    return Trainer(model, optimizer, train_config, x_train, x_train if x_val is None else x_val,
                   cuda_graphs=cuda_graphs)


class OurStep:
    """``step()`` runs one full training step on a fixed uint8 batch and waits for the device."""

    def __init__(self, config: BenchConfig, backend="numpy", seed=0, images=None, cuda_graphs=True):
        self.config = config
        self.images = fixed_images(config, seed) if images is None else np.ascontiguousarray(images, np.uint8)
        self.trainer = make_trainer(config, self.images, backend=backend, seed=seed, cuda_graphs=cuda_graphs)
        self.backend, self.model, self.optimizer = self.trainer.backend, self.trainer.model, self.trainer.optimizer
        self.name = f"ours-{self.backend.name}"
        self._batch = self.trainer.x_train                   # (B, D) uint8 on the host, like a gathered batch

    def step(self):
        rec, kl, grad_norm = self.trainer.train_step(self._batch)
        self.backend.synchronize()
        return rec, kl, grad_norm

    __call__ = step

    def describe(self):
        """What runs; after a step, whether it was recorded (a CUDA graph, or replayed CPU launches)."""
        trainer, how = self.trainer, ""
        if trainer.graphed_step is not None:
            how = ", the step as one CUDA graph"
        elif trainer.replayed_step is not None and trainer.replayed_step.replays(self.config.batch):
            how = ", the step's kernel launches recorded once and replayed"
        return f"vaecore {self.backend.describe()}{how}"


def threads_note():
    """How our step uses the cores (the policy is in ``kernels/config.py``)."""
    import numba

    import kernels.config
    from kernels import blas_pool
    from kernels.cpu import parallel_threads

    threads = kernels.config.cpu_threads()
    lent, how = blas_pool.status()
    blas = f"on OpenBLAS, {how}" if lent else f"on OpenBLAS's own threads ({how})"
    if parallel_threads() > 1:
        rest = f"on Numba's {threads} threads while OpenBLAS's own rest"
    else:
        rest = f"on one thread (Numba's pool: {threads} thread(s), {numba.threading_layer()} layer)"
    return (f"matmuls of more than {kernels.config.CPU_SMALL_BATCH} rows {blas}; smaller ones in Numba "
            f"kernels; Adam and those kernels {rest}")
