"""The hand-written backward pass agrees with finite differences of the loss, in float64."""

import numpy as np
import pytest

from engine_helpers import float64_backend, tiny_config
from vaecore.model import VAE

B = 4


def mean_loss(model, ws):
    rec, kl = model.loss(ws, grad_scale=1.0 / B)
    return (float(rec) + float(kl)) / B


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian-learned"])
@pytest.mark.parametrize("hidden", [(5,), (6, 4)])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_backward_matches_finite_differences(likelihood, hidden, activation):
    model = VAE(tiny_config(likelihood=likelihood, hidden=hidden, activation=activation,
                            gaussian_std=0.5), float64_backend(), init_seed=1)
    rng = np.random.default_rng(2)
    ws = model.workspace(B)
    ws.x[...] = rng.random(ws.x.shape)
    ws.eps[...] = rng.standard_normal(ws.eps.shape)
    model.params[...] += 0.3 * rng.standard_normal(model.params.shape)   # away from the symmetric init

    mean_loss(model, ws)
    model.backward(ws, kl_weight=1.0, grad_scale=1.0 / B)
    analytic = model.grads.copy()

    h = 1e-6
    numeric = np.empty_like(analytic)
    for i in range(model.n_params):
        saved = model.params[i]
        model.params[i] = saved + h
        up = mean_loss(model, ws)
        model.params[i] = saved - h
        down = mean_loss(model, ws)
        model.params[i] = saved
        numeric[i] = (up - down) / (2 * h)
    scale = np.abs(numeric).max()
    assert scale > 1e-3, "the check is vacuous if every gradient is zero"
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7 * scale)


def test_kl_weight_scales_only_the_kl_gradient():
    """With the reconstruction term switched off, the encoder's gradient is the KL's, times the weight."""
    model = VAE(tiny_config(), float64_backend(), init_seed=3)
    rng = np.random.default_rng(4)
    ws = model.workspace(B)
    ws.x[...] = rng.random(ws.x.shape)
    ws.eps[...] = rng.standard_normal(ws.eps.shape)
    model.loss(ws, grad_scale=0.0)                      # d(rec) = 0
    model.backward(ws, kl_weight=1.0, grad_scale=1.0)
    once = model.grads.copy()
    model.backward(ws, kl_weight=2.5, grad_scale=1.0)
    assert np.abs(once).max() > 0
    np.testing.assert_allclose(model.grads, 2.5 * once, rtol=1e-12, atol=1e-15)
