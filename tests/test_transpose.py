"""The register-block transpose (kernels/transpose.py) against NumPy's ``.T``, bit for bit."""

import numpy as np
import pytest

from kernels.transpose import transpose_into_columns_serial


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (1, 1), (7, 9), (8, 8), (9, 17), (16, 1024), (200, 784),
                                   (128, 784), (23, 64)])
@pytest.mark.parametrize("col", [0, 3])
def test_transpose_writes_exactly_its_columns(shape, col):
    rng = np.random.default_rng(sum(shape) + col)
    src = rng.standard_normal(shape, np.float32)
    n, m = shape
    dst = np.full((m, col + n + 2), 7.0, np.float32)
    transpose_into_columns_serial(src, dst, col)
    np.testing.assert_array_equal(dst[:, col:col + n], src.T)
    assert (dst[:, :col] == 7.0).all() and (dst[:, col + n:] == 7.0).all()


def test_transpose_keeps_every_bit():
    """NaN payloads, signed zeros, subnormals and infinities move unchanged (no arithmetic touches them)."""
    bits = np.random.default_rng(1).integers(0, 2**32, size=(24, 40), dtype=np.uint64).astype(np.uint32)
    src = bits.view(np.float32)
    dst = np.empty((40, 24), np.float32)
    transpose_into_columns_serial(src, dst, 0)
    np.testing.assert_array_equal(dst.view(np.uint32), bits.T)
