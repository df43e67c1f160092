"""CUDA implementations of every kernel: Numba CUDA kernels launched on CuPy arrays.

The maths, shapes and reference of each kernel are documented once, in its op module; each
``<op>_cuda`` here has exactly the reference's signature. Importing this module imports ``numba.cuda``
(the NVIDIA ``numba-cuda`` package, from the ``cuda`` extra), so ``kernels`` imports it only when the
``cuda`` table is asked for.

* Arrays are CuPy ``float32`` C-contiguous arrays (NumPy arrays under Numba's CUDA simulator,
  ``NUMBA_ENABLE_CUDASIM=1``, which is how CI runs these kernels); other input is rejected with a
  ``ValueError``. Numba reads them zero-copy (DLPack / ``__cuda_array_interface__``).
* Every launch goes on CuPy's current stream, so the kernels order with the engine's CuPy work and
  nothing waits on the host.
* Reductions return a 0-d float64 array on the device (no host synchronisation; call ``float()`` on it
  when the value is needed). Each block folds its threads' partial sums in shared memory and adds the
  block total into a one-element buffer with one atomic add, so the last digits of a sum may vary
  from run to run. That buffer and the 0-d result are the only per-call allocations (a few bytes from
  CuPy's memory pool).
* The scalars that change from step to step -- the KL weight and Adam's step count -- may be given as
  a one-element float64 device array instead of a number. The kernel reads the array when it runs, so
  a step recorded once as a CUDA graph (:mod:`vaecore.cuda_graph`) replays with the values copied in
  before each launch. A number is put into such an array first (one more pool allocation).
* Grid-stride loops: the launch size comes from :mod:`kernels.config` at call time
  (``CUDA_THREADS_PER_BLOCK``, ``CUDA_MAX_BLOCKS``), so tests under the simulator shrink it to make
  the multi-block paths run on tiny inputs.
"""

import math
import os
import warnings

import numpy as np
from numba import cuda, float32, float64

from . import config
from .adam import layer_backward_adam_composed
from .bias_act import activation_code, linear_act_composed
from .likelihood import LOG_2PI
from .namespace import array_namespace

try:
    from numba.cuda.core import config as _numba_cuda_config
except ImportError:    # the simulator, or an older numba-cuda: its defaults stay
    _numba_cuda_config = None

# Shared-memory size of the block reduction: the hardware's maximum threads per block, so any launch
# size from kernels.config fits. A constant here (not config) so compiled kernels never go stale.
_MAX_THREADS = 1024
# True under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1 before numba.cuda was first imported).
SIMULATOR = cuda.jit.__module__.startswith("numba.cuda.simulator")
# A small batch is small work: its few blocks are deliberate, not the beginner's error Numba warns of.
if _numba_cuda_config is not None and "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS" not in os.environ:
    _numba_cuda_config.CUDA_LOW_OCCUPANCY_WARNINGS = 0

# -- device helpers --------------------------------------------------------------------------------


@cuda.jit(device=True, inline="always")  # inlined in Numba IR: compile_ptx then needs no GPU
def _block_sum_into(total, value, scale, offset):
    """Adds ``scale * sum(value over all threads of all blocks) + offset`` into ``total[0]``.

    Every thread of the block must call it (it synchronises the block); ``blockDim.x`` must be a
    power of two. Block 0 also adds ``offset``, so a constant term costs no extra launch.
    """
    buf = cuda.shared.array(_MAX_THREADS, float64)
    t = cuda.threadIdx.x
    buf[t] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if t < stride:
            buf[t] += buf[t + stride]
        cuda.syncthreads()
        stride //= 2
    if t == 0:
        block_total = scale * buf[0]
        if cuda.blockIdx.x == 0:
            block_total += offset
        cuda.atomic.add(total, 0, block_total)


@cuda.jit(device=True, inline="always")  # inlined in Numba IR: compile_ptx then needs no GPU
def _sigmoid(x):
    e = math.exp(-abs(x))                      # in [0, 1]: never overflows
    s = float32(1.0) / (float32(1.0) + e)
    return s if x >= float32(0.0) else e * s


# -- kernels ----------------------------------------------------------------------------------------


@cuda.jit
def _reparameterize_kl_kernel(stats, eps, z_out, total):
    n_rows, n_latent = eps.shape
    acc = float32(0.0)
    for k in range(cuda.grid(1), n_rows * n_latent, cuda.gridsize(1)):
        i = k // n_latent
        j = k - i * n_latent
        mu = stats[i, j]
        logvar = stats[i, n_latent + j]
        z_out[i, j] = mu + math.exp(float32(0.5) * logvar) * eps[i, j]
        acc += float32(1.0) + logvar - mu * mu - math.exp(logvar)
    _block_sum_into(total, acc, -0.5, 0.0)


@cuda.jit
def _reparameterize_kl_backward_kernel(stats, eps, dz, kl_weight, dstats_out):
    """``kl_weight``: a one-element float64 array."""
    n_rows, n_latent = eps.shape
    w = float32(kl_weight[0])
    half_w = float32(0.5 * kl_weight[0])
    for k in range(cuda.grid(1), n_rows * n_latent, cuda.gridsize(1)):
        i = k // n_latent
        j = k - i * n_latent
        std = math.exp(float32(0.5) * stats[i, n_latent + j])
        g = dz[i, j]
        dstats_out[i, j] = g + w * stats[i, j]
        dstats_out[i, n_latent + j] = float32(0.5) * g * eps[i, j] * std + half_w * (std * std - float32(1.0))


@cuda.jit
def _bernoulli_nll_grad_kernel(logits, x, grad_scale, dlogits_out, total):
    n_rows, n_cols = logits.shape
    g = float32(grad_scale)
    acc = float32(0.0)
    for k in range(cuda.grid(1), n_rows * n_cols, cuda.gridsize(1)):
        i = k // n_cols
        j = k - i * n_cols
        l = logits[i, j]
        t = x[i, j]
        e = math.exp(-abs(l))
        s = float32(1.0) / (float32(1.0) + e)
        dlogits_out[i, j] = g * ((s if l >= float32(0.0) else e * s) - t)
        relu = float32(0.0) if l < float32(0.0) else l
        acc += relu + math.log1p(e) - t * l
    _block_sum_into(total, acc, 1.0, 0.0)


@cuda.jit
def _gaussian_nll_grad_kernel(mean, x, inv_var, grad_scale, constant, dmean_out, total):
    n_rows, n_cols = mean.shape
    g = float32(grad_scale * inv_var)
    acc = float32(0.0)
    for k in range(cuda.grid(1), n_rows * n_cols, cuda.gridsize(1)):
        i = k // n_cols
        j = k - i * n_cols
        d = mean[i, j] - x[i, j]
        dmean_out[i, j] = g * d
        acc += d * d
    _block_sum_into(total, acc, 0.5 * inv_var, constant)


@cuda.jit
def _gaussian_learned_nll_grad_kernel(out, x, grad_scale, constant, dout_out, total):
    n_rows, n_pixels = x.shape
    g = float32(grad_scale)
    half_g = float32(0.5 * grad_scale)
    acc = float32(0.0)
    for k in range(cuda.grid(1), n_rows * n_pixels, cuda.gridsize(1)):
        i = k // n_pixels
        j = k - i * n_pixels
        d = out[i, j] - x[i, j]
        logvar = out[i, n_pixels + j]
        inv_var = math.exp(-logvar)
        sq = d * d * inv_var
        dout_out[i, j] = g * d * inv_var
        dout_out[i, n_pixels + j] = half_g * (float32(1.0) - sq)
        acc += sq + logvar
    _block_sum_into(total, acc, 0.5, constant)


@cuda.jit
def _sum_squares_kernel(a, total):
    acc = float64(0.0)
    for k in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        g = float64(a[k])
        acc += g * g
    _block_sum_into(total, acc, 1.0, 0.0)


@cuda.jit
def _adam_kernel(params, grads, m, v, norm_buf, step, beta1, beta2, clip_norm, lr, eps, decay):
    """``norm_buf[0]`` holds the sum of squares of ``grads``; writes the norm into ``norm_buf[1]``.
    ``step``: a one-element float64 array, the step count t of the bias corrections."""
    t = step[0]
    step_size = lr / (1.0 - beta1 ** t)
    root_corr = math.sqrt(1.0 - beta2 ** t)
    norm = math.sqrt(norm_buf[0])
    if cuda.grid(1) == 0:
        norm_buf[1] = norm
    scale = 1.0
    if clip_norm > 0.0:
        ratio = clip_norm / (norm + 1e-6)
        if ratio < 1.0:                        # a NaN norm leaves scale at 1, as min(1, nan) does
            scale = ratio
    b1 = float32(beta1)
    b2 = float32(beta2)
    c1 = float32((1.0 - beta1) * scale)
    c2 = float32((1.0 - beta2) * scale * scale)
    lr_t = float32(step_size)
    root = float32(root_corr)
    eps32 = float32(eps)
    wd = float32(decay)
    for k in range(cuda.grid(1), params.size, cuda.gridsize(1)):
        g = grads[k]
        m_k = b1 * m[k] + c1 * g
        v_k = b2 * v[k] + c2 * (g * g)
        m[k] = m_k
        v[k] = v_k
        p = params[k]
        params[k] = p - lr_t * m_k / (math.sqrt(v_k) / root + eps32) - wd * p


@cuda.jit
def _bias_act_kernel(h, bias, code):
    n_rows, n_cols = h.shape
    for k in range(cuda.grid(1), n_rows * n_cols, cuda.gridsize(1)):
        i = k // n_cols
        j = k - i * n_cols
        pre = h[i, j] + bias[j]
        if code == 1:
            pre = float32(0.0) if pre < float32(0.0) else pre
        elif code == 2:
            pre = math.tanh(pre)
        elif code == 3:
            pre = _sigmoid(pre)
        h[i, j] = pre


@cuda.jit
def _bias_act_backward_kernel(dy, y, code, rows_per_thread, dpre_out, dbias_out):
    """x: columns; y: chunks of ``rows_per_thread`` rows. ``dbias_out`` must start at zero."""
    n_rows, n_cols = dy.shape
    col0, chunk0 = cuda.grid(2)
    n_col_threads, n_chunk_threads = cuda.gridsize(2)
    n_chunks = (n_rows + rows_per_thread - 1) // rows_per_thread
    for j in range(col0, n_cols, n_col_threads):
        for c in range(chunk0, n_chunks, n_chunk_threads):
            acc = float32(0.0)
            for i in range(c * rows_per_thread, min(n_rows, (c + 1) * rows_per_thread)):
                d = dy[i, j]
                if code == 1:
                    d = d if y[i, j] > float32(0.0) else float32(0.0)
                elif code == 2:
                    t = y[i, j]
                    d = d * (float32(1.0) - t * t)
                elif code == 3:
                    s = y[i, j]
                    d = d * s * (float32(1.0) - s)
                dpre_out[i, j] = d
                acc += d
            cuda.atomic.add(dbias_out, j, acc)


# Signatures the engine's arguments produce (C-contiguous float32 arrays, Python floats and ints);
# tests/test_kernels_ptx.py compiles every kernel with them.
_A1 = "float32[::1]"
_A2 = "float32[:, ::1]"
_F64 = "float64[::1]"
KERNEL_SIGNATURES = {
    "_reparameterize_kl_kernel": f"void({_A2}, {_A2}, {_A2}, {_F64})",
    "_reparameterize_kl_backward_kernel": f"void({_A2}, {_A2}, {_A2}, {_F64}, {_A2})",
    "_bernoulli_nll_grad_kernel": f"void({_A2}, {_A2}, float64, {_A2}, {_F64})",
    "_gaussian_nll_grad_kernel": f"void({_A2}, {_A2}, float64, float64, float64, {_A2}, {_F64})",
    "_gaussian_learned_nll_grad_kernel": f"void({_A2}, {_A2}, float64, float64, {_A2}, {_F64})",
    "_sum_squares_kernel": f"void({_A1}, {_F64})",
    "_adam_kernel": f"void({_A1}, {_A1}, {_A1}, {_A1}, {_F64}, {_F64}, float64, float64, float64, float64, "
                    "float64, float64)",
    "_bias_act_kernel": f"void({_A2}, {_A1}, int64)",
    "_bias_act_backward_kernel": f"void({_A2}, {_A2}, int64, int64, {_A2}, {_A1})",
}

# -- launching ---------------------------------------------------------------------------------------

_streams = {}


def _stream(xp):
    """CuPy's current stream as a Numba stream (cached per handle); 0 under the simulator."""
    if xp is np:
        return 0
    ptr = xp.cuda.get_current_stream().ptr
    if ptr == 0:
        return 0                                  # the legacy default stream, as Numba's 0 means
    stream = _streams.get(ptr)
    if stream is None:
        stream = _streams[ptr] = cuda.external_stream(ptr)
    return stream


def _grid(n):
    tpb = config.CUDA_THREADS_PER_BLOCK
    if tpb > _MAX_THREADS or tpb & (tpb - 1):
        raise ValueError(f"kernels.config.CUDA_THREADS_PER_BLOCK must be a power of two <= {_MAX_THREADS}, "
                         f"got {tpb}")
    return max(1, min(config.CUDA_MAX_BLOCKS, -(-n // tpb))), tpb


def _on_device(a):
    """Whether ``a`` is an array these kernels can take: a device array (NumPy's under the simulator)."""
    return isinstance(a, np.ndarray) if SIMULATOR else hasattr(a, "__cuda_array_interface__")


def _check(name, a, shape):
    if not _on_device(a) or a.dtype != np.float32 or not a.flags.c_contiguous:
        where = "NumPy (CUDA simulator)" if SIMULATOR else "CuPy"
        layout = "" if not hasattr(a, "flags") or a.flags.c_contiguous else " (not C-contiguous)"
        raise ValueError(f"{name}: the cuda kernels need a C-contiguous float32 {where} array, got "
                         f"{type(a).__name__} of {getattr(a, 'dtype', '?')}{layout}")
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")


def _check2d(name, a):
    _check(name, a, a.shape if getattr(a, "ndim", 0) == 2 else (-1, -1))
    return a.shape


def _device_scalar(name, value, xp):
    """``value`` as the one-element float64 device array a kernel reads: a number is copied into a new
    one; a device array (a recorded graph's per-step value) is checked and passed as it is."""
    if not hasattr(value, "shape"):
        return xp.full(1, value, dtype=xp.float64)
    if not _on_device(value) or value.dtype != np.float64 or value.size != 1 or not value.flags.c_contiguous:
        raise ValueError(f"{name}: expected a number or a one-element float64 device array, got "
                         f"{type(value).__name__} of {getattr(value, 'dtype', '?')} and shape {value.shape}")
    return value.reshape(1)


def _run_sum(kernel, xp, n, *args):
    """Launches a reducing kernel over ``n`` elements; returns its 0-d float64 result."""
    total = xp.zeros(1, dtype=xp.float64)
    if n:
        blocks, tpb = _grid(n)
        kernel[blocks, tpb, _stream(xp)](*args, total)
    return total.reshape(())


# -- wrappers: the reference signatures ----------------------------------------------------------------


def reparameterize_kl_cuda(stats, eps, z_out):
    n_rows, n_latent = _check2d("eps", eps)
    _check("stats", stats, (n_rows, 2 * n_latent))
    _check("z_out", z_out, eps.shape)
    return _run_sum(_reparameterize_kl_kernel, array_namespace(stats), n_rows * n_latent, stats, eps, z_out)


def reparameterize_kl_backward_cuda(stats, eps, dz, kl_weight, dstats_out):
    n_rows, n_latent = _check2d("eps", eps)
    _check("stats", stats, (n_rows, 2 * n_latent))
    _check("dz", dz, eps.shape)
    _check("dstats_out", dstats_out, stats.shape)
    xp = array_namespace(stats)
    weight = _device_scalar("kl_weight", kl_weight, xp)
    if n_rows * n_latent:
        blocks, tpb = _grid(n_rows * n_latent)
        _reparameterize_kl_backward_kernel[blocks, tpb, _stream(xp)](stats, eps, dz, weight, dstats_out)


def bernoulli_nll_grad_cuda(logits, x, grad_scale, dlogits_out):
    shape = _check2d("logits", logits)
    _check("x", x, shape)
    _check("dlogits_out", dlogits_out, shape)
    return _run_sum(_bernoulli_nll_grad_kernel, array_namespace(logits), logits.size,
                    logits, x, float(grad_scale), dlogits_out)


def gaussian_nll_grad_cuda(mean, x, logvar, grad_scale, dmean_out):
    shape = _check2d("mean", mean)
    _check("x", x, shape)
    _check("dmean_out", dmean_out, shape)
    constant = 0.5 * (logvar + LOG_2PI) * mean.size
    return _run_sum(_gaussian_nll_grad_kernel, array_namespace(mean), mean.size,
                    mean, x, math.exp(-logvar), float(grad_scale), constant, dmean_out)


def gaussian_learned_nll_grad_cuda(out, x, grad_scale, dout_out):
    n_rows, n_pixels = _check2d("x", x)
    _check("out", out, (n_rows, 2 * n_pixels))
    _check("dout_out", dout_out, (n_rows, 2 * n_pixels))
    constant = 0.5 * LOG_2PI * x.size
    return _run_sum(_gaussian_learned_nll_grad_kernel, array_namespace(out), x.size,
                    out, x, float(grad_scale), constant, dout_out)


def adam_step_cuda(params, grads, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                   weight_decay=0.0, clip_norm=0.0, blocks=None):
    shape = params.shape if getattr(params, "ndim", 0) == 1 else (-1,)
    for name, a in (("params", params), ("grads", grads), ("m", m), ("v", v)):
        _check(name, a, shape)
    xp = array_namespace(params)
    norm_buf = xp.zeros(2, dtype=xp.float64)              # [sum of squares, norm]
    step = _device_scalar("step", step, xp)
    if params.size:
        stream = _stream(xp)
        blocks, tpb = _grid(params.size)
        _sum_squares_kernel[blocks, tpb, stream](grads, norm_buf)
        _adam_kernel[blocks, tpb, stream](params, grads, m, v, norm_buf, step, float(beta1), float(beta2),
                                          float(clip_norm), float(lr), float(eps), lr * weight_decay)
    return norm_buf[1:].reshape(())


def layer_backward_adam_cuda(x, delta, params, grads, m, v, block, dx_out, step, lr, beta1=0.9, beta2=0.999,
                             eps=1e-8, weight_decay=0.0):
    """cuBLAS, then the Adam kernel above on the layer's block. ``fuses_layer_adam_cuda`` is False, so
    the engine keeps the plain backward and one Adam launch: a launch per layer would only add launches."""
    return layer_backward_adam_composed(matmul_cuda, adam_step_cuda, x, delta, params, grads, m, v, block, dx_out,
                                        step, lr, beta1, beta2, eps, weight_decay)


def fuses_layer_adam_cuda(batch_size):
    return False


def pixels_cuda(src, out):
    """One CuPy multiply of the uint8 staging buffer into ``out`` (NumPy's under the simulator)."""
    array_namespace(out).multiply(src, np.float32(1.0 / 255.0), out=out)


_cublas_unavailable = None      # why kernels.cublas cannot be used here, once found out


def _cublas():
    """This device's cuBLAS handle (:mod:`kernels.cublas`), or None where it cannot be made: then a
    warning says why, once, since no training step can be recorded as a CUDA graph without it."""
    global _cublas_unavailable
    if SIMULATOR or _cublas_unavailable is not None:
        return None
    from . import cublas

    try:
        return cublas.for_current_device()
    except cublas.Unavailable as e:
        _cublas_unavailable = str(e)
        warnings.warn(f"matrix products go through CuPy's matmul, which a CUDA graph cannot record: {e}",
                      RuntimeWarning, stacklevel=3)
        return None


def matmul_cuda(a, b, out):
    """cuBLAS through its C API (:mod:`kernels.cublas`, which a recorded CUDA graph can hold); CuPy's
    matmul for layouts it does not take or where it cannot be loaded (NumPy's under the simulator)."""
    blas = _cublas()
    if blas is None or not blas.matmul(a, b, out):
        array_namespace(out).matmul(a, b, out=out)


def bias_act_cuda(h, bias, activation):
    code = activation_code(activation)
    n_rows, n_cols = _check2d("h", h)
    _check("bias", bias, (n_cols,))
    if h.size:
        blocks, tpb = _grid(h.size)
        _bias_act_kernel[blocks, tpb, _stream(array_namespace(h))](h, bias, code)


def linear_act_cuda(x, W, bias, activation, out):
    """cuBLAS, then the bias + activation kernel above."""
    linear_act_composed(matmul_cuda, bias_act_cuda, x, W, bias, activation, out)


def bias_act_backward_cuda(dy, y, activation, dpre_out, dbias_out):
    code = activation_code(activation)
    n_rows, n_cols = _check2d("dy", dy)
    _check("y", y, dy.shape)
    _check("dpre_out", dpre_out, dy.shape)
    _check("dbias_out", dbias_out, (n_cols,))
    xp = array_namespace(dy)
    dbias_out.fill(0.0)                                   # on CuPy's current stream, before the launch
    if dy.size:
        rows = config.CUDA_BIAS_ROWS_PER_THREAD
        n_chunks = -(-n_rows // rows)
        tpb = config.CUDA_THREADS_PER_BLOCK
        _grid(tpb)                                        # validates tpb
        col_blocks = -(-n_cols // tpb)
        grid = (max(1, min(config.CUDA_MAX_BLOCKS, col_blocks)), max(1, min(config.CUDA_MAX_BLOCKS, n_chunks)))
        _bias_act_backward_kernel[grid, (tpb, 1), _stream(xp)](dy, y, code, rows, dpre_out, dbias_out)


__all__ = [
    "KERNEL_SIGNATURES",
    "adam_step_cuda",
    "fuses_layer_adam_cuda",
    "layer_backward_adam_cuda",
    "linear_act_cuda",
    "matmul_cuda",
    "pixels_cuda",
    "bernoulli_nll_grad_cuda",
    "bias_act_backward_cuda",
    "bias_act_cuda",
    "gaussian_learned_nll_grad_cuda",
    "gaussian_nll_grad_cuda",
    "reparameterize_kl_backward_cuda",
    "reparameterize_kl_cuda",
]
