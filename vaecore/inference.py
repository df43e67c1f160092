"""Using a trained model outside the training step: encode, reconstruct, decode, sample.

These functions take and return host NumPy arrays (uint8 images, float32 latents) and work in
chunks, so any number of images fits in bounded memory on either backend.
"""

import numpy as np

from .images import to_uint8

CHUNK = 1000


def _chunks(n):
    for start in range(0, n, CHUNK):
        yield start, min(n, start + CHUNK)


def posterior_means(model, images):
    """uint8 (N, C, H, W) -> the encoder's means, float32 (N, Z) on the host."""
    backend, z_dim = model.backend, model.config.latent_dim
    flat = images.reshape(len(images), -1)
    means = np.empty((len(images), z_dim), dtype=np.float32)
    for start, stop in _chunks(len(images)):
        ws = model.workspace(stop - start)
        backend.images_into(ws.x, flat[start:stop])
        model.encode(ws)
        means[start:stop] = backend.to_host(ws.stats[:, :z_dim])
    return means


def decode(model, latents):
    """float32 (N, Z) on the host -> the decoder's expected images, uint8 (N, C, H, W)."""
    backend = model.backend
    latents = np.asarray(latents, dtype=np.float32)
    out = np.empty((len(latents), *model.config.image_shape), dtype=np.uint8)
    for start, stop in _chunks(len(latents)):
        ws = model.workspace(stop - start)
        backend.copy_from_host(ws.z, latents[start:stop])
        model.decode(ws)
        out[start:stop] = to_uint8(backend.to_host(model.mean_image(ws.out)), model.config.image_shape)
    return out


def reconstruct(model, images):
    """Decodes each image's posterior mean: the model's deterministic reconstruction."""
    return decode(model, posterior_means(model, images))


def sample(model, n, seed=0):
    """``n`` images decoded from z ~ N(0, I), drawn with their own seed."""
    z = np.random.default_rng(seed).standard_normal((n, model.config.latent_dim), dtype=np.float32)
    return decode(model, z)


def mse(a, b):
    """Mean squared error between uint8 image batches, on the [0, 1] scale."""
    diff = a.astype(np.float32) / 255.0 - b.astype(np.float32) / 255.0
    return float(np.mean(diff * diff))
