"""Evaluation numbers: the importance-sampled NLL, active units, binarization, and evaluate_all."""

import math

import numpy as np
import pytest

from engine_helpers import striped_digits
from vaecore.backend import make_backend
from vaecore.binarize import DynamicBinarizer, binarize_fixed
from vaecore.config import ModelConfig, TrainConfig
from vaecore.errors import VaecoreError
from vaecore.evaluation import active_units, evaluate_all, importance_sampled_nll, posterior_mean_variance
from vaecore.model import VAE
from vaecore.optim import Adam
from vaecore.train import Trainer

CONFIG = ModelConfig(image_shape=(1, 8, 8), hidden=(32,), latent_dim=4)


def train_tiny(backend_name="numpy", epochs=30):
    backend = make_backend(backend_name, seed=0)
    model = VAE(CONFIG, backend, init_seed=0)
    data = striped_digits(128)
    trainer = Trainer(model, Adam(backend, model.n_params, lr=3e-3), TrainConfig(batch_size=16, lr=3e-3),
                      data, data[:32])
    for epoch in range(1, epochs + 1):
        trainer.train_epoch(epoch)
    return model


@pytest.fixture(scope="module")
def trained():
    return train_tiny()


@pytest.fixture(scope="module")
def test_images():
    return striped_digits(60, seed=5)


def test_importance_sampling_beats_the_elbo(trained, test_images):
    """-log p(x) <= -ELBO: with many samples the estimate is clearly below the negative ELBO."""
    result = evaluate_all(trained, test_images, seed=0, iw_samples=200)
    assert result["nll_is"] < result["test_loss"]
    assert result["nll_is"] > 0


def test_more_samples_give_a_tighter_estimate(trained, test_images):
    estimates = {k: importance_sampled_nll(trained, test_images, k, seed=3) for k in (1, 10, 100)}
    assert estimates[100] <= estimates[10] + 0.05 <= estimates[1] + 0.1, estimates
    assert estimates[100] < estimates[1] - 0.2, estimates


@pytest.mark.parametrize("chunk", [1, 7, 20, 45, 10_000])
def test_chunking_does_not_change_the_estimate(trained, test_images, chunk):
    """Fewer pairs than one image's samples (1, 7), exactly K, several images at a time: one noise stream."""
    whole = importance_sampled_nll(trained, test_images[:15], 20, seed=1, chunk=10_000)
    assert importance_sampled_nll(trained, test_images[:15], 20, seed=1, chunk=chunk) == pytest.approx(whole, rel=1e-6)


def test_the_seed_picks_the_noise(trained, test_images):
    a = importance_sampled_nll(trained, test_images, 5, seed=1)
    assert importance_sampled_nll(trained, test_images, 5, seed=1) == a
    assert importance_sampled_nll(trained, test_images, 5, seed=2) != a


def test_float_images_match_uint8_images(trained, test_images):
    as_uint8 = importance_sampled_nll(trained, test_images, 8, seed=0)
    as_float = importance_sampled_nll(trained, test_images.astype(np.float32) / 255.0, 8, seed=0)
    assert as_float == pytest.approx(as_uint8, rel=1e-6)


def test_huge_log_weights_stay_finite_and_exact():
    """A decoder that ignores z with logits of +-3000: log p(x|z) ~ -1e5, far below where exp underflows.

    Since p(x|z) does not depend on z, E_q[p(z) / q(z|x)] = 1 and log p(x) = log p(x|z) exactly; the
    estimate must land on it (up to the Monte Carlo noise of the weights), not on -inf or NaN.
    """
    backend = make_backend("numpy", seed=0)
    model = VAE(CONFIG, backend, init_seed=0)
    last = model.decoder[-1]
    last.W[...] = 0.0
    pattern = np.where(np.arange(64) % 2 == 0, 3000.0, -3000.0).astype(np.float32)
    last.b[...] = pattern
    x = striped_digits(6, seed=9)
    target = x.reshape(6, -1) / 255.0
    exact_nll = np.mean(np.sum(np.logaddexp(0.0, pattern.astype(np.float64)) - target * pattern, axis=1))
    assert exact_nll > 5e4
    estimate = importance_sampled_nll(model, x, 50, seed=0)
    assert math.isfinite(estimate)
    assert estimate == pytest.approx(exact_nll, rel=1e-4)


def test_runs_under_array_api_strict_and_matches_numpy(test_images):
    strict, reference = make_backend("array_api_strict", seed=0), make_backend("numpy", seed=0)
    reference.kernels = strict.kernels
    values = []
    for backend in (strict, reference):
        model = VAE(CONFIG, backend, init_seed=0)
        values.append((importance_sampled_nll(model, test_images[:10], 30, seed=0, chunk=7),
                       active_units(model, test_images[:10], threshold=1e-6)))
    assert values[0][0] == pytest.approx(values[1][0], rel=1e-5)
    assert values[0][1] == values[1][1]


def test_active_units_count_dimensions_whose_mean_moves(trained, test_images):
    variances = posterior_mean_variance(trained, test_images)
    assert variances.shape == (CONFIG.latent_dim,)
    assert active_units(trained, test_images) == int(np.sum(variances > 0.01))
    assert 1 <= active_units(trained, test_images) <= CONFIG.latent_dim
    assert active_units(trained, test_images, threshold=np.inf) == 0


def test_a_collapsed_encoder_has_no_active_units(test_images):
    model = VAE(CONFIG, make_backend("numpy"), init_seed=0)
    head = model.encoder[-1]
    head.W[:, :CONFIG.latent_dim] = 0.0          # the means no longer depend on x
    assert active_units(model, test_images) == 0


def test_evaluate_all_reports_every_key(trained, test_images):
    result = evaluate_all(trained, test_images, seed=0, iw_samples=10)
    assert set(result) == {"test_loss", "recon_mse", "kl", "active_units", "nll_is", "iw_samples", "n"}
    assert result["n"] == len(test_images) and result["iw_samples"] == 10
    assert isinstance(result["active_units"], int)
    assert all(math.isfinite(result[k]) for k in ("test_loss", "recon_mse", "kl", "nll_is"))
    assert evaluate_all(trained, test_images, iw_samples=0)["nll_is"] is None


def test_evaluate_all_binarized_scores_the_fixed_binarization(trained):
    grey = (striped_digits(20, seed=4) // 2).astype(np.uint8)       # levels 0 and 127
    binarized = evaluate_all(trained, grey, iw_samples=5, binarize=True)
    direct = evaluate_all(trained, binarize_fixed(grey), iw_samples=5)
    assert binarized == direct
    assert binarized["test_loss"] != evaluate_all(trained, grey, iw_samples=5)["test_loss"]


@pytest.mark.parametrize("k", [0, -1, 2.5])
def test_bad_sample_counts_are_refused(trained, test_images, k):
    with pytest.raises(VaecoreError, match="--iw-samples"):
        importance_sampled_nll(trained, test_images, k)


# -- binarization -----------------------------------------------------------------------------------
def grey_levels(n_per_level=2000):
    """Every level 0..255, n_per_level pixels each, as images of 64 pixels."""
    return np.repeat(np.arange(256, dtype=np.uint8), n_per_level).reshape(-1, 1, 8, 8)


def test_fixed_binarization_is_deterministic_and_seeded():
    images = grey_levels(100)
    first = binarize_fixed(images, seed=7)
    assert first.shape == images.shape and first.dtype == np.uint8
    assert set(np.unique(first)) <= {0, 255}
    np.testing.assert_array_equal(binarize_fixed(images, seed=7), first)
    assert not np.array_equal(binarize_fixed(images, seed=8), first)
    # the stream is consumed image by image: a prefix binarizes the same way
    np.testing.assert_array_equal(binarize_fixed(images[:37], seed=7), first[:37])


def test_fixed_binarization_mean_matches_the_grey_level():
    n = 2000
    levels = binarize_fixed(grey_levels(n), seed=0).reshape(256, n)
    frequency = (levels == 255).mean(axis=1)
    p = np.arange(256) / 255.0
    assert frequency[0] == 0.0 and frequency[255] == 1.0
    # 5 standard errors: a real bias of 1/255 (an off-by-one level) would show in many levels at once
    assert np.all(np.abs(frequency - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12)
    assert abs(np.mean(frequency - p)) < 1e-3


def test_dynamic_binarization_is_in_place_and_follows_the_rng():
    batch = grey_levels(4)[:16].reshape(16, -1).copy()
    original = batch.copy()
    rng = np.random.default_rng(11)
    result = DynamicBinarizer()(batch, rng)
    assert result is batch and set(np.unique(batch)) <= {0, 255}
    # exactly batch.size float32 uniforms were drawn, and the same state gives the same draw
    check = np.random.default_rng(11)
    uniforms = check.random(original.size, dtype=np.float32)
    assert rng.bit_generator.state == check.bit_generator.state
    expected = np.where(np.floor(255.0 * uniforms) < original.reshape(-1), 255, 0)
    np.testing.assert_array_equal(batch.reshape(-1), expected)


def test_dynamic_binarization_matches_fixed_for_the_same_stream():
    images = grey_levels(10)
    batch = images.reshape(len(images), -1).copy()
    DynamicBinarizer()(batch, np.random.default_rng(3))
    np.testing.assert_array_equal(batch, binarize_fixed(images, seed=3).reshape(len(images), -1))


def test_dynamic_binarization_allocates_nothing():
    import tracemalloc

    batch = grey_levels(50)[:128].reshape(128, -1).copy()
    binarize, rng = DynamicBinarizer(), np.random.default_rng(0)
    binarize(batch, rng)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(5):
            binarize(batch, rng)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before < 2048, f"the binarizer allocated {peak - before} bytes"


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9])
def test_dynamic_binarization_of_tiny_batches(n):
    batch = np.full(n, 200, dtype=np.uint8)
    DynamicBinarizer()(batch, np.random.default_rng(0))
    assert set(np.unique(batch)) <= {0, 255}
