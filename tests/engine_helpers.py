"""Small models and data the engine tests share."""

import numpy as np

import kernels
from vaecore.backend import Backend
from vaecore.config import ModelConfig


def float64_backend(table=kernels.REFERENCE, seed=0):
    return Backend("numpy", np, table, dtype=np.float64, rng=np.random.default_rng(seed))


def tiny_config(**overrides):
    values = dict(image_shape=(1, 3, 4), hidden=(5,), latent_dim=3)
    values.update(overrides)
    return ModelConfig(**values)


def striped_digits(n, size=8, seed=0):
    """uint8 images (n, 1, size, size): one bright bar, horizontal or vertical, at a random place.

    Structured enough that a VAE's loss falls quickly, and made here rather than downloaded.
    """
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, size, size), dtype=np.uint8)
    for i in range(n):
        k = rng.integers(size)
        if rng.random() < 0.5:
            images[i, 0, k, :] = 255
        else:
            images[i, 0, :, k] = 255
    return images
