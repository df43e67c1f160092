"""The Numba CPU kernels agree with the reference kernels (the oracle), including at the edges.

Tolerances (float32, machine epsilon 1.2e-7):
* element-wise outputs: rtol 1e-5 (about 80 ulp; the fused kernels use their own exp/log1p/tanh,
  accurate to a few ulp, and may fuse a multiply-add), atol 1e-6 times the output's natural scale
  (``grad_scale`` for gradients) for values that cancel to near zero;
* batch sums: rtol 1e-5 plus atol 1e-5 per summed element. The reference sums in float32 (pairwise),
  the CPU kernels accumulate each row in float32 lanes and the rows in float64, so the two differ by
  the reference's own rounding, which grows with the element count;
* Adam: parameters and moments rtol 1e-5, the gradient norm rtol 1e-5;
* small-batch matmuls: rtol 1e-5 plus atol 1e-5 * sqrt(terms summed): float32 sums in another order
  than BLAS's.
"""

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import njit
from numba import types as numba_types

import kernels
from kernels import cpu
from kernels.adam import adam_step_reference, layer_backward_adam_reference
from kernels.bias_act import ACTIVATIONS, bias_act_backward_reference, bias_act_reference, linear_act_reference
from kernels.likelihood import (
    bernoulli_nll_grad_reference,
    gaussian_learned_nll_grad_reference,
    gaussian_nll_grad_reference,
)
from kernels.reparam_kl import reparameterize_kl_backward_reference, reparameterize_kl_reference

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
SHAPES = [(1, 784), (4, 784), (128, 784), (3, 7), (0, 784)]   # batch of 1, configs' sizes, odd, empty


def f32(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# How Adam and the small-batch gradient products may run: plain serial kernels (Numba's pool is not
# OpenMP or TBB), or the parallel kernels on one thread (BLAS was called lately) or on all threads (the
# cores are free). Forced here, so every path runs whatever threading layer this machine has.
POOL_MODES = {"serial": (False, False), "pooled-one-thread": (True, False), "pooled-all-threads": (True, True)}


class _AllThreads:
    """Stands in for cpu._SPLIT: every parallel call on all threads, whatever the timings say."""
    @staticmethod
    def next_way(calls=1):
        return 0


def _set_pool_mode(monkeypatch, mode):
    fast, free = POOL_MODES[mode]
    monkeypatch.setattr(cpu, "_pool_is_fast", lambda: fast)
    monkeypatch.setattr(cpu, "_cores_free", lambda: free)
    monkeypatch.setattr(cpu, "_SPLIT", _AllThreads)


def assert_sum_close(actual, expected, n_terms):
    assert isinstance(actual, float)
    np.testing.assert_allclose(actual, float(expected), rtol=RTOL, atol=1e-5 * max(n_terms, 1))


@pytest.fixture
def rng():
    return np.random.default_rng(20240604)


# -- the table --------------------------------------------------------------------------------------


def test_cpu_table_has_every_kernel_with_the_reference_signature():
    table = kernels.kernel_table("cpu")
    assert table.name == "cpu" and kernels.kernel_table("cpu") is table
    for field in kernels.KernelTable.__dataclass_fields__:
        if field == "name":
            continue
        reference = getattr(kernels.REFERENCE, field)
        assert inspect.signature(getattr(table, field)) == inspect.signature(reference), field


def test_unknown_table_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown kernel table 'gpu'"):
        kernels.kernel_table("gpu")


def test_a_cupy_array_gets_the_cupy_module_as_its_namespace(monkeypatch):
    """CuPy 14's ndarray names no array namespace; the reference kernels then use the cupy module."""
    from kernels.namespace import array_namespace

    fake_cupy = type(sys)("cupy")
    FakeArray = type("ndarray", (), {"__module__": "cupy._core.core"})
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    assert array_namespace(FakeArray()) is fake_cupy
    assert array_namespace(np.zeros(2)) is np
    with pytest.raises(TypeError, match="not an array-API array"):
        array_namespace([1.0, 2.0])


def test_importing_kernels_and_the_cpu_table_never_imports_cuda():
    code = ("import sys, kernels; kernels.kernel_table('cpu'); "
            "assert 'numba.cuda' not in sys.modules, 'numba.cuda imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- float32 building blocks ------------------------------------------------------------------------


def _ulp_error(actual, exact):
    """Error in units of the float32 spacing at the exact value (float64)."""
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return np.abs(actual.astype(np.float64) - exact) / spacing


@pytest.fixture(scope="module")
def elementwise():
    from numba import njit

    def vectorised(scalar):
        @njit
        def apply(a, out):
            for i in range(a.size):
                out[i] = scalar(a[i])
        return lambda a: (apply(a, out := np.empty_like(a)), out)[1]

    return {"exp": vectorised(cpu._exp32), "log1p": vectorised(cpu._log1p_unit),
            "tanh": vectorised(cpu._tanh32), "sigmoid": vectorised(cpu._sigmoid32)}


def test_exp32_is_within_2_ulp_and_overflows_and_underflows_like_expf(elementwise):
    x = np.linspace(-87.0, 88.5, 2_000_001, dtype=np.float32)
    assert _ulp_error(elementwise["exp"](x), np.exp(x.astype(np.float64))).max() <= 2
    edge = np.array([-1e4, -104.0, -100.0, -88.0, 88.8, 1e4, np.inf, -np.inf, np.nan], np.float32)
    with np.errstate(over="ignore", under="ignore"):
        expected = np.exp(edge)
    got = elementwise["exp"](edge)
    np.testing.assert_allclose(got[:4], expected[:4], rtol=1e-6, atol=3e-45)   # subnormals: 2 steps
    assert np.isposinf(got[4:7]).all() and got[7] == 0.0 and np.isnan(got[8])


def test_log1p_unit_is_within_4_ulp_on_zero_to_one(elementwise):
    e = np.concatenate([np.linspace(0.0, 1.0, 1_000_001, dtype=np.float32),
                        np.logspace(-44, -1, 10_000).astype(np.float32)])
    e = e[e > 0]
    assert _ulp_error(elementwise["log1p"](e), np.log1p(e.astype(np.float64))).max() <= 4


def test_tanh32_within_7_ulp_and_sigmoid32_within_4_ulp_of_float64(elementwise):
    x = np.linspace(-12.0, 12.0, 2_000_001, dtype=np.float32)
    x64 = x.astype(np.float64)
    tanh = elementwise["tanh"](x)
    assert _ulp_error(tanh, np.tanh(x64)).max() <= 7          # the rational form; 4e-7 absolute
    sig_exact = 1.0 / (1.0 + np.exp(-x64))
    assert _ulp_error(elementwise["sigmoid"](x), sig_exact).max() <= 4
    big = np.array([-1e4, -100.0, 100.0, 1e4], np.float32)
    np.testing.assert_array_equal(elementwise["tanh"](big), [-1, -1, 1, 1])
    assert np.isnan(elementwise["tanh"](np.array([np.nan], np.float32))).all()
    np.testing.assert_array_equal(elementwise["sigmoid"](big)[2:], [1, 1])
    assert (elementwise["sigmoid"](big)[:2] < 1e-43).all()


# -- 1. reparameterization + KL -----------------------------------------------------------------


@pytest.mark.parametrize("n_rows,n_latent", [(1, 20), (4, 200), (128, 20), (512, 64), (3, 5), (0, 20)])
@pytest.mark.parametrize("logvar_scale", [1.0, 30.0])
def test_reparameterize_kl_matches_reference(rng, n_rows, n_latent, logvar_scale):
    stats = np.concatenate([f32(rng, (n_rows, n_latent)),
                            np.clip(f32(rng, (n_rows, n_latent), logvar_scale), -30, 30)], axis=1)
    eps = f32(rng, (n_rows, n_latent))
    z_ref, z_cpu = np.empty_like(eps), np.full_like(eps, np.nan)
    kl_ref = reparameterize_kl_reference(stats, eps, z_ref)
    kl_cpu = cpu.reparameterize_kl_cpu(stats, eps, z_cpu)
    np.testing.assert_allclose(z_cpu, z_ref, rtol=RTOL, atol=1e-6)
    assert_sum_close(kl_cpu, kl_ref, eps.size)


@pytest.mark.parametrize("n_rows,n_latent", [(1, 20), (4, 200), (128, 20), (512, 64), (3, 5), (0, 20)])
@pytest.mark.parametrize("logvar_scale", [1.0, 30.0])
def test_reparameterize_kl_backward_matches_reference(rng, n_rows, n_latent, logvar_scale):
    stats = np.concatenate([f32(rng, (n_rows, n_latent)),
                            np.clip(f32(rng, (n_rows, n_latent), logvar_scale), -30, 30)], axis=1)
    eps, dz = f32(rng, (n_rows, n_latent)), f32(rng, (n_rows, n_latent), 0.1)
    d_ref, d_cpu = np.empty_like(stats), np.full_like(stats, np.nan)
    reparameterize_kl_backward_reference(stats, eps, dz, 0.7, d_ref)
    assert cpu.reparameterize_kl_backward_cpu(stats, eps, dz, 0.7, d_cpu) is None
    np.testing.assert_allclose(d_cpu, d_ref, rtol=RTOL, atol=1e-6)


def test_reparameterize_kl_at_logvar_plus_minus_30_is_finite_and_exact_ish():
    stats = np.array([[0.5, -1.0, 30.0, -30.0]], np.float32)
    eps = np.array([[1.0, 2.0]], np.float32)
    z = np.empty_like(eps)
    kl = cpu.reparameterize_kl_cpu(stats, eps, z)
    np.testing.assert_allclose(z, [[0.5 + math.exp(15.0), -1.0 + 2.0 * math.exp(-15.0)]], rtol=1e-6)
    exact = -0.5 * ((1 + 30 - 0.25 - math.exp(30)) + (1 - 30 - 1.0 - math.exp(-30)))
    assert math.isfinite(kl) and kl == pytest.approx(exact, rel=1e-6)
    dstats = np.empty_like(stats)
    cpu.reparameterize_kl_backward_cpu(stats, eps, np.ones_like(eps), 1.0, dstats)
    assert np.isfinite(dstats).all()
    np.testing.assert_allclose(dstats[0, 2], 0.5 * math.exp(15) + 0.5 * (math.exp(30) - 1), rtol=1e-6)


# -- 2. likelihoods -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("logit_scale", [1.0, 10.0])
def test_bernoulli_nll_grad_matches_reference(rng, shape, logit_scale):
    logits, x = f32(rng, shape, logit_scale), rng.random(shape, dtype=np.float32)
    x[: shape[0] // 2] = x[: shape[0] // 2] > 0.5          # binary and grey-level targets
    grad_scale = 1.0 / max(shape[0], 1)
    d_ref, d_cpu = np.empty_like(logits), np.full_like(logits, np.nan)
    nll_ref = bernoulli_nll_grad_reference(logits, x, grad_scale, d_ref)
    nll_cpu = cpu.bernoulli_nll_grad_cpu(logits, x, grad_scale, d_cpu)
    np.testing.assert_allclose(d_cpu, d_ref, rtol=RTOL, atol=1e-6 * grad_scale)
    assert_sum_close(nll_cpu, nll_ref, logits.size)


@pytest.mark.parametrize("magnitude", [100.0, 1e4])
def test_bernoulli_at_huge_logits_is_finite_with_exact_gradient(magnitude):
    logits = np.array([[magnitude, -magnitude, magnitude, -magnitude, magnitude, -magnitude]], np.float32)
    x = np.array([[1.0, 0.0, 0.0, 1.0, 0.5, 0.5]], np.float32)
    dlogits = np.empty_like(logits)
    nll = cpu.bernoulli_nll_grad_cpu(logits, x, 0.5, dlogits)
    # softplus(l) - x l: 0, 0, m, m, m/2, m/2 (plus log1p(exp(-m)), below float32 resolution)
    assert math.isfinite(nll) and nll == pytest.approx(3 * magnitude, rel=1e-6)
    np.testing.assert_allclose(dlogits, 0.5 * np.array([[0, 0, 1, -1, 0.5, -0.5]]), rtol=0, atol=1e-30)
    d_ref = np.empty_like(logits)
    np.testing.assert_allclose(nll, bernoulli_nll_grad_reference(logits, x, 0.5, d_ref), rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("logvar", [0.0, -2.5, 3.0])
def test_gaussian_nll_grad_matches_reference(rng, shape, logvar):
    mean, x = rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32)
    grad_scale = 1.0 / max(shape[0], 1)
    d_ref, d_cpu = np.empty_like(mean), np.full_like(mean, np.nan)
    nll_ref = gaussian_nll_grad_reference(mean, x, logvar, grad_scale, d_ref)
    nll_cpu = cpu.gaussian_nll_grad_cpu(mean, x, logvar, grad_scale, d_cpu)
    np.testing.assert_allclose(d_cpu, d_ref, rtol=RTOL, atol=1e-6 * grad_scale)
    assert_sum_close(nll_cpu, nll_ref, mean.size)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("logvar_scale", [1.0, 30.0])
def test_gaussian_learned_nll_grad_matches_reference(rng, shape, logvar_scale):
    n_rows, n_pixels = shape
    out = np.concatenate([rng.random(shape, dtype=np.float32),
                          np.clip(f32(rng, shape, logvar_scale), -30, 30)], axis=1)
    x = rng.random(shape, dtype=np.float32)
    grad_scale = 1.0 / max(n_rows, 1)
    d_ref, d_cpu = np.empty_like(out), np.full_like(out, np.nan)
    nll_ref = gaussian_learned_nll_grad_reference(out, x, grad_scale, d_ref)
    nll_cpu = cpu.gaussian_learned_nll_grad_cpu(out, x, grad_scale, d_cpu)
    np.testing.assert_allclose(d_cpu, d_ref, rtol=RTOL, atol=1e-6 * grad_scale)
    mean64, logvar64 = out[:, :n_pixels].astype(np.float64), out[:, n_pixels:].astype(np.float64)
    terms = ((mean64 - x) ** 2 * np.exp(-logvar64) + np.abs(logvar64)).sum()   # scale of the sum
    np.testing.assert_allclose(nll_cpu, float(nll_ref), rtol=0, atol=RTOL * terms + 1e-5 * x.size)


def test_empty_batch_gives_zero_loss():
    empty = np.zeros((0, 784), np.float32)
    assert cpu.bernoulli_nll_grad_cpu(empty, empty, 1.0, empty.copy()) == 0.0
    assert cpu.gaussian_nll_grad_cpu(empty, empty, 0.3, 1.0, empty.copy()) == 0.0
    assert cpu.gaussian_learned_nll_grad_cpu(np.zeros((0, 1568), np.float32), empty, 1.0,
                                             np.zeros((0, 1568), np.float32)) == 0.0
    assert cpu.reparameterize_kl_cpu(np.zeros((0, 40), np.float32), np.zeros((0, 20), np.float32),
                                     np.zeros((0, 20), np.float32)) == 0.0


def test_nan_in_the_logits_reaches_the_loss():
    logits = np.zeros((2, 3), np.float32)
    logits[1, 2] = np.nan
    assert math.isnan(cpu.bernoulli_nll_grad_cpu(logits, np.zeros_like(logits), 1.0, np.empty_like(logits)))


# -- 3. Adam ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 1000, 869_184])
@pytest.mark.parametrize("weight_decay,clip_norm", [(0.0, 0.0), (0.01, 0.0), (0.0, 1.0), (0.01, 1e4)])
def test_adam_step_matches_reference_over_several_steps(rng, n, weight_decay, clip_norm):
    params = f32(rng, n)
    ref = [params.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)]
    out = [params.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)]
    for step in range(1, 4):
        grads = f32(rng, n, 0.1)
        norm_ref = adam_step_reference(*ref[:1], grads, *ref[1:], step, 1e-3, weight_decay=weight_decay,
                                       clip_norm=clip_norm)
        norm_cpu = cpu.adam_step_cpu(*out[:1], grads, *out[1:], step, 1e-3, weight_decay=weight_decay,
                                     clip_norm=clip_norm)
        assert isinstance(norm_cpu, float)
        assert norm_cpu == pytest.approx(norm_ref, rel=RTOL)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-7)


def test_adam_clipping_bounds_the_effective_gradient(rng):
    params, grads = np.zeros(100, np.float32), np.full(100, 3.0, np.float32)   # norm 30
    m, v = np.zeros(100, np.float32), np.zeros(100, np.float32)
    norm = cpu.adam_step_cpu(params, grads, m, v, 1, 1e-3, clip_norm=1.0)
    assert norm == pytest.approx(30.0, rel=1e-6)
    np.testing.assert_allclose(m, 0.1 * 3.0 / 30.0, rtol=1e-5)              # (1 - b1) * g * clip / norm


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_adam_norm_reports_nan_and_inf_gradients(bad, clip_norm):
    grads = np.ones(1000, np.float32)
    grads[7] = bad
    z = np.zeros(1000, np.float32)
    norm = cpu.adam_step_cpu(z.copy(), grads, z.copy(), z.copy(), 1, 1e-3, clip_norm=clip_norm)
    assert math.isnan(norm) if np.isnan(bad) else math.isinf(norm)


def test_adam_does_not_modify_the_gradients(rng):
    grads = f32(rng, 500)
    before = grads.copy()
    cpu.adam_step_cpu(f32(rng, 500), grads, np.zeros(500, np.float32), np.zeros(500, np.float32), 1, 1e-3,
                      clip_norm=0.5)
    np.testing.assert_array_equal(grads, before)


def test_parallel_adam_matches_serial(rng, monkeypatch):
    n = cpu.ADAM_PARALLEL_MIN + 12345
    params, grads = f32(rng, n), f32(rng, n, 0.1)
    runs = {}
    for mode in POOL_MODES:
        _set_pool_mode(monkeypatch, mode)
        state = [params.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)]
        norm = cpu.adam_step_cpu(state[0], grads, *state[1:], 1, 1e-3, clip_norm=1.0)
        runs[mode] = norm, state
    for mode in ("pooled-one-thread", "pooled-all-threads"):
        assert runs[mode][0] == runs["serial"][0]                 # clipping's norm is always serial
        for a, b in zip(runs[mode][1], runs["serial"][1]):
            np.testing.assert_array_equal(a, b)                   # so a resumed run repeats bit for bit


def _layer_blocks(dims):
    """The (offset, n_in, n_out) rows of [W; b] blocks of these (n_in, n_out) layers, and their total size."""
    rows, offset = [], 0
    for n_in, n_out in dims:
        rows.append((offset, n_in, n_out))
        offset += (n_in + 1) * n_out
    return np.array(rows, np.int64), offset


@pytest.mark.parametrize("dims", [[(784, 400), (400, 40), (20, 400), (400, 784)], [(3, 5), (600, 700)]])
def test_adam_by_layer_rows_updates_every_element_as_the_flat_kernel(rng, monkeypatch, dims):
    """``blocks`` only changes which thread updates which element: the same bits in every mode, and
    the same norm up to float32 rounding (its float32 partial sums start at other elements)."""
    blocks, n = _layer_blocks(dims)
    params, grads = f32(rng, n), f32(rng, n, 0.1)
    runs = {}
    for mode in POOL_MODES:
        for hint in (None, blocks):
            _set_pool_mode(monkeypatch, mode)
            state = [params.copy(), np.full(n, 0.01, np.float32), np.full(n, 0.02, np.float32)]
            norm = cpu.adam_step_cpu(state[0], grads, *state[1:], 3, 1e-3, weight_decay=0.1, blocks=hint)
            runs[mode, hint is None] = norm, state
    serial_norm, serial_state = runs["serial", True]
    for norm, state in runs.values():
        assert norm == pytest.approx(serial_norm, rel=1e-6)
        for a, b in zip(state, serial_state):
            np.testing.assert_array_equal(a, b)
    ref = [params.copy(), np.full(n, 0.01, np.float32), np.full(n, 0.02, np.float32)]
    adam_step_reference(ref[0], grads, ref[1], ref[2], 3, 1e-3, weight_decay=0.1, blocks=blocks)
    np.testing.assert_allclose(serial_state[0], ref[0], rtol=RTOL, atol=1e-6)


def test_adam_without_weight_decay_is_compiled_without_it_and_gives_the_same_bits(rng):
    """No weight decay reaches the kernels as None (``_adam_constants``), which compiles the update
    without the decay's multiply-add: the same bits as a decay of 0.0, and another compiled signature."""
    n = 10_000
    params, grads, m, v = f32(rng, n), f32(rng, n, 0.1), f32(rng, n, 0.01), np.abs(f32(rng, n, 0.01))
    constants = cpu._adam_constants(3, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0)
    assert constants[-1] is None
    runs = []
    for decay in (None, 0.0):
        state = [a.copy() for a in (params, grads, m, v)]
        runs.append((cpu._adam_serial(*state, *constants[:-1], decay, False), state))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)
    decays = {sig[-2] for sig in cpu._adam_serial.signatures}
    assert {numba_types.none, numba_types.float64} <= decays


@pytest.mark.parametrize("blocks", [np.array([[0, 3, 4]], np.int64),                # covers 16 of 20
                                    np.array([[0, 3, 4], [17, 0, 1]], np.int64),     # a gap, n_in 0
                                    np.array([[0, 3, 5]], np.int32),                 # not int64
                                    np.zeros((0, 3), np.int64)])
def test_adam_refuses_blocks_that_do_not_tile_the_buffer(blocks):
    z = np.zeros(20, np.float32)
    with pytest.raises(ValueError, match="blocks"):
        cpu.adam_step_cpu(z.copy(), z.copy(), z.copy(), z.copy(), 1, 1e-3, blocks=blocks)


# -- a layer's gradients and Adam update in one call -------------------------------------------------


def _layer_state(rng, n_in, n_out, batch):
    """x, delta and a buffer holding one layer's [W; b] block between two other parameters, with its
    bias gradient already in place (as the engine's bias_act_backward leaves it)."""
    block = (1, n_in, n_out)
    n = 1 + (n_in + 1) * n_out + 1
    params, grads = f32(rng, n), f32(rng, n, 0.1)
    m, v = f32(rng, n, 0.01), np.abs(f32(rng, n, 0.01))
    return f32(rng, (batch, n_in)), f32(rng, (batch, n_out), 0.1), [params, grads, m, v], block


def _run_layer(kernel, x, delta, state, block, with_dx, **adam):
    state = [a.copy() for a in state]
    dx = np.full(x.shape, np.nan, np.float32) if with_dx else None
    squares = kernel(x, delta, *state, block, dx, 3, 1e-3, **adam)
    return squares, state, dx


@pytest.mark.parametrize("mode", POOL_MODES)
@pytest.mark.parametrize("n_in,n_out,batch",
                         [(784, 400, 4), (9, 5, 1), (3, 40, 7), (20, 33, 8), (9, 5, 16), (9, 5, 0)])
@pytest.mark.parametrize("with_dx", [True, False])
def test_layer_backward_adam_matches_reference(rng, monkeypatch, mode, n_in, n_out, batch, with_dx):
    """Fused at a batch of 1 to CPU_SMALL_BATCH on a fast pool (n_in 3 leaves chunks with no rows; batch
    16 or 0 and the serial mode take the plain kernels); the elements outside the block stay as they were."""
    _set_pool_mode(monkeypatch, mode)
    x, delta, state, block = _layer_state(rng, n_in, n_out, batch)
    adam = dict(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01)
    squares, out, dx = _run_layer(cpu.layer_backward_adam_cpu, x, delta, state, block, with_dx, **adam)
    squares_ref, ref, dx_ref = _run_layer(layer_backward_adam_reference, x, delta, state, block, with_dx, **adam)
    assert isinstance(squares, float)
    assert_sum_close(squares, squares_ref, (n_in + 1) * n_out)
    if with_dx:
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5 * math.sqrt(n_out))
    offset, w_end = block[0], block[0] + n_in * n_out
    grads, grads_ref = out.pop(1), ref.pop(1)       # grads' W part is the kernel's scratch; the rest is input
    w_part = np.s_[offset:w_end]
    np.testing.assert_array_equal(np.delete(grads, w_part), np.delete(grads_ref, w_part))
    for a, b in zip(out, ref):
        assert a[0] == b[0] and a[-1] == b[-1]
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6)


def test_fused_layer_update_gives_the_same_bits_on_one_thread_or_all(rng, monkeypatch):
    x, delta, state, block = _layer_state(rng, 784, 400, 4)
    runs = []
    for mode in ("pooled-one-thread", "pooled-all-threads"):
        _set_pool_mode(monkeypatch, mode)
        runs.append(_run_layer(cpu.layer_backward_adam_cpu, x, delta, state, block, True))
    assert runs[0][0] == runs[1][0]
    for a, b in zip([*runs[0][1], runs[0][2]], [*runs[1][1], runs[1][2]]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch", [1, 4, 5, 8])
def test_fused_layer_update_updates_as_adam_does_from_the_same_gradient(rng, monkeypatch, batch):
    """The fused pass, which never stores dW, updates every parameter as adam_step_cpu does from the
    small-batch weight gradient, but for the last bits of that gradient's sum (batches of one and of
    two blocks of four rows, full or padded with zeros)."""
    _set_pool_mode(monkeypatch, "pooled-all-threads")
    x, delta, state, (offset, n_in, n_out) = _layer_state(rng, 784, 400, batch)
    _, fused, _ = _run_layer(cpu.layer_backward_adam_cpu, x, delta, state, (offset, n_in, n_out), False)
    plain = [a.copy() for a in state]
    end = offset + n_in * n_out
    cpu.matmul_cpu(x.T, delta, plain[1][offset:end].reshape(n_in, n_out))
    block = slice(offset, end + n_out)
    cpu.adam_step_cpu(*(a[block] for a in plain), 3, 1e-3)
    params, m, v = (0, 2, 3)
    np.testing.assert_allclose(fused[params], plain[params], rtol=0, atol=1e-6)
    np.testing.assert_allclose(fused[m], plain[m], rtol=1e-5, atol=1e-8)     # m near 0: 0.9 m cancels 0.1 g
    np.testing.assert_allclose(fused[v], plain[v], rtol=1e-5, atol=1e-12)
    assert np.array_equal(fused[1][end:], plain[1][end:])     # the bias gradient, an input, untouched


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_fused_layer_update_reports_nan_and_inf_gradients(rng, monkeypatch, bad):
    _set_pool_mode(monkeypatch, "pooled-all-threads")
    x, delta, state, block = _layer_state(rng, 30, 20, 4)
    delta[2, 7] = bad
    squares, _, _ = _run_layer(cpu.layer_backward_adam_cpu, x, delta, state, block, True)
    assert math.isnan(squares) if np.isnan(bad) else math.isinf(squares)


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_weight_squares_from_the_gram_matrices_are_the_gradients_squares(rng, batch):
    """The fused update's weight-gradient norm comes from x x.T and d d.T, not from the gradient."""
    x, d = f32(rng, (batch, 300)), f32(rng, (batch, 70), 0.1)
    g = x.astype(np.float64).T @ d.astype(np.float64)
    assert cpu._weight_squares(x, d) == pytest.approx(float(np.sum(g * g)), rel=1e-12)


def test_weight_squares_of_a_gradient_that_cancels_are_zero_not_negative(rng):
    """Two equal images with opposite deltas: the gradient is exactly 0, the Gram terms are not."""
    x, d = np.repeat(f32(rng, (1, 300)), 2, axis=0), f32(rng, (1, 70), 0.1)
    d = np.concatenate([d, -d])
    squares = cpu._weight_squares(x, d)
    assert 0.0 <= squares <= 1e-9 * float(np.sum(x[0] ** 2)) * float(np.sum(d[0] ** 2))


def test_fused_layer_update_reports_an_overflowing_gradient_as_inf(rng, monkeypatch):
    """Finite inputs whose gradient element passes float32's range: Inf, as the reference's float32 dW."""
    _set_pool_mode(monkeypatch, "pooled-all-threads")
    x, delta, state, block = _layer_state(rng, 30, 20, 4)
    x[1, 3], delta[1, 5] = 1e20, 1e20
    squares, _, _ = _run_layer(cpu.layer_backward_adam_cpu, x, delta, state, block, True)
    with np.errstate(over="ignore", invalid="ignore"):
        squares_ref, _, _ = _run_layer(layer_backward_adam_reference, x, delta, state, block, True)
    assert math.isinf(squares) and math.isinf(squares_ref)


def test_fused_layer_update_refuses_what_it_cannot_do(rng):
    x, delta, state, block = _layer_state(rng, 9, 5, 4)
    with pytest.raises(ValueError, match="does not fit"):
        cpu.layer_backward_adam_cpu(x, delta, *state, (10, 9, 5), None, 1, 1e-3)
    with pytest.raises(ValueError, match="delta"):
        cpu.layer_backward_adam_cpu(x, delta[:, :4].copy(), *state, block, None, 1, 1e-3)
    with pytest.raises(ValueError, match="overlap"):
        cpu.layer_backward_adam_cpu(x, delta, *state, block, x, 1, 1e-3)
    with pytest.raises(ValueError, match="x"):
        cpu.layer_backward_adam_cpu(x.astype(np.float64), delta, *state, block, None, 1, 1e-3)
    params, grads, m, v = state
    # each flat buffer named when it is wrong (one fast check, then the per-buffer messages)
    for bad, name in [((params, grads, m.astype(np.float64), v), "m: .*float64"),
                      ((params, grads[:-1], m, v), r"grads: expected shape"),
                      ((params, grads, m, np.zeros(2 * v.size, np.float32)[::2]), "v: .*not C-contiguous"),
                      ((params.reshape(1, -1), grads, m, v), "params: expected shape"),
                      ((params, list(grads), m, v), "grads: .*got list")]:
        with pytest.raises(ValueError, match=name):
            cpu.layer_backward_adam_cpu(x, delta, *bad, block, None, 1, 1e-3)
    big = np.zeros(2 * params.size, np.float32)
    with pytest.raises(ValueError, match="overlap"):                   # dx inside a flat buffer
        cpu.layer_backward_adam_cpu(x, delta, big[:params.size], grads, m, v, block,
                                    big[params.size - 3:params.size - 3 + x.size].reshape(x.shape), 1, 1e-3)


@pytest.mark.parametrize("shape", [(128, 784), (257, 300)])
def test_bernoulli_loss_gives_the_same_bits_on_one_thread_or_all(rng, monkeypatch, shape):
    """Above LOSS_PARALLEL_MIN elements the loss runs over Numba's threads; its gradient and its
    total are the serial kernel's bit for bit (rows summed alone, then added in order)."""
    assert shape[0] * shape[1] >= cpu.LOSS_PARALLEL_MIN
    logits, x = f32(rng, shape, 3.0), rng.random(shape, dtype=np.float32)
    runs = []
    for mode in POOL_MODES:
        _set_pool_mode(monkeypatch, mode)
        grad = np.empty(shape, np.float32)
        runs.append((cpu.bernoulli_nll_grad_cpu(logits, x, 0.01, grad), grad))
    for total, grad in runs[1:]:
        assert total == runs[0][0]
        np.testing.assert_array_equal(grad, runs[0][1])


@pytest.mark.parametrize("mode", POOL_MODES)
def test_adam_flushes_subnormal_moments_to_zero_every_few_steps(monkeypatch, mode):
    """Where the gradient stays 0, m decays by beta1 per step into float32's subnormal range, where
    arithmetic is slow; every cpu._FLUSH_EVERY-th step the CPU kernel stores 0 instead, and keeps every
    normal value as the reference. The steps between keep the reference's subnormals, bit for bit."""
    _set_pool_mode(monkeypatch, mode)
    tiny = np.finfo(np.float32).tiny
    n = 1 << 19                                       # above ADAM_PARALLEL_MIN: the parallel kernel too
    m = np.resize(np.array([1.1 * tiny, 0.5 * tiny, 1e-3, -1.05 * tiny], np.float32), n)   # 0.9 m subnormal
    v = np.resize(np.array([1.0005 * tiny, 1e-6, 1e-6, 0.5 * tiny], np.float32), n)        # 0.999 v subnormal
    params, grads = np.ones(n, np.float32), np.zeros(n, np.float32)
    for step in (cpu._FLUSH_EVERY - 1, cpu._FLUSH_EVERY):
        out, ref = [params.copy(), m.copy(), v.copy()], [params.copy(), m.copy(), v.copy()]
        cpu.adam_step_cpu(out[0], grads, out[1], out[2], step, 1e-3)
        adam_step_reference(ref[0], grads, ref[1], ref[2], step, 1e-3)
        assert np.all(ref[1][:4][[0, 1, 3]] != 0) and ref[2][0] != 0          # subnormal in the reference
        if step % cpu._FLUSH_EVERY:
            np.testing.assert_array_equal(out[1], ref[1])
            np.testing.assert_array_equal(out[2], ref[2])
        else:
            assert np.all(out[1][:4][[0, 1, 3]] == 0) and out[2][0] == 0 and out[2][3] == 0
            np.testing.assert_allclose(out[1][2::4], ref[1][2::4], rtol=RTOL)
            np.testing.assert_allclose(out[2][1::4], ref[2][1::4], rtol=RTOL)
        np.testing.assert_allclose(out[0], ref[0], rtol=RTOL)                  # the flushed terms moved nothing


def test_fused_layer_update_flushes_on_the_step_its_knob_says(rng, monkeypatch):
    """The small-batch update reads Adam's step from its knob and flushes on every cpu._FLUSH_EVERY-th:
    a replayed step decides when it runs, not when it was recorded."""
    _set_pool_mode(monkeypatch, "pooled-all-threads")
    x, delta, state, (offset, n_in, n_out) = _layer_state(rng, 40, 24, 4)
    x[:, 7] = 0                                       # row 7 of W gets no gradient
    row = slice(offset + 7 * n_out, offset + 8 * n_out)
    state[2][row] = 1.05 * np.finfo(np.float32).tiny  # m: 0.9 m is subnormal
    count = np.empty(1)
    for step in (cpu._FLUSH_EVERY - 1, cpu._FLUSH_EVERY, 2 * cpu._FLUSH_EVERY + 1):
        count[0] = step
        out = [a.copy() for a in state]
        cpu.layer_backward_adam_cpu(x, delta, *out, (offset, n_in, n_out), None, count, 1e-3)
        m_row = out[2][row]
        if step % cpu._FLUSH_EVERY:
            assert np.all(m_row != 0) and np.all(np.abs(m_row) < np.finfo(np.float32).tiny)
        else:
            assert np.all(m_row == 0)


def test_adam_norm_sums_many_blocks_accurately(rng):
    n = 7 * cpu._SUM_BLOCK + 123
    grads = f32(rng, n)
    z = np.zeros(n, np.float32)
    exact = math.sqrt(float(np.sum(grads.astype(np.float64) ** 2)))
    assert cpu.adam_step_cpu(z.copy(), grads, z.copy(), z.copy(), 1, 1e-3) == pytest.approx(exact, rel=1e-6)
    assert cpu.adam_step_cpu(z.copy(), grads, z.copy(), z.copy(), 1, 1e-3, clip_norm=1.0) == pytest.approx(exact, rel=1e-6)


# -- 4. bias + activation ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 400), (4, 400), (128, 400), (512, 1024), (3, 7), (0, 400)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bias_act_matches_reference(rng, shape, activation):
    h = f32(rng, shape, 3.0)
    bias = f32(rng, shape[1])
    h_ref, h_cpu = h.copy(), h.copy()
    bias_act_reference(h_ref, bias, activation)
    assert cpu.bias_act_cpu(h_cpu, bias, activation) is None
    np.testing.assert_allclose(h_cpu, h_ref, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 400), (4, 400), (128, 400), (512, 1024), (3, 7), (0, 400)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("in_place", [False, True])
def test_bias_act_backward_matches_reference(rng, shape, activation, in_place):
    y = f32(rng, shape)
    bias_act_reference(y, np.zeros(shape[1], np.float32), activation)     # a valid layer output
    dy = f32(rng, shape)
    dpre_ref, dbias_ref = np.empty_like(dy), np.empty(shape[1], np.float32)
    bias_act_backward_reference(dy, y, activation, dpre_ref, dbias_ref)
    dy_cpu = dy.copy()
    dpre_cpu = dy_cpu if in_place else np.full_like(dy, np.nan)
    dbias_cpu = np.full(shape[1], np.nan, np.float32)
    cpu.bias_act_backward_cpu(dy_cpu, y, activation, dpre_cpu, dbias_cpu)
    np.testing.assert_allclose(dpre_cpu, dpre_ref, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(dbias_cpu, dbias_ref, rtol=RTOL, atol=1e-5 * max(shape[0], 1) ** 0.5)


@pytest.mark.parametrize("batch, n_in, n_out", [(4, 784, 400), (16, 784, 400), (128, 400, 784), (128, 20, 400),
                                                (128, 10, 40), (100, 3, 5), (129, 400, 40), (0, 7, 5)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_act_matches_reference(rng, batch, n_in, n_out, activation):
    """Whichever way the CPU table takes a layer's forward (its small-batch kernels up to 8 rows, the
    split over W's rows up to 128, fewer rows of W than parts of 16 floats, BLAS then the bias and
    activation above), it is the reference's."""
    x, W, bias = f32(rng, (batch, n_in)), f32(rng, (n_in, n_out), n_in ** -0.5), f32(rng, n_out)
    out, ref = np.full((batch, n_out), np.nan, np.float32), np.empty((batch, n_out), np.float32)
    assert cpu.linear_act_cpu(x, W, bias, activation, out) is None
    linear_act_reference(x, W, bias, activation, ref)
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=1e-5 * n_in ** 0.5)


@pytest.mark.parametrize("mode", POOL_MODES)
@pytest.mark.parametrize("batch", [1, 4, 7, 8])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_small_batch_forward_gives_the_products_bits_then_bias_act(rng, monkeypatch, mode, batch, activation):
    """Up to CPU_SMALL_BATCH rows, a layer's forward adds the small-batch product's parts with the bias
    and activation in one call: the bits of ``matmul_cpu`` and then ``bias_act_cpu``, in every pool mode."""
    _set_pool_mode(monkeypatch, mode)
    x, W, bias = f32(rng, (batch, 784)), f32(rng, (784, 400), 784 ** -0.5), f32(rng, 400)
    expected = np.empty((batch, 400), np.float32)
    cpu.matmul_cpu(x, W, expected)
    cpu.bias_act_cpu(expected, bias, activation)
    out = np.full((batch, 400), np.nan, np.float32)
    cpu.linear_act_cpu(x, W, bias, activation, out)
    np.testing.assert_array_equal(out, expected)


def test_linear_act_into_its_own_input_and_bad_arguments():
    rng = np.random.default_rng(5)
    x, W, bias = f32(rng, (16, 6)), f32(rng, (6, 6), 0.4), f32(rng, 6)
    ref = np.empty_like(x)
    linear_act_reference(x, W, bias, "tanh", ref)
    cpu.linear_act_cpu(x, W, bias, "tanh", x)                # out is x: NumPy's product, which allows it
    np.testing.assert_allclose(x, ref, rtol=RTOL, atol=1e-6)
    out = np.empty((16, 6), np.float32)
    with pytest.raises(ValueError, match="bias: expected shape"):
        cpu.linear_act_cpu(x, W, bias[:4].copy(), "relu", out)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        cpu.linear_act_cpu(x, W, bias, "gelu", out)
    with pytest.raises(ValueError, match="(?i)out"):
        cpu.linear_act_cpu(x, W, bias, "relu", np.empty((16, 5), np.float32))


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_bias_act_saturates_cleanly_at_huge_inputs(activation):
    h = np.array([[-1e4, -100.0, 100.0, 1e4]], np.float32)
    h_ref = h.copy()
    cpu.bias_act_cpu(h, np.zeros(4, np.float32), activation)
    with np.errstate(over="ignore"):
        bias_act_reference(h_ref, np.zeros(4, np.float32), activation)
    np.testing.assert_allclose(h, h_ref, rtol=0, atol=1e-30)


def test_unknown_activation_is_rejected():
    h = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        cpu.bias_act_cpu(h, np.zeros(3, np.float32), "gelu")


# -- the training step allocates nothing ----------------------------------------------------------


def test_cpu_kernels_allocate_no_arrays_once_warm(rng):
    import tracemalloc

    n_rows, n_latent, n_pixels = 128, 20, 784
    stats, eps = f32(rng, (n_rows, 2 * n_latent)), f32(rng, (n_rows, n_latent))
    z, dstats = np.empty_like(eps), np.empty_like(stats)
    logits, x, dlogits = f32(rng, (n_rows, n_pixels)), rng.random((n_rows, n_pixels), dtype=np.float32), \
        np.empty((n_rows, n_pixels), np.float32)
    out, dout = f32(rng, (n_rows, 2 * n_pixels)), np.empty((n_rows, 2 * n_pixels), np.float32)
    params, grads = f32(rng, 100_000), f32(rng, 100_000)
    m, v = np.zeros_like(params), np.zeros_like(params)
    h, bias, dbias = f32(rng, (n_rows, 400)), f32(rng, 400), np.empty(400, np.float32)

    def step():
        cpu.reparameterize_kl_cpu(stats, eps, z)
        cpu.reparameterize_kl_backward_cpu(stats, eps, z, 1.0, dstats)
        cpu.bernoulli_nll_grad_cpu(logits, x, 0.01, dlogits)
        cpu.gaussian_nll_grad_cpu(logits, x, 0.0, 0.01, dlogits)
        cpu.gaussian_learned_nll_grad_cpu(out, x, 0.01, dout)
        cpu.adam_step_cpu(params, grads, m, v, 1, 1e-3, weight_decay=0.01, clip_norm=1.0)
        for activation in ACTIVATIONS:
            cpu.bias_act_cpu(h, bias, "tanh")
            cpu.bias_act_backward_cpu(h, h, activation, h, dbias)

    step()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(3):
            step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before < 16_384, f"{peak - before} bytes allocated at peak (the smallest array is 1600)"


# -- argument checks ------------------------------------------------------------------------------


def test_non_contiguous_wrong_dtype_and_wrong_shape_are_rejected():
    a = np.zeros((4, 10), np.float32)
    out = np.zeros((4, 10), np.float32)
    with pytest.raises(ValueError, match="logits: .*not C-contiguous"):
        cpu.bernoulli_nll_grad_cpu(np.zeros((4, 20), np.float32)[:, ::2], a, 1.0, out)
    with pytest.raises(ValueError, match="x: .*not C-contiguous"):
        cpu.bernoulli_nll_grad_cpu(a, np.asfortranarray(np.zeros((4, 10), np.float32)), 1.0, out)
    with pytest.raises(ValueError, match="float32"):
        cpu.bernoulli_nll_grad_cpu(a, a.astype(np.float64), 1.0, out)
    with pytest.raises(ValueError, match=r"dlogits_out: expected shape \(4, 10\)"):
        cpu.bernoulli_nll_grad_cpu(a, a, 1.0, np.zeros((4, 11), np.float32))
    with pytest.raises(ValueError, match=r"stats: expected shape \(4, 10\)"):
        cpu.reparameterize_kl_cpu(np.zeros((4, 9), np.float32), np.zeros((4, 5), np.float32),
                                  np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="grads"):
        cpu.adam_step_cpu(np.zeros(8, np.float32), np.zeros(16, np.float32)[::2],
                          np.zeros(8, np.float32), np.zeros(8, np.float32), 1, 1e-3)
    with pytest.raises(ValueError, match="bias"):
        cpu.bias_act_cpu(a, np.zeros(9, np.float32), "relu")


# -- the references stay portable ---------------------------------------------------------------------


def test_references_run_under_array_api_strict(rng):
    xp = pytest.importorskip("array_api_strict")
    logits, x = f32(rng, (3, 5)), rng.random((3, 5), dtype=np.float32)
    d_np = np.empty_like(logits)
    d_xp = xp.asarray(np.empty_like(logits))
    expected = bernoulli_nll_grad_reference(logits, x, 0.5, d_np)
    got = bernoulli_nll_grad_reference(xp.asarray(logits), xp.asarray(x), 0.5, d_xp)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(d_xp), d_np, rtol=1e-6)
    stats, eps = f32(rng, (3, 4)), f32(rng, (3, 2))
    z = xp.asarray(np.empty((3, 2), np.float32))
    reparameterize_kl_reference(xp.asarray(stats), xp.asarray(eps), z)
    reparameterize_kl_backward_reference(xp.asarray(stats), xp.asarray(eps), xp.asarray(eps), 1.0,
                                         xp.asarray(np.empty_like(stats)))
    gaussian_nll_grad_reference(xp.asarray(logits), xp.asarray(x), 0.1, 1.0, xp.asarray(d_np))
    gaussian_learned_nll_grad_reference(xp.asarray(np.concatenate([logits, logits], 1)), xp.asarray(x), 1.0,
                                        xp.asarray(np.empty((3, 10), np.float32)))
    p = xp.asarray(f32(rng, 10))
    adam_step_reference(p, xp.asarray(f32(rng, 10)), xp.asarray(np.zeros(10, np.float32)),
                        xp.asarray(np.zeros(10, np.float32)), 1, 1e-3, weight_decay=0.1, clip_norm=1.0)
    for activation in ACTIVATIONS:
        h = xp.asarray(f32(rng, (3, 5)))
        bias_act_reference(h, xp.asarray(f32(rng, 5)), activation)
        bias_act_backward_reference(xp.asarray(f32(rng, (3, 5))), h, activation,
                                    xp.asarray(np.empty((3, 5), np.float32)),
                                    xp.asarray(np.empty(5, np.float32)))


# -- the on-disk cache ----------------------------------------------------------------------------------


def test_second_process_loads_every_kernel_from_the_disk_cache(tmp_path):
    code = """
import json, kernels.cpu as cpu
cpu.warm_up()
kernels = [getattr(cpu, n) for n in dir(cpu) if hasattr(getattr(cpu, n), 'stats')]
stats = [k.stats for k in kernels if k.signatures]
print(json.dumps([sum(s.cache_hits.values()) for s in stats] + [-sum(s.cache_misses.values()) for s in stats]))
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    runs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True,
                           text=True).stdout for _ in range(2)]
    import json

    first, second = (json.loads(r.strip().splitlines()[-1]) for r in runs)
    assert sum(first[len(first) // 2:]) < 0, "the first run should compile"
    # helpers inlined into a cached kernel (the Adam block, say) are not listed when loaded from disk
    half = len(second) // 2
    assert all(m == 0 for m in second[half:]) and all(h > 0 for h in second[:half]), second


# -- 5. matmul with a small batch on one side ------------------------------------------------------
# The three products of a training step, with the batch of B rows: forward x @ W, weight gradient
# x.T @ delta, data gradient delta @ W.T. Batches around the kernels' 4-row blocks and the threshold.
MATMUL_BATCHES = [1, 2, 3, 4, 5, 7, 8, 9, 128]


def _products(rng, batch, n_in, n_out, scale=1.0):
    x, w, d = f32(rng, (batch, n_in), scale), f32(rng, (n_in, n_out)), f32(rng, (batch, n_out))
    return [(x, w, (batch, n_out)), (x.T, d, (n_in, n_out)), (d, w.T, (batch, n_in))]


@pytest.mark.parametrize("mode", list(POOL_MODES))
@pytest.mark.parametrize("batch", MATMUL_BATCHES)
# (2, 9000): wide enough for the forward in parts at a batch of 8, with fewer rows of W than parts
@pytest.mark.parametrize("n_in,n_out", [(784, 400), (400, 40), (3, 5), (1, 9), (2, 9000)])
def test_matmul_matches_reference(rng, monkeypatch, mode, batch, n_in, n_out):
    _set_pool_mode(monkeypatch, mode)
    for a, b, shape in _products(rng, batch, n_in, n_out):
        out, ref = np.full(shape, np.nan, np.float32), np.empty(shape, np.float32)
        cpu.matmul_cpu(a, b, out)
        kernels.REFERENCE.matmul(a, b, ref)
        # float32 sums over up to 784 terms in different orders: atol scaled by sqrt(terms)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * math.sqrt(a.shape[1]))


@pytest.mark.parametrize("batch", [1, 4, 7])
def test_pooled_matmul_gives_the_same_bits_on_one_thread_or_all(rng, monkeypatch, batch):
    """A resumed run must repeat the original bit for bit, whether or not BLAS left the cores free."""
    for a, b, shape in _products(rng, batch, 784, 400):
        results = []
        for mode in ("pooled-one-thread", "pooled-all-threads"):
            _set_pool_mode(monkeypatch, mode)
            results.append(np.empty(shape, np.float32))
            cpu.matmul_cpu(a, b, results[-1])
        np.testing.assert_array_equal(*results)


@pytest.mark.parametrize("batch", [1, 4, 6])
@pytest.mark.parametrize("n_in,n_out", [(9, 5), (784, 400)])      # serial kernels; the forward in parts
def test_matmul_small_batch_keeps_inf_and_nan_where_blas_does(rng, batch, n_in, n_out):
    """The kernels never pad a block with zero rows: 0 * Inf would put NaN where the product has Inf."""
    for a, b, shape in _products(rng, batch, n_in, n_out):
        a = a.copy(order="K")
        a.flat[0], a.flat[-1] = np.inf, np.nan
        out, ref = np.empty(shape, np.float32), np.empty(shape, np.float32)
        cpu.matmul_cpu(a, b, out)
        np.matmul(a, b, out=ref)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
        np.testing.assert_array_equal(np.isinf(out), np.isinf(ref))


@njit
def _rows4_add_plain(y, w, a):
    """cpu._rows4_add one element at a time, its roundings spelled out with cpu._fma32."""
    for r in range(4):
        for j in range(y.shape[1]):
            t = a[4 * r + 1] * w[1, j]
            t = cpu._fma32(a[4 * r], w[0, j], t)
            t = cpu._fma32(a[4 * r + 2], w[2, j], t)
            y[r, j] = y[r, j] + cpu._fma32(a[4 * r + 3], w[3, j], t)


def _rows4_add_rows(y, w, a):
    cpu._rows4_add(y[0], y[1], y[2], y[3], w[0], w[1], w[2], w[3], (a[0], a[1], a[2], a[3], a[4], a[5], a[6],
                   a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]), y.shape[1])


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("n", [0, 1, 7, 15, 16, 17, 47, 400])
def test_the_forwards_four_row_step_gives_its_plain_loops_bits(rng, monkeypatch, lanes, n):
    """The batch-4 forward's inner step (LLVM IR, a vector register of columns at a time, then the last
    ones alone), at AVX2's width and AVX-512's, whichever this machine has."""
    monkeypatch.setattr(cpu, "_LANES", lanes)
    step = njit(_rows4_add_rows)                      # compiled now, at this width
    y, w, a = f32(rng, (4, n)), f32(rng, (4, n)), f32(rng, 16)
    if n > 3:
        w[1, 2], w[3, n - 1], y[2, n - 2] = np.inf, np.nan, -np.inf        # in the vector part and the last
    expected = y.copy()
    _rows4_add_plain(expected, w, a)
    step(y, w, a)
    np.testing.assert_array_equal(y, expected)


def test_matmul_outside_the_small_kernels_goes_to_numpy(rng):
    """float64, a large batch, an output that overlaps an input, B = 0: NumPy's answer, unchanged."""
    x64 = rng.standard_normal((4, 6))
    w64 = rng.standard_normal((6, 3))
    out64 = np.empty((4, 3))
    cpu.matmul_cpu(x64, w64, out64)
    np.testing.assert_allclose(out64, x64 @ w64)
    square = f32(rng, (4, 4))
    expected = square @ square
    cpu.matmul_cpu(square, square.copy(), square)                 # out is the left operand itself
    np.testing.assert_allclose(square, expected, rtol=1e-6)
    empty = np.full((5, 3), np.nan, np.float32)
    cpu.matmul_cpu(np.ones((0, 5), np.float32).T, np.ones((0, 3), np.float32), empty)
    np.testing.assert_array_equal(empty, 0)


def test_a_blas_call_keeps_the_parallel_kernels_off_until_its_threads_rest(rng, monkeypatch):
    """After a matmul goes to OpenBLAS, whose threads then spin for a while, the Numba kernels stay
    serial for kernels.config.CPU_BLAS_SPIN_SECONDS (where Numba's pool is not lent to OpenBLAS)."""
    from kernels import config

    monkeypatch.setattr(config, "CPU_SHARE_BLAS_THREADS", False)
    cpu.matmul_cpu(f32(rng, (64, 32)), f32(rng, (32, 16)), np.empty((64, 16), np.float32))   # BLAS
    assert not cpu._cores_free()
    monkeypatch.setattr(config, "CPU_BLAS_SPIN_SECONDS", 0.0)
    assert cpu._cores_free() == cpu._pool_is_fast()


# -- all threads or one: cpu._SplitChoice -------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _run_calls(choice, clock, calls, seconds_per_call):
    """``calls`` parallel calls costing ``seconds_per_call[way]`` each; the ways chosen, in order."""
    ways = []
    for _ in range(calls):
        way = choice.next_way()
        clock.now += seconds_per_call[way]
        ways.append(way)
    return ways


def test_split_choice_keeps_all_threads_while_they_are_faster():
    clock = _Clock()
    choice = cpu._SplitChoice(clock)
    ways = _run_calls(choice, clock, 200 * choice.WINDOW, (20e-6, 35e-6))
    assert ways[:choice.WINDOW] == [0] * choice.WINDOW          # all threads first, then one, to compare
    assert ways[-100 * choice.WINDOW:].count(1) <= 3 * choice.WINDOW   # one thread only on (rarer) trials
    assert choice.gap > choice.FIRST_RETRY                      # each lost trial waits longer


def test_split_choice_follows_a_busy_core_and_its_end():
    clock = _Clock()
    choice = cpu._SplitChoice(clock)
    _run_calls(choice, clock, 50 * choice.WINDOW, (20e-6, 35e-6))
    # another process takes a core: all threads now wait at every barrier
    busy = _run_calls(choice, clock, (choice.LAST_RETRY + 50) * choice.WINDOW, (1e-3, 40e-6))
    assert busy[-40 * choice.WINDOW:].count(0) < choice.WINDOW   # one thread, but for short trials
    assert choice.way == 1 or choice.phase != "in use"
    # and leaves it again
    idle = _run_calls(choice, clock, (choice.LAST_RETRY + 50) * choice.WINDOW, (20e-6, 35e-6))
    assert idle[-20 * choice.WINDOW:].count(0) >= 18 * choice.WINDOW       # at most one trial of one thread


def test_split_choice_ignores_the_warm_up_window():
    """The first window (the program's warm-up, slow whichever way) decides nothing."""
    clock = _Clock()
    choice = cpu._SplitChoice(clock)
    _run_calls(choice, clock, choice.WINDOW, (100e-6, 20e-6))
    ways = _run_calls(choice, clock, 50 * choice.WINDOW, (20e-6, 35e-6))
    assert ways[:choice.WINDOW] == [0] * choice.WINDOW
    assert ways[-40 * choice.WINDOW:].count(0) >= 36 * choice.WINDOW      # two lost trials of one thread


def test_split_choice_goes_back_to_all_threads_after_a_slow_start():
    """A slow timed window of all threads hands the choice to one thread; all threads take it back
    once they are no slower, even by less than the margin that one thread must win by."""
    clock = _Clock()
    choice = cpu._SplitChoice(clock)
    _run_calls(choice, clock, 4 * choice.WINDOW, (50e-6, 20e-6))
    assert choice.way == 1
    costs = (20e-6, (1.0 + choice.MARGIN / 2) * 20e-6)
    ways = _run_calls(choice, clock, 100 * choice.WINDOW, costs)
    assert ways[-50 * choice.WINDOW:].count(0) > 45 * choice.WINDOW


def test_split_choice_cuts_a_slow_trial_short():
    clock = _Clock()
    choice = cpu._SplitChoice(clock)
    _run_calls(choice, clock, 5 * choice.WINDOW, (1e-3, 40e-6))       # timed both: one thread wins
    assert choice.way == 1
    ways = _run_calls(choice, clock, 30 * choice.WINDOW, (1e-3, 40e-6))
    trial_calls = ways.count(0)
    assert 0 < trial_calls < choice.WINDOW       # a trial ran, and stopped once twice as slow


def test_split_choice_ignores_windows_with_a_pause_in_them():
    clock = _Clock()
    choice = cpu._SplitChoice(clock)
    costs = (20e-6, 35e-6)
    _run_calls(choice, clock, 4 * choice.WINDOW + 1, costs)         # both timed; a new window begun
    assert choice.way == 0 and choice.phase == "in use"
    _run_calls(choice, clock, 10, costs)
    clock.now += 2 * choice.PAUSE_SECONDS                            # the program did something else
    choice.next_way()
    clock.now += costs[0]
    assert choice.calls == 1                                         # so the window starts afresh
    _run_calls(choice, clock, choice.WINDOW, costs)
    assert choice.seconds[0] == pytest.approx(costs[0])              # not inflated by the pause


def test_split_choice_counts_a_replays_launches_as_calls():
    """A replayed step asks once for its pooled launches: its windows time as many calls as single asks."""
    costs = (20e-6, 35e-6)
    single_clock, bulk_clock = _Clock(), _Clock()
    single, bulk = cpu._SplitChoice(single_clock), cpu._SplitChoice(bulk_clock)
    _run_calls(single, single_clock, 40 * single.WINDOW, costs)
    for _ in range(40 * bulk.WINDOW // 7):              # 7 launches a step: windows of 70 calls
        bulk_clock.now += 7 * costs[bulk.next_way(7)]
    assert bulk.seconds == pytest.approx(single.seconds) == list(costs)
    assert bulk.way == single.way == 0


@pytest.mark.parametrize("free, way", [(True, 0), (True, 1), (False, 0)])
def test_a_replay_asks_the_split_choice_once_for_all_its_pooled_launches(monkeypatch, free, way):
    asked, alone, ran = [], [], []

    class Choice:
        @staticmethod
        def next_way(calls=1):
            asked.append(calls)
            return way

    monkeypatch.setattr(cpu, "_SPLIT", Choice)
    monkeypatch.setattr(cpu, "_cores_free", lambda: free)
    monkeypatch.setattr(cpu, "_on_one_thread", lambda kernel, args: alone.append(args[0]) or kernel(*args))
    launches = [cpu.Launch(ran.append, (name,), pooled, None, "") for name, pooled in
                (("a", True), ("b", False), ("c", True), ("d", True))]
    results = [0] * 4
    cpu.replay(cpu.replayable(launches), results)
    assert ran == ["a", "b", "c", "d"] and results == [None] * 4
    assert asked == ([3] if free else [])
    assert alone == (["a", "c", "d"] if way or not free else [])
    asked.clear()
    cpu.replay(cpu.replayable(launches[1:2]), [0])
    assert asked == []                                # nothing pooled: nothing to choose


# -- pixels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [0, 1, 4, 129])
def test_pixels_give_numpys_bits(rng, rows):
    src = rng.integers(0, 256, (rows, 784), dtype=np.uint8)
    if rows:
        src[0, :2] = 0, 255
    expected = src.astype(np.float32)
    np.multiply(expected, np.float32(1.0 / 255.0), out=expected)       # what the NumPy backend did before
    out = np.full(src.shape, np.nan, np.float32)
    cpu.pixels_cpu(src, out)
    np.testing.assert_array_equal(out, expected)
    out[...] = np.nan
    cpu.pixels_cpu(np.asfortranarray(src), out)                          # any layout of the pixels
    np.testing.assert_array_equal(out, expected)


def test_pixels_refuse_other_shapes_and_types():
    out = np.empty((2, 3), np.float32)
    for bad in (np.zeros((2, 4), np.uint8), np.zeros((2, 3), np.float32), [[0, 0, 0], [0, 0, 0]]):
        with pytest.raises(ValueError, match="uint8"):
            cpu.pixels_cpu(bad, out)


# -- noise: normals from uniforms ---------------------------------------------------------------------

# uniforms where the transform's branches meet: r = 0 and the largest r; the quarter turns and
# the uniforms just around them (each quadrant's sign and swap); the smallest nonzero uniform
_NOISE_EDGES = [0.0, 0.0, 1 - 2**-24, 0.25, 2**-24, 0.5, 0.5 - 2**-24, 0.75, 0.125, 0.125,
                0.125 + 2**-24, 0.875, 0.3, 1 - 2**-24, 3 * 2**-24, 0.625, 0.7, 0.25 - 2**-24, 0.7, 0.75 + 2**-24]


@pytest.mark.parametrize("n", [0, 1, 2, 7, len(_NOISE_EDGES), 4096])
def test_normals_from_uniforms_match_the_reference(rng, n):
    """Within 4 ulp of r (the radius): the float64 reference rounded once, against float32 log, square
    root and polynomials; an odd count drops the last pair's sine."""
    u = rng.integers(0, 2**24, kernels.noise.uniform_count(n)).astype(np.float32) * np.float32(2**-24)
    edges = np.array(_NOISE_EDGES, np.float32)[:u.size]
    u[:edges.size] = edges
    out, ref = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    cpu.normal_from_uniform_cpu(u, out)
    kernels.noise.normal_from_uniform_reference(u, ref)
    radius = np.sqrt(-2.0 * np.log1p(-u[0::2].astype(np.float64))).repeat(2)[:n]
    assert np.all(np.abs(out.astype(np.float64) - ref) <= 4 * 2**-24 * radius + 1e-30)
    assert np.all(np.abs(out) <= math.sqrt(48 * math.log(2)) + 1e-6)


def test_normals_from_uniforms_keep_any_shape():
    u = np.linspace(0, 1, 12, endpoint=False, dtype=np.float32)
    out, flat = np.empty((3, 4), np.float32), np.empty(12, np.float32)
    cpu.normal_from_uniform_cpu(u, out)
    cpu.normal_from_uniform_cpu(u, flat)
    np.testing.assert_array_equal(out.reshape(-1), flat)


def test_normals_from_uniforms_refuse_wrong_sizes_and_types():
    with pytest.raises(ValueError, match="u: expected shape"):
        cpu.normal_from_uniform_cpu(np.zeros(6, np.float32), np.empty(7, np.float32))
    with pytest.raises(ValueError, match="out: the cpu kernels need"):
        cpu.normal_from_uniform_cpu(np.zeros(8, np.float32), np.empty(7))


def test_backend_noise_is_standard_normal():
    """A million numbers from the backend's generator: the moments, the mass beyond 1, 2 and 3
    standard deviations, and the largest gap between the empirical and the normal CDF (Kolmogorov-
    Smirnov; 1.63 / sqrt(n) is its 1% critical value) are those of N(0, 1)."""
    from vaecore.backend import make_backend

    backend = make_backend("numpy", seed=0)
    n = 1 << 20
    z = np.empty((n // 64, 64), np.float32)
    backend.normal_into(z, None)
    z = z.reshape(-1).astype(np.float64)
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 4 * se and abs(z.var() - 1) < 4 * math.sqrt(2) * se
    for k in (1, 2, 3):
        tail = math.erfc(k / math.sqrt(2))
        assert abs(np.mean(np.abs(z) > k) - tail) < 4 * math.sqrt(tail * (1 - tail) / n)
    z.sort()
    cdf = 0.5 * np.vectorize(math.erfc)(-z / math.sqrt(2))
    grid = np.arange(1, n + 1) / n
    assert max(np.max(grid - cdf), np.max(cdf - (grid - 1 / n))) < 1.63 / math.sqrt(n)
