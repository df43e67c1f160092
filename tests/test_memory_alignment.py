"""The engine's NumPy buffers start on cache lines (kernels/memory.py)."""

import numpy as np
import pytest

from kernels.memory import LINE, empty_aligned
from vaecore.backend import make_backend
from vaecore.config import ModelConfig
from vaecore.model import VAE


@pytest.mark.parametrize("shape", [0, 1, 7, (3, 5), (128, 784), (0, 4), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_empty_aligned_starts_on_a_line(shape, dtype):
    for _ in range(5):                         # NumPy's own buffers start anywhere 16 bytes apart
        a = empty_aligned(shape, dtype)
        expected = (shape,) if isinstance(shape, int) else shape
        assert a.shape == expected and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % LINE == 0 or a.size == 0


def test_zeroed_and_independent():
    a, b = empty_aligned((4, 9), zero=True), empty_aligned((4, 9), zero=True)
    assert not a.any()
    a[...] = 1.0
    assert not b.any() and a.sum() == 36


def test_the_numpy_engine_allocates_on_lines():
    backend = make_backend("numpy", seed=0)
    model = VAE(ModelConfig(latent_dim=3, hidden=(5,)), backend)
    ws = model.workspace(7)
    for a in (model.params, model.grads, ws.x, ws.eps, ws.z, *ws.acts, *ws.deltas):
        assert a.ctypes.data % LINE == 0
