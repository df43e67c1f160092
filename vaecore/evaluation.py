"""How good is a trained model: the numbers of ``vaecore evaluate``.

- the negative ELBO, reconstruction MSE and KL of :meth:`vaecore.train.Trainer.evaluate`;
- ``nll_is``: the importance-sampled estimate of -log p(x) with K samples per image (Burda et al.
  2016), the IWAE bound L_K of :mod:`vaecore.iwae` with a large K. It is a stochastic *upper* bound
  on the true negative log-likelihood that tightens as K grows, and always at most the negative
  ELBO in expectation;
- ``active_units``: latent dimensions whose posterior mean varies across the data,
  ``Cov_x(E_q[z_d]) > 0.01`` (Burda et al.); the others have collapsed to the prior.

Everything runs on the model's backend in chunks, so memory stays bounded whatever N and K are,
and only scalars and (N, Z) means come back to the host.
"""

import math

import numpy as np

from .binarize import TEST_SEED, binarize_fixed
from .errors import VaecoreError
from .iwae import SampleWorkspace, sample_log_weights

MAX_DECODER_FLOATS = 1 << 20     # decoder outputs computed at once (4 MiB in float32)
ENCODE_CHUNK = 1000              # images encoded at once
ACTIVE_THRESHOLD = 0.01


def _rows(images):
    """(N, ...) uint8 or float images -> a host (N, D) array of the same dtype."""
    images = np.asarray(images)
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise VaecoreError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return images.reshape(len(images), -1)


def _images_into(backend, dst, rows):
    """uint8 rows are pixels 0..255 (converted on the device); float rows are already in [0, 1]."""
    if rows.dtype == np.uint8:
        backend.images_into(dst, rows)
    else:
        backend.copy_from_host(dst, rows)


def _encode_chunks(model, rows):
    """Yields (start, stop, workspace) with ``ws.x`` and ``ws.stats`` filled for rows[start:stop]."""
    for start in range(0, len(rows), ENCODE_CHUNK):
        stop = min(len(rows), start + ENCODE_CHUNK)
        ws = model.workspace(stop - start)
        _images_into(model.backend, ws.x, rows[start:stop])
        model.encode(ws)
        yield start, stop, ws


def default_chunk(model):
    """How many (image, sample) pairs to decode at once: MAX_DECODER_FLOATS over the widest layer."""
    widest = max(layer.W.shape[1] for layer in model.decoder)
    return max(1, MAX_DECODER_FLOATS // widest)


def importance_sampled_nll(model, images, k, seed=0, chunk=None, progress=None):
    """Mean over images of -log p(x), estimated with ``k`` importance samples each, in nats::

        log p(x) ~= logsumexp_k[log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log k,   z_k ~ q(z|x)

    ``images``: uint8 (pixels 0..255) or float (in [0, 1]) arrays (N, C, H, W) or (N, D).
    ``chunk``: at most this many (image, sample) pairs are decoded at once (default: about
    MAX_DECODER_FLOATS decoder outputs); images with k <= chunk go ``chunk // k`` at a time, larger
    k is split into blocks of one image's samples and their log-sum-exps are merged. The noise is
    one stream from ``seed`` drawn image by image, sample by sample, so the result does not depend
    on ``chunk``. ``progress(done, total)``, if given, is called after each batch of images.
    """
    if int(k) != k or k < 1:
        raise VaecoreError(f"--iw-samples must be a positive integer, got {k}")
    k = int(k)
    backend, xp = model.backend, model.backend.xp
    rows = _rows(images)
    chunk = int(chunk or default_chunk(model))
    if chunk < 1:
        raise VaecoreError(f"chunk must be at least 1, got {chunk}")
    rng = np.random.default_rng(seed)
    per_pass = min(k, chunk)                       # samples of one image decoded in one pass
    images_per_pass = max(1, chunk // k)
    buffers = {}

    def samples_for(b, s):
        ws = buffers.get((b, s))
        if ws is None:
            ws = buffers[(b, s)] = SampleWorkspace(model, b, s)
        return ws

    total = 0.0
    for start, stop, ws in _encode_chunks(model, rows):
        for i in range(0, stop - start, images_per_pass):
            b = min(images_per_pass, stop - start - i)
            stats, x = ws.stats[i:i + b, :], ws.x[i:i + b, :]
            run_max = run_sum = None                 # streaming log-sum-exp over sample blocks, (b,)
            for s0 in range(0, k, per_pass):
                samples = samples_for(b, min(per_pass, k - s0))
                backend.normal_into(samples.eps, samples.eps_host, rng=rng)
                log_w, _ = sample_log_weights(model, stats, x, samples)
                run_max, run_sum = _merge_log_sum_exp(xp, run_max, run_sum, log_w)
            log_px = xp.log(run_sum) + run_max - math.log(k)
            total += float(xp.sum(log_px))
            if progress is not None:
                progress(start + i + b, len(rows))
    return -total / max(len(rows), 1)


def _merge_log_sum_exp(xp, run_max, run_sum, log_w):
    """Folds the log weights (b, s) of one block into the running (max, sum of exp(lw - max))."""
    block_max = xp.max(log_w, axis=1)
    new_max = block_max if run_max is None else xp.maximum(run_max, block_max)
    new_max = xp.where(xp.isfinite(new_max), new_max, xp.zeros_like(new_max))   # all -inf: shift by 0
    block_sum = xp.sum(xp.exp(log_w - new_max[:, None]), axis=1)
    if run_sum is None:
        return new_max, block_sum
    return new_max, run_sum * xp.exp(run_max - new_max) + block_sum


def posterior_mean_variance(model, images):
    """Per latent dimension, the variance over images of the posterior mean E_q[z_d]: (Z,) float64."""
    backend, z_dim = model.backend, model.config.latent_dim
    rows = _rows(images)
    means = np.empty((len(rows), z_dim), dtype=np.float64)
    for start, stop, ws in _encode_chunks(model, rows):
        means[start:stop] = backend.to_host(ws.stats[:, :z_dim])
    return means.var(axis=0) if len(rows) else np.zeros(z_dim)


def active_units(model, images, threshold=ACTIVE_THRESHOLD):
    """The number of latent dimensions with ``Cov_x(E_q[z_d]) > threshold`` (Burda et al. 2016)."""
    return int(np.sum(posterior_mean_variance(model, images) > threshold))


def evaluate_all(model, images, seed=0, iw_samples=1000, binarize=False, chunk=None, progress=None):
    """Every number of ``vaecore evaluate`` on uint8 test images (N, C, H, W), as a dict with keys
    ``test_loss`` (negative ELBO, nats per image, one z sample each), ``recon_mse`` (posterior-mean
    reconstruction, pixels in [0, 1]), ``kl``, ``active_units``, ``nll_is`` (None when
    ``iw_samples`` is 0), ``iw_samples`` and ``n``.

    ``binarize`` scores the fixed binarization of the images (:func:`binarize_fixed` with its
    fixed seed), the density-estimation setting; use it for models trained with ``--binarize``.
    """
    from .config import TrainConfig
    from .optim import Adam
    from .train import Trainer

    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise VaecoreError(f"evaluate_all takes uint8 images, got {images.dtype}")
    if len(images) == 0:
        raise VaecoreError("there are no test images to evaluate on")
    if binarize:
        images = binarize_fixed(images, TEST_SEED)
    trainer = Trainer(model, Adam(model.backend, 1), TrainConfig(batch_size=1), images[:1], images, cuda_graphs=False,
                      cpu_replay=False)
    elbo = trainer.evaluate(trainer.x_val, seed=seed)
    nll_is = None
    if iw_samples:
        nll_is = importance_sampled_nll(model, images, iw_samples, seed=seed, chunk=chunk, progress=progress)
    return {"test_loss": elbo["val_loss"], "recon_mse": elbo["recon_mse"], "kl": elbo["kl"],
            "active_units": active_units(model, images), "nll_is": nll_is, "iw_samples": int(iw_samples),
            "n": len(images)}
