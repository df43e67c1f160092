"""Reparameterization fused with the KL term.

The encoder's two heads are one matmul, so the kernels take its output ``stats`` of shape (B, 2Z):
columns ``[:Z]`` are the posterior means ``mu`` and ``[Z:]`` the log-variances ``logvar``. Keeping
them in one contiguous array lets a fused kernel read each row once.

Forward::

    z   = mu + exp(logvar / 2) * eps                                   # (B, Z)
    kl  = -1/2 * sum(1 + logvar - mu**2 - exp(logvar))                 # scalar, summed over batch

Backward, given ``dz`` = dLoss/dz and the weight ``w`` that the KL sum carries in the loss::

    dmu     = dz + w * mu
    dlogvar = dz * eps * exp(logvar / 2) / 2 + w * (exp(logvar) - 1) / 2

written into ``dstats`` laid out like ``stats``. The cpu and cuda tables also take ``w`` as a one-element
float64 array read when the kernel runs (a recorded step's knob: vaecore/cpu_replay.py, cuda_graph.py).
"""

from .namespace import array_namespace


def reparameterize_kl_reference(stats, eps, z_out):
    """Writes ``z`` into ``z_out`` (B, Z) and returns the KL sum (unscaled, over the batch)."""
    xp = array_namespace(stats)
    n_latent = eps.shape[1]
    mu, logvar = stats[:, :n_latent], stats[:, n_latent:]
    z_out[...] = mu + xp.exp(0.5 * logvar) * eps
    return -0.5 * xp.sum(1.0 + logvar - mu * mu - xp.exp(logvar))


def reparameterize_kl_backward_reference(stats, eps, dz, kl_weight, dstats_out):
    """Writes ``[dmu | dlogvar]`` into ``dstats_out`` (B, 2Z); ``dz`` may already hold any scale."""
    xp = array_namespace(stats)
    n_latent = eps.shape[1]
    mu, logvar = stats[:, :n_latent], stats[:, n_latent:]
    std = xp.exp(0.5 * logvar)
    dstats_out[:, :n_latent] = dz + kl_weight * mu
    dstats_out[:, n_latent:] = 0.5 * dz * eps * std + (0.5 * kl_weight) * (std * std - 1.0)
