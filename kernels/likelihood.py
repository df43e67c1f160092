"""Reconstruction log-likelihoods fused with their gradient.

Each kernel returns the negative log-likelihood summed over the batch (nats, unscaled) and writes
``grad_scale * dNLL/d(decoder output)`` into a preallocated buffer, so the 1/B of a mean loss (and
nothing else) is applied in the same pass instead of a separate sweep over the gradients.

Bernoulli on logits ``l`` with targets ``x`` in [0, 1] (grey levels are allowed)::

    nll     = softplus(l) - x * l,   softplus(l) = max(l, 0) + log1p(exp(-|l|))   # never log(0)
    dlogits = sigmoid(l) - x

Gaussian with fixed log-variance ``s`` (a float) and mean ``m``::

    nll   = (x - m)**2 / (2 exp(s)) + (s + log(2 pi)) / 2
    dmean = (m - x) / exp(s)

Gaussian with learned per-pixel variance; the decoder's output ``out`` (B, 2D) holds ``[m | s]``::

    nll    = (x - m)**2 / (2 exp(s)) + (s + log(2 pi)) / 2
    dm     = (m - x) * exp(-s)
    ds     = (1 - (x - m)**2 * exp(-s)) / 2
"""

import math

from .namespace import array_namespace

LOG_2PI = math.log(2.0 * math.pi)


def bernoulli_nll_grad_reference(logits, x, grad_scale, dlogits_out):
    xp = array_namespace(logits)
    softplus = xp.maximum(logits, 0.0) + xp.log1p(xp.exp(-xp.abs(logits)))
    # sigmoid through exp(-|l|) so neither branch overflows for logits of either sign
    e = xp.exp(-xp.abs(logits))
    sigmoid = xp.where(logits >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    dlogits_out[...] = grad_scale * (sigmoid - x)
    return xp.sum(softplus - x * logits)


def gaussian_nll_grad_reference(mean, x, logvar, grad_scale, dmean_out):
    xp = array_namespace(mean)
    inv_var = math.exp(-logvar)
    diff = mean - x
    dmean_out[...] = (grad_scale * inv_var) * diff
    n = diff.shape[0] * diff.shape[1]
    return 0.5 * inv_var * xp.sum(diff * diff) + 0.5 * (logvar + LOG_2PI) * n


def gaussian_learned_nll_grad_reference(out, x, grad_scale, dout_out):
    xp = array_namespace(out)
    n_pixels = x.shape[1]
    mean, logvar = out[:, :n_pixels], out[:, n_pixels:]
    inv_var = xp.exp(-logvar)
    diff = mean - x
    sq = diff * diff * inv_var
    dout_out[:, :n_pixels] = grad_scale * diff * inv_var
    dout_out[:, n_pixels:] = (0.5 * grad_scale) * (1.0 - sq)
    return 0.5 * xp.sum(sq + logvar) + 0.5 * LOG_2PI * (x.shape[0] * n_pixels)
