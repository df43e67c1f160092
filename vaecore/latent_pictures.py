"""Pictures of the latent space: walks along a line, sweeps along axes, the 2-D manifold.

Each function returns uint8 images (N, C, H, W) on the host, in reading order; the caller tiles them
with :func:`vaecore.images.grid` and writes them with :func:`vaecore.images.save_png`.
"""

from statistics import NormalDist

import numpy as np

from .errors import VaecoreError
from .inference import decode, posterior_means

TRAVERSE_STEPS = 11     # odd, so the middle column is the base latent itself
TRAVERSE_SPAN = 3.0     # three prior standard deviations either side
MANIFOLD_STEPS = 20


def interpolation_strip(model, image_a, image_b, steps=10):
    """``steps`` images decoding evenly spaced points on the straight line between the posterior
    means of ``image_a`` and ``image_b`` (uint8 (C, H, W)), both ends included."""
    if steps < 2:
        raise VaecoreError(f"--steps must be at least 2 to include both ends, got {steps}")
    shape = tuple(model.config.image_shape)
    for name, image in (("first", image_a), ("second", image_b)):
        if tuple(np.shape(image)) != shape:
            raise VaecoreError(f"the {name} image is {tuple(np.shape(image))}, the model takes {shape}")
    ends = posterior_means(model, np.stack([image_a, image_b]).astype(np.uint8))      # (2, Z)
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    return decode(model, (1.0 - t) * ends[0] + t * ends[1])


def traversal_grid(model, dims, steps=TRAVERSE_STEPS, span=TRAVERSE_SPAN, base=None):
    """One row per latent dimension in ``dims``: that coordinate swept evenly over [-span, span],
    the others held at ``base`` (a latent vector (Z,); default the prior mean, 0).

    Returns ``len(dims) * steps`` images, row by row (tile with ``ncols=steps``).
    """
    z_dim = model.config.latent_dim
    dims = [int(d) for d in dims]
    if not dims:
        raise VaecoreError("--dims names no latent dimension")
    bad = [d for d in dims if not 0 <= d < z_dim]
    if bad:
        raise VaecoreError(f"latent dimension {bad[0]} does not exist; this model's are 0..{z_dim - 1}")
    if steps < 2:
        raise VaecoreError(f"--steps must be at least 2, got {steps}")
    if not span > 0:
        raise VaecoreError(f"--span must be positive, got {span}")
    base = np.zeros(z_dim, dtype=np.float32) if base is None else np.asarray(base, dtype=np.float32)
    if base.shape != (z_dim,):
        raise VaecoreError(f"the base latent has shape {base.shape}, the model's is ({z_dim},)")
    values = np.linspace(-span, span, steps, dtype=np.float32)
    z = np.tile(base, (len(dims), steps, 1))                         # (rows, steps, Z)
    for row, d in enumerate(dims):
        z[row, :, d] = values
    return decode(model, z.reshape(-1, z_dim))


def manifold_latents(steps=MANIFOLD_STEPS):
    """The (steps * steps, 2) grid of z whose probabilities under N(0, I) are evenly spaced, as in
    Kingma & Welling's figure 4: the inverse normal CDF of (i + 0.5) / steps on each axis. Rows run
    from high z_2 (top) to low, columns from low z_1 (left) to high, like a plot's axes."""
    if steps < 2:
        raise VaecoreError(f"the manifold needs at least 2 steps, got {steps}")
    ticks = np.array([NormalDist().inv_cdf((i + 0.5) / steps) for i in range(steps)], dtype=np.float32)
    z1, z2 = np.meshgrid(ticks, ticks[::-1])
    return np.stack([z1.ravel(), z2.ravel()], axis=1)


def manifold_grid(model, steps=MANIFOLD_STEPS):
    """The decoded 2-D latent manifold: ``steps * steps`` images (tile with ``ncols=steps``)."""
    if model.config.latent_dim != 2:
        raise VaecoreError(f"the manifold picture needs a 2-D latent space; this model's has "
                           f"{model.config.latent_dim} dimensions")
    return decode(model, manifold_latents(steps))
