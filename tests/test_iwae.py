"""The importance-weighted objective: its gradient agrees with finite differences, K = 1 is the ELBO,
it runs under array_api_strict, and a KL weight is refused where it has no meaning."""

import math

import numpy as np
import pytest

from engine_helpers import float64_backend, striped_digits, tiny_config
from vaecore.backend import make_backend
from vaecore.config import ModelConfig
from vaecore.errors import VaecoreError
from vaecore.iwae import ImportanceWeightedObjective, log_mean_exp
from vaecore.model import VAE

B = 3


def prepared(k, seed=2, **config):
    """A float64 model moved away from its symmetric init, and a filled IWAE workspace."""
    model = VAE(tiny_config(gaussian_std=0.5, **config), float64_backend(), init_seed=1)
    rng = np.random.default_rng(seed)
    model.params[...] += 0.3 * rng.standard_normal(model.params.shape)
    objective = ImportanceWeightedObjective(model, k)
    ws = objective.workspace(B)
    ws.x[...] = rng.random(ws.x.shape)
    ws.eps[...] = rng.standard_normal(ws.eps.shape)
    return model, objective, ws


def finite_difference_gradient(model, loss, h=1e-6):
    numeric = np.empty(model.n_params)
    for i in range(model.n_params):
        saved = model.params[i]
        model.params[i] = saved + h
        up = loss()
        model.params[i] = saved - h
        down = loss()
        model.params[i] = saved
        numeric[i] = (up - down) / (2 * h)
    return numeric


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian-learned"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_iwae_gradient_matches_finite_differences(k, likelihood, activation):
    model, objective, ws = prepared(k, likelihood=likelihood, activation=activation, hidden=(4,))
    objective.loss_and_backward(ws, grad_scale=1.0 / B)
    analytic = model.grads.copy()
    numeric = finite_difference_gradient(model, lambda: float(objective.loss(ws)) / B)
    scale = np.abs(numeric).max()
    assert scale > 1e-3, "the check is vacuous if every gradient is zero"
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7 * scale)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian-learned"])
@pytest.mark.parametrize("kl_weight", [1.0, 0.25])
def test_one_sample_is_exactly_the_elbo(likelihood, kl_weight):
    """K = 1 gives model.loss's value and model.backward's gradient, KL weight included."""
    model, objective, ws = prepared(1, likelihood=likelihood)
    value = float(objective.loss_and_backward(ws, grad_scale=1.0 / B, kl_weight=kl_weight))
    iwae_grads = model.grads.copy()

    elbo_ws = model.workspace(B)            # the same buffer as ws.x: the batch is already there
    assert elbo_ws.x is ws.x
    elbo_ws.eps[...] = ws.eps
    rec, kl = model.loss(elbo_ws, grad_scale=1.0 / B)
    model.backward(elbo_ws, kl_weight=kl_weight, grad_scale=1.0 / B)
    assert value == pytest.approx(float(rec) + float(kl), rel=1e-12)
    np.testing.assert_allclose(iwae_grads, model.grads, rtol=1e-10, atol=1e-14)


def test_beta_elbo_gradient_matches_finite_differences():
    """The beta-VAE loss rec + beta * kl: model.backward's kl_weight against finite differences."""
    beta = 3.5
    model = VAE(tiny_config(), float64_backend(), init_seed=1)
    rng = np.random.default_rng(5)
    model.params[...] += 0.3 * rng.standard_normal(model.params.shape)
    ws = model.workspace(B)
    ws.x[...] = rng.random(ws.x.shape)
    ws.eps[...] = rng.standard_normal(ws.eps.shape)

    def loss():
        rec, kl = model.loss(ws, grad_scale=1.0 / B)
        return (float(rec) + beta * float(kl)) / B

    loss()
    model.backward(ws, kl_weight=beta, grad_scale=1.0 / B)
    analytic = model.grads.copy()
    numeric = finite_difference_gradient(model, loss)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7 * np.abs(numeric).max())


def test_more_samples_give_a_tighter_bound_on_average():
    """E[L_1] <= E[L_5] <= E[L_50], on a fixed batch over many noise draws."""
    model = VAE(tiny_config(), float64_backend(), init_seed=1)
    x = np.random.default_rng(0).random((B, model.config.input_dim))
    rng = np.random.default_rng(1)
    means = {}
    for k in (1, 5, 50):
        objective = ImportanceWeightedObjective(model, k)
        ws = objective.workspace(B)
        ws.x[...] = x
        values = []
        for _ in range(200):
            ws.eps[...] = rng.standard_normal(ws.eps.shape)
            values.append(float(objective.loss(ws)))
        means[k] = np.mean(values)
    assert means[1] > means[5] > means[50], means


def test_a_kl_weight_is_refused_with_several_samples():
    model, objective, ws = prepared(3)
    with pytest.raises(VaecoreError, match="no meaning for the importance-weighted bound"):
        objective.loss_and_backward(ws, grad_scale=1.0 / B, kl_weight=0.5)


@pytest.mark.parametrize("k", [0, -2, 2.5])
def test_sample_count_must_be_a_positive_integer(k):
    model = VAE(tiny_config(), float64_backend())
    with pytest.raises(VaecoreError, match="--iw-samples"):
        ImportanceWeightedObjective(model, k)


def test_log_mean_exp_survives_huge_log_weights():
    lw = np.array([[-1e6, -1e6 + math.log(3.0)], [1e6, 1e6], [-np.inf, -np.inf]])
    with np.errstate(divide="ignore"):                  # log(0) for the all -inf row is the answer
        result = log_mean_exp(np, lw)
    assert result[0] == pytest.approx(-1e6 + math.log(2.0))
    assert result[1] == pytest.approx(1e6)
    assert result[2] == -np.inf


def test_iwae_training_runs_on_array_api_strict_and_matches_numpy():
    """Forward and backward use only shared array operations: identical results on a strict device."""
    config = ModelConfig(image_shape=(1, 8, 8), hidden=(16,), latent_dim=3)
    batch = striped_digits(8).reshape(8, -1)
    results = []
    for name in ("array_api_strict", "numpy"):
        backend = make_backend(name, seed=0)
        backend.kernels = make_backend("array_api_strict").kernels        # reference kernels on both
        model = VAE(config, backend, init_seed=0)
        objective = ImportanceWeightedObjective(model, 4)
        ws = objective.workspace(len(batch))
        backend.images_into(ws.x, batch)
        backend.normal_into(ws.eps, ws.eps_host)
        value = objective.loss_and_backward(ws, grad_scale=1.0 / len(batch))
        results.append((float(value), backend.to_host(model.grads)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_workspaces_are_cached_per_batch_size():
    model = VAE(tiny_config(), float64_backend())
    objective = ImportanceWeightedObjective(model, 4)
    assert objective.workspace(5) is objective.workspace(5)
    assert objective.workspace(5).eps.shape == (20, model.config.latent_dim)
