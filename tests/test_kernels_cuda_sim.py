"""The CUDA kernels agree with the reference kernels: under Numba's CUDA simulator, and on a real GPU.

One set of tests, two ways to run it:
* ``sim`` -- Numba's CUDA simulator runs the kernels in Python, one thread per CUDA thread, on NumPy
  arrays. It must be switched on (``NUMBA_ENABLE_CUDASIM=1``) before ``numba.cuda`` is first imported,
  so in an ordinary pytest run ``test_cuda_kernels_pass_under_the_simulator`` re-runs this module in a
  child process with the variable set (the parent, and the CPU and PTX tests in it, keep the real
  ``numba.cuda``). Launch sizes are shrunk to 4 threads per block and at most 3 blocks so grid-stride
  loops, several blocks and the cross-block atomics all run on tiny inputs.
* ``gpu`` -- the same tests on CuPy arrays with the default launch sizes, plus the shapes of the real
  configurations; skipped unless CuPy imports and ``cupy.is_available()``.

Tolerances: as in ``tests/test_kernels.py`` (element-wise rtol 1e-5, sums rtol 1e-5 plus 1e-5 per
element), since the GPU's ``expf``/``log1pf``/``tanhf`` are within a few ulp and sums are accumulated
in float64 across blocks.
"""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernels.adam import adam_step_reference, layer_backward_adam_reference
from kernels.bias_act import ACTIVATIONS, bias_act_backward_reference, bias_act_reference, linear_act_reference
from kernels.likelihood import (
    bernoulli_nll_grad_reference,
    gaussian_learned_nll_grad_reference,
    gaussian_nll_grad_reference,
)
from kernels.pixels import pixels_reference
from kernels.reparam_kl import reparameterize_kl_backward_reference, reparameterize_kl_reference

ROOT = Path(__file__).resolve().parents[1]
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
RTOL = 1e-5
HAS_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None


def _gpu_skip_reason():
    if SIMULATED:
        return None
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (the 'cuda' extra)"
    try:
        import cupy

        if not cupy.is_available():
            return "CuPy finds no usable CUDA device"
    except Exception as error:  # a broken driver install raises here
        return f"CuPy is unusable: {error}"
    return None


GPU_SKIP = _gpu_skip_reason()


# -- the simulator run, from an ordinary pytest process ----------------------------------------------


@pytest.mark.skipif(SIMULATED, reason="already running under the simulator")
@pytest.mark.skipif(not HAS_NUMBA_CUDA, reason="numba-cuda is not installed (the 'dev' or 'cuda' extra)")
def test_cuda_kernels_pass_under_the_simulator():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", __file__],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


# -- the shared tests -------------------------------------------------------------------------------

MODES = []
if SIMULATED:
    MODES.append("sim")
else:
    MODES.append(pytest.param("gpu", marks=pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")))


@pytest.fixture(params=MODES)
def dev(request, monkeypatch):
    """Moves arrays to the device and back; picks the launch sizes for the mode."""
    from kernels import config

    if request.param == "sim":
        monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 4)
        monkeypatch.setattr(config, "CUDA_MAX_BLOCKS", 3)
        monkeypatch.setattr(config, "CUDA_BIAS_ROWS_PER_THREAD", 2)
        return Device(np, simulated=True)
    import cupy

    return Device(cupy, simulated=False)


class Device:
    def __init__(self, xp, simulated):
        self.xp, self.simulated = xp, simulated
        from kernels import cuda

        self.k = cuda

    def put(self, a):
        return self.xp.asarray(a).copy() if self.simulated else self.xp.asarray(np.ascontiguousarray(a))

    def get(self, a):
        return np.asarray(a) if self.simulated else self.xp.asnumpy(a)

    def shapes(self, *extra):
        """Tiny shapes everywhere; the configurations' shapes only on a real GPU."""
        tiny = [(1, 7), (3, 5), (5, 9), (0, 7)]
        return tiny if self.simulated else tiny + list(extra)


def f32(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def assert_sum_close(result, expected, n_terms):
    assert getattr(result, "shape", None) == (), "cuda reductions return a 0-d device array"
    np.testing.assert_allclose(float(result), float(expected), rtol=RTOL, atol=1e-5 * max(n_terms, 1))


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_reparameterize_kl_forward_and_backward(dev, rng):
    for n_rows, n_latent in dev.shapes((128, 20), (4, 200), (512, 64)):
        for logvar_scale in (1.0, 30.0):
            stats = np.concatenate([f32(rng, (n_rows, n_latent)),
                                    np.clip(f32(rng, (n_rows, n_latent), logvar_scale), -30, 30)], axis=1)
            eps, dz = f32(rng, (n_rows, n_latent)), f32(rng, (n_rows, n_latent), 0.1)
            z_ref = np.empty_like(eps)
            kl_ref = reparameterize_kl_reference(stats, eps, z_ref)
            z = dev.put(np.full_like(eps, np.nan))
            kl = dev.k.reparameterize_kl_cuda(dev.put(stats), dev.put(eps), z)
            np.testing.assert_allclose(dev.get(z), z_ref, rtol=RTOL, atol=1e-6)
            assert_sum_close(kl, kl_ref, eps.size)
            d_ref = np.empty_like(stats)
            reparameterize_kl_backward_reference(stats, eps, dz, 0.7, d_ref)
            d = dev.put(np.full_like(stats, np.nan))
            dev.k.reparameterize_kl_backward_cuda(dev.put(stats), dev.put(eps), dev.put(dz), 0.7, d)
            np.testing.assert_allclose(dev.get(d), d_ref, rtol=RTOL, atol=1e-6)


def test_bernoulli_nll_grad(dev, rng):
    for shape in dev.shapes((128, 784), (512, 784)):
        for scale in (1.0, 10.0):
            logits, x = f32(rng, shape, scale), rng.random(shape, dtype=np.float32)
            grad_scale = 1.0 / max(shape[0], 1)
            d_ref = np.empty_like(logits)
            nll_ref = bernoulli_nll_grad_reference(logits, x, grad_scale, d_ref)
            d = dev.put(np.full_like(logits, np.nan))
            nll = dev.k.bernoulli_nll_grad_cuda(dev.put(logits), dev.put(x), grad_scale, d)
            np.testing.assert_allclose(dev.get(d), d_ref, rtol=RTOL, atol=1e-6 * grad_scale)
            assert_sum_close(nll, nll_ref, logits.size)


@pytest.mark.parametrize("magnitude", [100.0, 1e4])
def test_bernoulli_at_huge_logits_is_finite_with_exact_gradient(dev, magnitude):
    logits = np.array([[magnitude, -magnitude, magnitude, -magnitude, magnitude, -magnitude]], np.float32)
    x = np.array([[1.0, 0.0, 0.0, 1.0, 0.5, 0.5]], np.float32)
    d = dev.put(np.empty_like(logits))
    nll = float(dev.k.bernoulli_nll_grad_cuda(dev.put(logits), dev.put(x), 0.5, d))
    assert math.isfinite(nll) and nll == pytest.approx(3 * magnitude, rel=1e-6)
    np.testing.assert_allclose(dev.get(d), 0.5 * np.array([[0, 0, 1, -1, 0.5, -0.5]]), rtol=0, atol=1e-30)


def test_gaussian_nll_grad_fixed_and_learned(dev, rng):
    for shape in dev.shapes((128, 784)):
        n_rows, n_pixels = shape
        mean, x = rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32)
        grad_scale = 1.0 / max(n_rows, 1)
        for logvar in (0.0, -2.5, 3.0):
            d_ref = np.empty_like(mean)
            nll_ref = gaussian_nll_grad_reference(mean, x, logvar, grad_scale, d_ref)
            d = dev.put(np.full_like(mean, np.nan))
            nll = dev.k.gaussian_nll_grad_cuda(dev.put(mean), dev.put(x), logvar, grad_scale, d)
            np.testing.assert_allclose(dev.get(d), d_ref, rtol=RTOL, atol=1e-6 * grad_scale)
            assert_sum_close(nll, nll_ref, mean.size)
        out = np.concatenate([mean, np.clip(f32(rng, shape, 3.0), -30, 30)], axis=1)
        d_ref = np.empty_like(out)
        nll_ref = gaussian_learned_nll_grad_reference(out, x, grad_scale, d_ref)
        d = dev.put(np.full_like(out, np.nan))
        nll = dev.k.gaussian_learned_nll_grad_cuda(dev.put(out), dev.put(x), grad_scale, d)
        np.testing.assert_allclose(dev.get(d), d_ref, rtol=RTOL, atol=1e-6 * grad_scale)
        logvar64 = out[:, n_pixels:].astype(np.float64)
        terms = ((mean - x).astype(np.float64) ** 2 * np.exp(-logvar64) + np.abs(logvar64)).sum()
        np.testing.assert_allclose(float(nll), float(nll_ref), rtol=0, atol=RTOL * terms + 1e-5 * x.size)


@pytest.mark.parametrize("weight_decay,clip_norm", [(0.0, 0.0), (0.01, 1.0), (0.0, 1e4)])
def test_adam_step(dev, rng, weight_decay, clip_norm):
    for n in ([1, 37] if dev.simulated else [1, 37, 869_184]):
        ref = [f32(rng, n), np.zeros(n, np.float32), np.zeros(n, np.float32)]
        out = [dev.put(a) for a in ref]
        for step in (1, 2):
            grads = f32(rng, n, 0.5)
            norm_ref = adam_step_reference(ref[0], grads, ref[1], ref[2], step, 1e-2,
                                           weight_decay=weight_decay, clip_norm=clip_norm)
            norm = dev.k.adam_step_cuda(out[0], dev.put(grads), out[1], out[2], step, 1e-2,
                                        weight_decay=weight_decay, clip_norm=clip_norm)
            assert norm.shape == ()
            assert float(norm) == pytest.approx(norm_ref, rel=RTOL)
        for a, b in zip(out, ref):
            np.testing.assert_allclose(dev.get(a), b, rtol=RTOL, atol=1e-7)


def test_per_step_scalars_read_from_device_arrays_give_the_same_bits(dev, rng):
    """A recorded graph passes the KL weight and Adam's step count as one-element float64 device arrays,
    read when the kernel runs; the results are those of the same numbers passed directly."""
    n_rows, n_latent = 5, 3
    stats = f32(rng, (n_rows, 2 * n_latent))
    eps, dz = f32(rng, (n_rows, n_latent)), f32(rng, (n_rows, n_latent), 0.1)
    by_number, by_array = (dev.put(np.full_like(stats, np.nan)) for _ in range(2))
    dev.k.reparameterize_kl_backward_cuda(dev.put(stats), dev.put(eps), dev.put(dz), 0.37, by_number)
    knobs = dev.put(np.array([3.0, 0.37]))
    dev.k.reparameterize_kl_backward_cuda(dev.put(stats), dev.put(eps), dev.put(dz), knobs[1:2], by_array)
    np.testing.assert_array_equal(dev.get(by_array), dev.get(by_number))

    n = 37
    start = [f32(rng, n), f32(rng, n, 0.1) ** 2, f32(rng, n, 0.1) ** 2]
    grads = dev.put(f32(rng, n))
    number, array = [dev.put(a) for a in start], [dev.put(a) for a in start]
    norm_number = dev.k.adam_step_cuda(*number[:1], grads, *number[1:], 3, 1e-2, clip_norm=1.0)
    norm_array = dev.k.adam_step_cuda(*array[:1], grads, *array[1:], knobs[0:1], 1e-2, clip_norm=1.0)
    assert float(norm_array) == float(norm_number)
    for a, b in zip(array, number):
        np.testing.assert_array_equal(dev.get(a), dev.get(b))
    with pytest.raises(ValueError, match="step: expected a number or a one-element float64"):
        dev.k.adam_step_cuda(*array[:1], grads, *array[1:], knobs, 1e-2)
    with pytest.raises(ValueError, match="kl_weight: expected a number or a one-element float64"):
        dev.k.reparameterize_kl_backward_cuda(dev.put(stats), dev.put(eps), dev.put(dz), dev.put(eps[0, :1]),
                                              by_array)


def test_pixels(dev, rng):
    src = rng.integers(0, 256, (5, 37), dtype=np.uint8)
    src[0, :2] = 0, 255
    ref = np.empty(src.shape, np.float32)
    pixels_reference(src, ref)
    out = dev.put(np.full(src.shape, np.nan, np.float32))
    dev.k.pixels_cuda(dev.put(src), out)
    np.testing.assert_array_equal(dev.get(out), ref)


def test_layer_backward_adam(dev, rng):
    """The composition of cuBLAS and the Adam kernel on one layer's block (the engine keeps the plain
    path on a GPU: fuses_layer_adam_cuda is False)."""
    assert not dev.k.fuses_layer_adam_cuda(4)
    n_in, n_out, batch = 9, 5, 3
    n = 2 + (n_in + 1) * n_out
    ref = [f32(rng, n), f32(rng, n, 0.1), np.zeros(n, np.float32), np.zeros(n, np.float32)]
    out = [dev.put(a) for a in ref]
    x, delta = f32(rng, (batch, n_in)), f32(rng, (batch, n_out))
    dx_ref, dx = np.empty((batch, n_in), np.float32), dev.put(np.empty((batch, n_in), np.float32))
    squares_ref = layer_backward_adam_reference(x, delta, *ref, (1, n_in, n_out), dx_ref, 2, 1e-2)
    squares = dev.k.layer_backward_adam_cuda(dev.put(x), dev.put(delta), *out, (1, n_in, n_out), dx, 2, 1e-2)
    assert float(squares) == pytest.approx(squares_ref, rel=RTOL)
    np.testing.assert_allclose(dev.get(dx), dx_ref, rtol=RTOL, atol=1e-6)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(dev.get(a), b, rtol=RTOL, atol=1e-7)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # the simulator's inf * 0
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_adam_norm_reports_nan_and_inf_gradients(dev, bad):
    grads = np.ones(9, np.float32)
    grads[4] = bad
    z = np.zeros(9, np.float32)
    norm = float(dev.k.adam_step_cuda(dev.put(z), dev.put(grads), dev.put(z), dev.put(z), 1, 1e-3,
                                      clip_norm=1.0))
    assert math.isnan(norm) if np.isnan(bad) else math.isinf(norm)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_act(dev, rng, activation):
    """cuBLAS, then the bias + activation kernel."""
    x, W, bias = f32(rng, (6, 9)), f32(rng, (9, 5), 0.3), f32(rng, 5)
    ref = np.empty((6, 5), np.float32)
    linear_act_reference(x, W, bias, activation, ref)
    out = dev.put(np.full((6, 5), np.nan, np.float32))
    dev.k.linear_act_cuda(dev.put(x), dev.put(W), dev.put(bias), activation, out)
    np.testing.assert_allclose(dev.get(out), ref, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bias_act_forward_and_backward(dev, rng, activation):
    for shape in dev.shapes((128, 400), (512, 1024)):
        h, bias = f32(rng, shape, 3.0), f32(rng, shape[1])
        y_ref = h.copy()
        bias_act_reference(y_ref, bias, activation)
        y = dev.put(h)
        dev.k.bias_act_cuda(y, dev.put(bias), activation)
        np.testing.assert_allclose(dev.get(y), y_ref, rtol=RTOL, atol=1e-6)
        dy = f32(rng, shape)
        dpre_ref, dbias_ref = np.empty_like(dy), np.empty(shape[1], np.float32)
        bias_act_backward_reference(dy, y_ref, activation, dpre_ref, dbias_ref)
        for in_place in (False, True):
            dy_dev = dev.put(dy)
            dpre = dy_dev if in_place else dev.put(np.full_like(dy, np.nan))
            dbias = dev.put(np.full(shape[1], np.nan, np.float32))
            dev.k.bias_act_backward_cuda(dy_dev, dev.put(y_ref), activation, dpre, dbias)
            np.testing.assert_allclose(dev.get(dpre), dpre_ref, rtol=RTOL, atol=1e-6)
            np.testing.assert_allclose(dev.get(dbias), dbias_ref, rtol=RTOL, atol=1e-5 * max(shape[0], 1) ** 0.5)


def test_empty_batch_gives_zero_loss(dev):
    empty = np.zeros((0, 7), np.float32)
    assert float(dev.k.bernoulli_nll_grad_cuda(dev.put(empty), dev.put(empty), 1.0, dev.put(empty))) == 0.0
    assert float(dev.k.gaussian_nll_grad_cuda(dev.put(empty), dev.put(empty), 0.3, 1.0, dev.put(empty))) == 0.0
    assert float(dev.k.reparameterize_kl_cuda(dev.put(np.zeros((0, 4), np.float32)), dev.put(empty[:, :2]),
                                              dev.put(empty[:, :2]))) == 0.0


def test_wrong_arrays_are_rejected(dev):
    a = dev.put(np.zeros((4, 10), np.float32))
    wide = dev.put(np.zeros((4, 20), np.float32))
    with pytest.raises(ValueError, match="logits: .*not C-contiguous"):
        dev.k.bernoulli_nll_grad_cuda(wide[:, ::2], a, 1.0, a)
    with pytest.raises(ValueError, match="float32"):
        dev.k.bernoulli_nll_grad_cuda(a, a.astype(dev.xp.float64), 1.0, a)
    with pytest.raises(ValueError, match=r"dlogits_out: expected shape \(4, 10\)"):
        dev.k.bernoulli_nll_grad_cuda(a, a, 1.0, wide)
    with pytest.raises(ValueError, match="unknown activation"):
        dev.k.bias_act_cuda(a, dev.put(np.zeros(10, np.float32)), "gelu")
    if not dev.simulated:
        with pytest.raises(ValueError, match="CuPy"):                     # host arrays are not moved
            dev.k.bias_act_cuda(np.zeros((4, 10), np.float32), dev.put(np.zeros(10, np.float32)), "relu")


def test_matmul_in_the_engine_layouts(dev, rng):
    """cuBLAS through its C API (NumPy under the simulator) into the preallocated buffer, transposed views
    included; on a GPU the handle must load (else CuPy's matmul would run, which no graph can hold)."""
    if not dev.simulated:
        assert dev.k._cublas() is not None, dev.k._cublas_unavailable
    for batch, n_in, n_out in [(3, 5, 7), (1, 1, 1), (3, 0, 4)] + ([] if dev.simulated else [(128, 784, 400)]):
        x, w, d = f32(rng, (batch, n_in)), f32(rng, (n_in, n_out)), f32(rng, (batch, n_out))
        for a, b in ((x, w), (x.T, d), (d, w.T)):
            a_dev = dev.put(np.ascontiguousarray(a.T)).T if a.flags.f_contiguous and not a.flags.c_contiguous \
                else dev.put(a)
            b_dev = dev.put(np.ascontiguousarray(b.T)).T if b.flags.f_contiguous and not b.flags.c_contiguous \
                else dev.put(b)
            out = dev.put(np.full((a.shape[0], b.shape[1]), np.nan, np.float32))
            dev.k.matmul_cuda(a_dev, b_dev, out)
            np.testing.assert_allclose(dev.get(out), a @ b, rtol=RTOL, atol=1e-5 * math.sqrt(a.shape[1]))


def test_cuda_table_has_the_reference_signatures(dev):
    import inspect

    import kernels

    table = kernels.kernel_table("cuda")
    for field in kernels.KernelTable.__dataclass_fields__:
        if field != "name":
            assert inspect.signature(getattr(table, field)) == inspect.signature(getattr(kernels.REFERENCE, field))
