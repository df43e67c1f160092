"""The importance-weighted bound (Burda, Grosse & Salakhutdinov 2016): K samples per image.

For an image x and K draws z_k = mu + sigma * eps_k from the encoder's q(z|x), the log weights are::

    log w_k = log p(x | z_k) + log p(z_k) - log q(z_k | x)                       # (B, K)
    L_K(x)  = logsumexp_k(log w_k) - log K            <= log p(x)

L_1 is the ELBO, L_K grows with K and tends to log p(x). Training maximizes the mean of L_K over
the batch; its reparameterized gradient weights each sample's gradient by its normalized importance
weight ``w~_k = softmax_k(log w_k)``::

    d(-L_K)/d(theta) = -sum_k w~_k * d(log w_k)/d(theta)      (eps held fixed)

Through z_k = mu + sigma * eps_k, with log p(z) = -|z|^2/2 and log q(z|x) = -|eps|^2/2 - sum(logvar)/2
(constants dropped: they cancel), that is, per image, with ``dz_k`` the decoder's back-propagated
``w~_k * d(-log p(x|z_k))/dz_k``::

    g_k     = dz_k + w~_k * z_k                                 # adds the prior's pull towards 0
    dmu     = sum_k g_k
    dlogvar = sigma / 2 * sum_k g_k * eps_k - 1/2              # -1/2: the entropy of q (sum_k w~_k = 1)

With K = 1 the sampled ``log p(z) - log q(z|x)`` is replaced by its expectation, the closed-form
-KL, as the plain ELBO does (a lower-variance estimate of the same bound L_1), so ``K = 1`` gives
exactly ``model.loss`` and ``model.backward``. For K > 1 no closed form exists and the sampled
terms are used.

The same log weights drive :func:`vaecore.evaluation.importance_sampled_nll`, the importance-
sampled estimate of -log p(x) with large K.

Like the rest of the model, this is written once in ``backend.xp`` operations that NumPy, CuPy and
array_api_strict share. Buffers are sized once per batch size, but the log-weight and gradient
arithmetic is plain array code and makes temporaries: unlike the fused ELBO step, an IWAE step
allocates.
"""

import math

import numpy as np

from .errors import VaecoreError
from .model import backward_layers, forward_layers

LOG_2PI = math.log(2.0 * math.pi)


# -- per-row log-likelihoods -----------------------------------------------------------------------
def reconstruction_log_likelihood(config, xp, out, x):
    """log p(x | z) per sample: ``out`` (b, s, D_out) decoder outputs, ``x`` (b, D) -> (b, s).

    The kernels return only batch sums, so this is the same maths per row (see kernels/likelihood.py):
    Bernoulli on logits in the softplus form that never takes log(0); Gaussian with the fixed
    log-variance ``2 log(gaussian_std)``; Gaussian with a learned per-pixel log-variance.
    """
    target = x[:, None, :]
    d = x.shape[-1]
    if config.likelihood == "bernoulli":
        softplus = xp.maximum(out, 0.0) + xp.log1p(xp.exp(-xp.abs(out)))
        return xp.sum(target * out - softplus, axis=-1)
    if config.likelihood == "gaussian":
        logvar = 2.0 * math.log(config.gaussian_std)
        diff = out - target
        return (-0.5 * math.exp(-logvar)) * xp.sum(diff * diff, axis=-1) - 0.5 * d * (logvar + LOG_2PI)
    mean, logvar = out[:, :, :d], out[:, :, d:]
    diff = mean - target
    return -0.5 * xp.sum(diff * diff * xp.exp(-logvar) + logvar, axis=-1) - 0.5 * d * LOG_2PI


def reconstruction_nll_gradient(config, xp, out, x):
    """d(-log p(x|z))/d(out) for ``out`` (b, s, D_out), ``x`` (b, D): the kernels' formulas, per row."""
    target = x[:, None, :]
    if config.likelihood == "bernoulli":
        e = xp.exp(-xp.abs(out))
        return xp.where(out >= 0, 1.0 / (1.0 + e), e / (1.0 + e)) - target
    if config.likelihood == "gaussian":
        return (out - target) * (1.0 / config.gaussian_std ** 2)
    d = x.shape[-1]
    mean, logvar = out[:, :, :d], out[:, :, d:]
    inv_var = xp.exp(-logvar)
    diff = mean - target
    return xp.concat([diff * inv_var, 0.5 * (1.0 - diff * diff * inv_var)], axis=-1)


def log_mean_exp(xp, log_w):
    """log(mean_k exp(log_w[:, k])) per row of (b, s), shifted by the row maximum so that log
    weights of any size (-1e6 is common for a bad decoder) neither underflow nor overflow."""
    shift = _finite_max(xp, log_w)
    return xp.log(xp.sum(xp.exp(log_w - shift[:, None]), axis=1)) + shift - math.log(log_w.shape[1])


def _finite_max(xp, log_w):
    """Row maxima, with -inf rows (every weight zero) shifted by 0 instead of producing NaN."""
    row_max = xp.max(log_w, axis=1)
    return xp.where(xp.isfinite(row_max), row_max, xp.zeros_like(row_max))


# -- the samples of a batch -----------------------------------------------------------------------
class SampleWorkspace:
    """Buffers for the decoder on ``n_images x n_samples`` latent samples, rows image-major
    (row ``i * n_samples + k`` is sample k of image i). ``deltas`` only when ``backward``."""

    def __init__(self, model, n_images, n_samples, backward=False):
        backend, z_dim = model.backend, model.config.latent_dim
        rows = n_images * n_samples
        self.n_images, self.n_samples = n_images, n_samples
        self.eps = backend.empty((rows, z_dim))
        self.eps_host = np.empty((rows, z_dim), dtype=np.float32)   # host side of the noise; unused on NumPy
        self.z = backend.empty((rows, z_dim))
        self.acts = [backend.empty((rows, layer.W.shape[1])) for layer in model.decoder]
        self.out = self.acts[-1]
        if backward:
            self.dz = backend.empty((rows, z_dim))
            self.deltas = [backend.empty((rows, layer.W.shape[1])) for layer in model.decoder]
            self.dout = self.deltas[-1]


def sample_log_weights(model, stats, x, samples: SampleWorkspace, closed_form_kl=False):
    """Decodes the samples ``z = mu + sigma * eps`` of images with encoder output ``stats`` (b, 2Z)
    and pixels ``x`` (b, D), noise in ``samples.eps``; returns ``(log_w, None)``, the log weights
    (b, s).

    ``closed_form_kl`` (for s = 1) returns ``(log p(x|z), -KL)`` instead: the reconstruction term
    (b, 1) and the closed-form KL summed over the batch, computed by the kernel as ``model.loss`` does.
    """
    backend, xp = model.backend, model.backend.xp
    b, s, z_dim = samples.n_images, samples.n_samples, model.config.latent_dim
    if closed_form_kl:
        kl_rows = None
        neg_kl = -backend.kernels.reparameterize_kl(stats, samples.eps, samples.z)  # sum over the batch
    else:
        mu, logvar = stats[:, None, :z_dim], stats[:, None, z_dim:]
        eps = xp.reshape(samples.eps, (b, s, z_dim))
        z = mu + xp.exp(0.5 * logvar) * eps                                       # (b, s, Z)
        samples.z[...] = xp.reshape(z, (b * s, z_dim))
        # log p(z) - log q(z|x); the log(2 pi) terms cancel
        kl_rows = 0.5 * (xp.sum(eps * eps - z * z, axis=-1) + xp.sum(logvar, axis=-1))
    forward_layers(backend, model.decoder, samples.z, samples.acts)
    out = xp.reshape(samples.out, (b, s, samples.out.shape[1]))
    log_px = reconstruction_log_likelihood(model.config, xp, out, x)
    if closed_form_kl:
        return log_px, neg_kl
    return log_px + kl_rows, None


# -- the training objective -----------------------------------------------------------------------
class IWAEWorkspace:
    """Everything one IWAE step of ``batch_size`` images x ``n_samples`` needs.

    ``x`` (B, D) is the model's own workspace buffer for the batch (fill it with
    ``backend.images_into``); ``eps`` (B*K, Z) and ``eps_host`` take the noise
    (``backend.normal_into(ws.eps, ws.eps_host)``), rows image-major.
    """

    def __init__(self, model, batch_size, n_samples):
        self.batch_size, self.n_samples = batch_size, n_samples
        self.images = model.workspace(batch_size)      # x, the encoder's activations, stats, dstats
        self.samples = SampleWorkspace(model, batch_size, n_samples, backward=True)
        self.x = self.images.x
        self.eps = self.samples.eps
        self.eps_host = self.samples.eps_host


class ImportanceWeightedObjective:
    """The negative IWAE bound with ``n_samples`` (K) samples per image, the trainer's alternative
    to ``model.loss`` + ``model.backward``. Workspaces are cached per batch size, like ``model.workspace``.

    ``kl_weight`` (beta, KL warm-up) is accepted only when K = 1, where the bound is the ELBO
    ``rec + kl_weight * kl``. For K > 1 the KL is not a separate term of the bound: it sits inside
    each log weight, and scaling it has no standard meaning, so anything but 1 is refused with a
    ``VaecoreError``.
    """

    def __init__(self, model, n_samples):
        if int(n_samples) != n_samples or n_samples < 1:
            raise VaecoreError(f"--iw-samples must be a positive integer, got {n_samples}")
        self.model, self.n_samples = model, int(n_samples)
        self._workspaces = {}

    def workspace(self, batch_size):
        ws = self._workspaces.get(batch_size)
        if ws is None:
            ws = self._workspaces[batch_size] = IWAEWorkspace(self.model, batch_size, self.n_samples)
        return ws

    def loss(self, ws):
        """The negative bound summed over the batch in ws.x with the noise in ws.eps (no gradient)."""
        return self._forward(ws)[0]

    def loss_and_backward(self, ws, grad_scale, kl_weight=1.0):
        """Fills ``model.grads`` with ``grad_scale * d(-sum_i L_K(x_i))`` (``grad_scale = 1/B``
        gives the gradient of the batch mean) and returns ``-sum_i L_K(x_i)``, a 0-d array.

        With K = 1 that is ``rec + kl_weight * kl`` and its gradient, the same as ``model.loss``
        and ``model.backward``; the value returned is then ``rec + kl`` as ``model.loss`` reports it.
        """
        model, backend = self.model, self.model.backend
        xp, z_dim, k = backend.xp, model.config.latent_dim, self.n_samples
        if kl_weight != 1.0 and k > 1:
            raise VaecoreError(f"a KL weight of {kl_weight:g} (--beta or --kl-warmup) has no meaning for the "
                               f"importance-weighted bound with --iw-samples {k}; use one or the other")
        neg_bound, log_w = self._forward(ws)
        images, samples = ws.images, ws.samples
        b = ws.batch_size
        # normalized importance weights, times the loss scale: d(loss)/d(log w)  (b, K)
        e = xp.exp(log_w - _finite_max(xp, log_w)[:, None])
        weights = (grad_scale / xp.sum(e, axis=1))[:, None] * e                      # exactly grad_scale at K = 1
        out = xp.reshape(samples.out, (b, k, samples.out.shape[1]))
        dout = reconstruction_nll_gradient(model.config, xp, out, images.x) * weights[:, :, None]
        samples.dout[...] = xp.reshape(dout, samples.dout.shape)
        backward_layers(backend, model.decoder, samples.z, samples.acts, samples.deltas, samples.dz)
        if k == 1:
            backend.kernels.reparameterize_kl_backward(images.stats, samples.eps, samples.dz,
                                                       kl_weight * grad_scale, images.dstats)
        else:
            stats = images.stats
            std = xp.exp(0.5 * stats[:, None, z_dim:])                                    # (b, 1, Z)
            z = xp.reshape(samples.z, (b, k, z_dim))
            eps = xp.reshape(samples.eps, (b, k, z_dim))
            g = xp.reshape(samples.dz, (b, k, z_dim)) + weights[:, :, None] * z
            images.dstats[:, :z_dim] = xp.sum(g, axis=1)
            images.dstats[:, z_dim:] = 0.5 * xp.sum(g * eps * std, axis=1) - 0.5 * grad_scale
        backward_layers(backend, model.encoder, images.x, images.acts[:model.n_encoder],
                        images.deltas[:model.n_encoder], None)
        return neg_bound

    def _forward(self, ws):
        model, xp = self.model, self.model.backend.xp
        images = ws.images
        model.encode(images)
        log_w, neg_kl = sample_log_weights(model, images.stats, images.x, ws.samples,
                                           closed_form_kl=self.n_samples == 1)
        if neg_kl is not None:                  # K = 1: rec + kl, exactly the ELBO of model.loss
            return -xp.sum(log_w) - neg_kl, log_w
        return -xp.sum(log_mean_exp(xp, log_w)), log_w
