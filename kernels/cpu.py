"""CPU implementations of every kernel: Numba ``@njit`` loops behind thin wrappers.

The maths, shapes and reference of each kernel are documented once, in its op module
(:mod:`kernels.reparam_kl`, :mod:`kernels.likelihood`, :mod:`kernels.adam`, :mod:`kernels.bias_act`,
:mod:`kernels.matmul`); each ``<op>_cpu`` here has exactly the reference's signature.

Contract of the wrappers
------------------------
* Arrays must be NumPy ``float32`` and C-contiguous with the shapes the docstrings give; anything else
  is rejected with a ``ValueError`` naming the argument (the engine allocates its buffers that way, and
  a silent copy or a second compiled specialisation would hide a slow path). Scalars are Python numbers,
  except that Adam's ``step`` in ``layer_backward_adam_cpu`` and ``kl_weight`` in
  ``reparameterize_kl_backward_cpu`` may also be knobs: one-element float64 arrays read when the kernel
  runs, so that a recorded launch serves every step (see "launches, and recording them" below).
  The exception is ``matmul_cpu``, which takes anything ``np.matmul`` takes and hands what its own
  kernels do not cover to it.
* Outputs are written into the preallocated buffers; nothing is allocated per call. Loss kernels return
  the batch sum as a Python ``float``; ``adam_step_cpu`` returns the pre-clip gradient norm (NaN or Inf
  when the gradients hold one -- no fast-math flag here assumes finite values).
* An empty batch (``B == 0``) returns a loss of 0.0 and writes nothing.

Why the maths is written out by hand
------------------------------------
Numba lowers ``math.exp``/``math.log1p`` to scalar libm calls, which stops LLVM from vectorising the loop;
on this project's machines that made a fused Bernoulli loss *slower* than NumPy's SIMD ufuncs. The
``_exp32``, ``_log1p_unit``, ``_tanh32`` helpers below are branch-free float32 polynomials (Cephes-style
range reduction, Eigen's rational tanh; errors of a few ulp, checked in ``tests/test_kernels.py``) that vectorise, and
``_radd`` is an addition that carries LLVM's ``reassoc`` flag on that one instruction, so a loss sum
vectorises without licensing the compiler to reorder the range reductions (which plain
``fastmath=True`` would).

Compile settings live in this file, not in :mod:`kernels.config`: Numba's on-disk cache (``cache=True``,
files under ``kernels/__pycache__``) is invalidated only by edits to the file that defines a kernel, so a
flag read from another module would leave stale machine code behind.
"""

import math
import threading
import time
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from llvmlite import binding as llvm_binding, ir
from numba import get_num_threads, njit, prange, set_num_threads, threading_layer, types
from numba.core import cgutils
from numba.core.config import CPU_FEATURES as _NUMBA_CPU_FEATURES
from numba.extending import intrinsic

from . import blas_pool, config
from .adam import layer_backward_adam_composed
from .bias_act import ACTIVATIONS, activation_code, linear_act_composed
from .likelihood import LOG_2PI
from .memory import empty_aligned
from .noise import uniform_count
from .transpose import transpose_into_columns

# -- compile settings ---------------------------------------------------------------------------------
# 'contract' lets LLVM fuse a*b+c into an FMA (one rounding instead of two); nothing else is relaxed:
# no 'nnan'/'ninf' (NaN and Inf must flow through to the returned sums and the Adam norm), no global
# 'reassoc' (it would fold the two-constant range reduction in _exp32). error_model='numpy' drops the
# ZeroDivisionError check that otherwise keeps every loop with a division scalar.
_JIT = dict(cache=True, fastmath={"contract"}, error_model="numpy", nogil=True)
# 'arcp' turns Adam's division by the bias correction's root into a multiplication. The per-element
# square root and division stay exact (vsqrtps, vdivps): LLVM takes its estimates (rcp14 and a Newton
# step) only with 'ninf' too, and then the 784x400 update took 59 us instead of 50. NaN and Inf flow: no
# 'nnan' or 'ninf'.
_JIT_ADAM = dict(_JIT, fastmath={"contract", "arcp", "afn"})
# Adam and the small-batch gradient matmuls also have parallel (prange) versions, which take every core
# only while OpenBLAS's own threads are idle (see ``_pooled`` and kernels/config.py: next to OpenBLAS's
# spinning threads a parallel Numba pool made steps 10x slower); kernels/blas_pool.py keeps them idle by
# running OpenBLAS's matmuls on Numba's pool. The activation-sized kernels stay serial: split over two
# threads, bias + ReLU took 6.0 us instead of 3.7 at 128x784 and 14.6 instead of 20 at 512x1024.
_JIT_PARALLEL = dict(_JIT, parallel=True)
# Below this many parameters Adam runs serially even when the cores are free.
ADAM_PARALLEL_MIN = 1 << 18
# Below this many elements the Bernoulli loss runs on one thread (over two at batch 128: 42 -> 22 us,
# the example-b128 step -1.7% and -2.4% in two runs of 60 alternations; at batch 4 the launch costs more).
LOSS_PARALLEL_MIN = 1 << 15
# Below this many multiply-adds a small-batch matmul runs serially even when the cores are free.
MATMUL_PARALLEL_MIN = 1 << 17
# Parallel kernels split their work into this many chunks whatever the thread count, so that a chunk
# is computed the same way on one thread or many.
_CHUNKS = 16

_F32 = np.dtype(np.float32)
_f = np.float32

# -- float32 building blocks ----------------------------------------------------------------------


@intrinsic
def _radd(typingctx, acc, value):
    """``acc + value`` marked reassociable, so a loop summing into ``acc`` may vectorise."""
    if not (isinstance(acc, types.Float) and acc == value):
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1], flags=("reassoc", "nsz"))

    return acc(acc, value), codegen


@intrinsic
def _fma32(typingctx, a, b, c):
    """``a * b + c`` for float32 with one rounding (``llvm.fma``). Written out where an expression has two
    products, ``a * b + c * d``: with 'contract' LLVM may fuse either one, and code loaded from Numba's
    cache had fused the other one than code compiled in the process (Adam's ``v``: 68k of 314k elements
    a bit apart after one update), so a resumed run did not repeat the first one
    (tests/test_cache_bits.py)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3), "llvm.fma.f32")
        return builder.call(fma, args)

    return types.float32(a, b, c), codegen


@intrinsic
def _decay32(typingctx, decay):
    """AdamW's decoupled decay ``lr * weight_decay`` as the float32 the update multiplies by, or None for
    none: the kernels take None where there is no weight decay (``_adam_constants``), and each Adam
    kernel is then compiled without the decay's multiply-add (``_decayed``)."""
    if isinstance(decay, types.NoneType):
        return types.none(decay), lambda context, builder, signature, args: context.get_dummy_value()
    if not isinstance(decay, types.Float):
        return None

    def codegen(context, builder, signature, args):
        return context.cast(builder, args[0], signature.args[0], types.float32)

    return types.float32(decay), codegen


@intrinsic
def _decayed(typingctx, step, p, wd):
    """``step - wd * p`` (the float32 ``wd`` from ``_decay32``), or ``step`` where ``wd`` is None. Where
    there is no decay, the multiply-add (which would give ``step`` again for a finite ``p``) is not
    compiled at all: an Adam update with it took 9.7% longer at seed-b4's four layers (one process, in
    turn, 29 of 30 rounds). A type, not a test of the value, so the loop has no branch."""
    if isinstance(wd, types.NoneType):
        return step(step, p, wd), lambda context, builder, signature, args: args[0]
    if not (step == p == wd == types.float32):
        return None

    def codegen(context, builder, signature, args):
        # the flags Numba gives `step - wd * p` under 'contract': LLVM fuses them into one rounding
        product = builder.fmul(args[2], args[1], flags=("contract",))
        return builder.fsub(args[0], product, flags=("contract",))

    return types.float32(step, p, wd), codegen


@intrinsic
def _flushed(typingctx, x, tiny):
    """``x``, or 0 where ``|x| < tiny`` (NaN too); ``x`` itself where ``tiny`` is None, with no compare
    compiled (``_FLUSH_EVERY``)."""
    if isinstance(tiny, types.NoneType):
        return x(x, tiny), lambda context, builder, signature, args: args[0]
    if not (x == tiny == types.float32):
        return None

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32]), "llvm.fabs.f32")
        keep = builder.fcmp_ordered(">=", builder.call(fabs, [args[0]]), args[1])
        return builder.select(keep, args[0], ir.Constant(f32, 0.0))

    return types.float32(x, tiny), codegen


@intrinsic
def _pow2i(typingctx, k):
    """``2.0 ** k`` as float32 for an integer ``k`` in [-126, 127], by writing the exponent bits."""
    if not isinstance(k, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        k32 = context.cast(builder, args[0], signature.args[0], types.int32)
        biased = builder.add(k32, ir.Constant(ir.IntType(32), 127))
        bits = builder.shl(biased, ir.Constant(ir.IntType(32), 23))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(k), codegen


@intrinsic
def _bits(typingctx, x):
    """The bits of float32 ``x`` as an int32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(x), codegen


@intrinsic
def _from_bits(typingctx, k):
    """The float32 whose bits are the low 32 of the integer ``k``."""
    if not isinstance(k, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(context.cast(builder, args[0], signature.args[0], types.int32), ir.FloatType())

    return types.float32(k), codegen


_LOG2E = _f(1.4426950408889634)
_LN2_HI = _f(0.693359375)         # ln 2 split in two so that n * _LN2_HI is exact
_LN2_LO = _f(-2.12194440e-4)


@njit(inline="always", **_JIT)
def _exp32(x):
    """exp(x) for float32 ``x``: within 2 ulp, Inf above 88.72, gradual underflow to 0, NaN in -> NaN out."""
    xc = _f(-104.0) if x < _f(-104.0) else x      # NaN compares false and passes through
    xc = _f(89.0) if xc > _f(89.0) else xc
    n = np.floor(xc * _LOG2E + _f(0.5))
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = _f(1.9875691500e-4)
    p = p * r + _f(1.3981999507e-3)
    p = p * r + _f(8.3334519073e-3)
    p = p * r + _f(4.1665795894e-2)
    p = p * r + _f(1.6666665459e-1)
    p = p * r + _f(5.0000001201e-1)
    y = p * (r * r) + r + _f(1.0)
    n = n if n == n else _f(0.0)                   # keep the int conversion defined for NaN input
    k = np.int32(n)                                # in [-150, 128]
    k1 = k >> np.int32(1)
    # two exact scalings keep both factors normal; the last multiply rounds once into a subnormal or Inf
    return (y * _pow2i(k1)) * _pow2i(k - k1)


@njit(inline="always", **_JIT)
def _log1p_unit(e):
    """log1p(e) for float32 ``e`` in [0, 1], as 2 atanh(e / (2 + e)); relative error below 4 ulp."""
    s = e / (_f(2.0) + e)                          # in [0, 1/3]
    s2 = s * s
    p = _f(1.0 / 17.0)
    p = p * s2 + _f(1.0 / 15.0)
    p = p * s2 + _f(1.0 / 13.0)
    p = p * s2 + _f(1.0 / 11.0)
    p = p * s2 + _f(1.0 / 9.0)
    p = p * s2 + _f(1.0 / 7.0)
    p = p * s2 + _f(1.0 / 5.0)
    p = p * s2 + _f(1.0 / 3.0)
    return _f(2.0) * s + (_f(2.0) * s) * (s2 * p)


_SQRT_HALF_BITS = np.int32(0x3F3504F3)     # the bits of sqrt(1/2) as float32


@njit(inline="always", **_JIT)
def _log_normal32(x):
    """log(x) for a normal positive float32 ``x`` (no zero, subnormal, Inf or NaN): x = 2**k m with m
    in [sqrt(1/2), sqrt(2)), then k ln 2 + log1p(m - 1) -- m - 1 exact, and near x = 1 no cancellation."""
    bits = _bits(x)
    k = ((bits - _SQRT_HALF_BITS) >> np.int32(23))                 # exponent, moved up where m >= sqrt(2)
    m = _from_bits(bits - (k << np.int32(23)))
    kf = _f(k)
    return kf * _LN2_HI + (kf * _LN2_LO + _log1p_unit(m - _f(1.0)))


_TWO_PI = _f(2.0 * math.pi)


@njit(inline="always", **_JIT)
def _cos_sin_turns(t):
    """(cos 2 pi t, sin 2 pi t) for float32 ``t`` in [0, 1): the nearest quarter turn q taken off
    exactly (t is a multiple of 2**-24), then Cephes' sinf and cosf polynomials on [-pi/4, pi/4]."""
    q = np.floor(t * _f(4.0) + _f(0.5))
    r = (t - q * _f(0.25)) * _TWO_PI                # in [-pi/4, pi/4]
    z = r * r
    s = ((_f(-1.9515295891e-4) * z + _f(8.3321608736e-3)) * z + _f(-1.6666654611e-1)) * z * r + r
    c = ((_f(2.443315711809948e-5) * z + _f(-1.388731625493765e-3)) * z + _f(4.166664568298827e-2)) * (z * z)
    c = c - _f(0.5) * z + _f(1.0)
    quarter = np.int32(q) & np.int32(3)
    odd = (quarter & np.int32(1)) == np.int32(1)
    cos_t, sin_t = (s, c) if odd else (c, s)
    cos_t = -cos_t if quarter == np.int32(1) or quarter == np.int32(2) else cos_t
    sin_t = -sin_t if quarter >= np.int32(2) else sin_t
    return cos_t, sin_t


@njit(inline="always", **_JIT)
def _sigmoid32(x):
    """1 / (1 + exp(-x)) through exp(-|x|), so neither sign overflows."""
    e = _exp32(-abs(x))
    s = _f(1.0) / (_f(1.0) + e)
    return s if x >= _f(0.0) else e * s


_TANH_CLAMP = _f(7.90531110763549805)


@njit(inline="always", **_JIT)
def _tanh32(x):
    """tanh(x) by Eigen's float32 rational approximation: within 7 ulp (absolute error below 4e-7).

    Returns ``x`` itself below |x| = 4e-4 and +-1 beyond 9, as float32 tanh does.
    """
    xc = _TANH_CLAMP if x > _TANH_CLAMP else x     # NaN passes both clamps
    xc = -_TANH_CLAMP if xc < -_TANH_CLAMP else xc
    x2 = xc * xc
    p = _f(-2.76076847742355e-16)
    p = p * x2 + _f(2.00018790482477e-13)
    p = p * x2 + _f(-8.60467152213735e-11)
    p = p * x2 + _f(5.12229709037114e-08)
    p = p * x2 + _f(1.48572235717979e-05)
    p = p * x2 + _f(6.37261928875436e-04)
    p = p * x2 + _f(4.89352455891786e-03)
    q = _f(1.19825839466702e-06)
    q = q * x2 + _f(1.18534705686654e-04)
    q = q * x2 + _f(2.26843463243900e-03)
    q = q * x2 + _f(4.89352518554385e-03)
    t = xc * p / q
    a = abs(x)
    t = (_f(1.0) if x > _f(0.0) else _f(-1.0)) if a > _f(9.0) else t   # where float32 tanh is exactly 1
    return x if a < _f(4e-4) else t


# -- validation -----------------------------------------------------------------------------------


def _check(name, a, shape):
    if not isinstance(a, np.ndarray) or a.dtype != _F32 or not a.flags.c_contiguous:
        kind = type(a).__name__ if not isinstance(a, np.ndarray) else f"{a.dtype} array"
        contiguous = "" if not isinstance(a, np.ndarray) or a.flags.c_contiguous else " (not C-contiguous)"
        raise ValueError(f"{name}: the cpu kernels need a C-contiguous float32 NumPy array, "
                         f"got {kind}{contiguous}; use kernels.kernel_table('reference') for other arrays")
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")


def _check2d(name, a):
    _check(name, a, a.shape if isinstance(a, np.ndarray) and a.ndim == 2 else (-1, -1))
    return a.shape


def _check_flat(params, grads, m, v):
    """The four flat buffers: C-contiguous float32 1-D NumPy arrays of one size. Called per layer and
    step, so the usual case is one expression (0.35 us against 0.83 for four ``_check`` calls); the
    per-buffer checks name what is wrong."""
    n = params.shape
    if not (type(params) is type(grads) is type(m) is type(v) is np.ndarray
            and params.dtype is grads.dtype is m.dtype is v.dtype is _F32 and len(n) == 1
            and n == grads.shape == m.shape == v.shape and params.flags.c_contiguous
            and grads.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        shape = n if isinstance(params, np.ndarray) and params.ndim == 1 else (-1,)
        for name, a in (("params", params), ("grads", grads), ("m", m), ("v", v)):
            _check(name, a, shape)


@njit(**_JIT)
def _overlaps(a, b):
    a0, b0 = a.ctypes.data, b.ctypes.data
    return a0 < b0 + b.nbytes and b0 < a0 + a.nbytes


@njit(**_JIT)
def _overlaps_any(out, a, b, c, d, e, f):
    """Whether C-contiguous ``out``'s memory overlaps any of the others' (``np.may_share_memory``'s bounds
    test): one compiled call instead of six of NumPy's, 0.46 against 1.2 us."""
    return (_overlaps(out, a) or _overlaps(out, b) or _overlaps(out, c) or _overlaps(out, d)
            or _overlaps(out, e) or _overlaps(out, f))


_SCRATCH = threading.local()


def _scratch(kind, shape):
    """This thread's float32 buffer ``kind`` of ``shape``, made on first use (per thread, so that two
    threads training two models never share one), on cache lines (kernels/memory.py)."""
    buffers = _SCRATCH.__dict__.setdefault(kind, {})
    buffer = buffers.get(shape)
    if buffer is None:
        buffer = buffers[shape] = empty_aligned(shape)
    return buffer


# -- 1. reparameterization fused with the KL term ----------------------------------------------------


@njit(**_JIT)
def _reparameterize_kl(stats, eps, z_out):
    n_rows, n_latent = eps.shape
    total = 0.0
    for i in range(n_rows):
        acc = _f(0.0)
        for j in range(n_latent):
            mu = stats[i, j]
            logvar = stats[i, n_latent + j]
            std = _exp32(_f(0.5) * logvar)
            z_out[i, j] = mu + std * eps[i, j]
            acc = _radd(acc, _f(1.0) + logvar - mu * mu - _exp32(logvar))
        total += acc
    return -0.5 * total


@njit(**_JIT)
def _reparameterize_kl_backward(stats, eps, dz, knob, dstats_out):
    n_rows, n_latent = eps.shape
    kl_weight = knob[0]
    w = _f(kl_weight)
    half_w = _f(0.5 * kl_weight)
    for i in range(n_rows):
        for j in range(n_latent):
            mu = stats[i, j]
            std = _exp32(_f(0.5) * stats[i, n_latent + j])
            g = dz[i, j]
            dstats_out[i, j] = g + w * mu
            dstats_out[i, n_latent + j] = _f(0.5) * g * eps[i, j] * std + half_w * (std * std - _f(1.0))


def _check_reparam(stats, eps, *others):
    n_rows, n_latent = _check2d("eps", eps)
    _check("stats", stats, (n_rows, 2 * n_latent))
    for name, a, shape in others:
        _check(name, a, shape)
    return n_rows, n_latent


def reparameterize_kl_cpu(stats, eps, z_out):
    n_rows, n_latent = _check_reparam(stats, eps, ("z_out", z_out, eps.shape))
    return _launch(_reparameterize_kl, (stats, eps, z_out), whole="reparameterize_kl")


def reparameterize_kl_backward_cpu(stats, eps, dz, kl_weight, dstats_out):
    """``kl_weight``: a number, or a one-element float64 array read when the kernel runs (a knob)."""
    _check_reparam(stats, eps, ("dz", dz, eps.shape), ("dstats_out", dstats_out, stats.shape))
    _launch(_reparameterize_kl_backward, (stats, eps, dz, _knob("kl_weight", kl_weight), dstats_out),
            whole="reparameterize_kl_backward")


# -- 2. likelihoods fused with their gradient ----------------------------------------------------------


@njit(**_JIT)
def _bernoulli_rows(logits, x, g, dlogits_out, row_sums, lo, hi):
    n_cols = logits.shape[1]
    for i in range(lo, hi):
        acc = _f(0.0)
        for j in range(n_cols):
            l = logits[i, j]
            t = x[i, j]
            e = _exp32(-abs(l))                                   # in [0, 1]: never overflows
            s = _f(1.0) / (_f(1.0) + e)
            sigmoid = s if l >= _f(0.0) else e * s
            dlogits_out[i, j] = g * (sigmoid - t)
            relu = _f(0.0) if l < _f(0.0) else l                  # max(l, 0), keeping NaN
            acc = _radd(acc, relu + _log1p_unit(e) - t * l)       # softplus(l) - x l
        row_sums[i] = acc


@njit(**_JIT)
def _total_in_order(row_sums):
    total = 0.0
    for i in range(row_sums.size):
        total += row_sums[i]
    return total


@njit(**_JIT)
def _bernoulli_nll_grad(logits, x, grad_scale, dlogits_out, row_sums):
    _bernoulli_rows(logits, x, _f(grad_scale), dlogits_out, row_sums, 0, logits.shape[0])
    return _total_in_order(row_sums)


@njit(**_JIT_PARALLEL)
def _bernoulli_nll_grad_parallel(logits, x, grad_scale, dlogits_out, row_sums, n_chunks):
    """Rows in ``n_chunks`` ranges over Numba's threads; each row's sum in float32 lanes, the rows' sums
    then added in order in float64, as the serial kernel does: the same total on any thread count."""
    n_rows = logits.shape[0]
    g = _f(grad_scale)
    for c in prange(n_chunks):
        _bernoulli_rows(logits, x, g, dlogits_out, row_sums, c * n_rows // n_chunks, (c + 1) * n_rows // n_chunks)
    return _total_in_order(row_sums)


@njit(**_JIT)
def _gaussian_nll_grad(mean, x, inv_var, grad_scale, dmean_out):
    n_rows, n_cols = mean.shape
    g = _f(grad_scale * inv_var)
    total = 0.0
    for i in range(n_rows):
        acc = _f(0.0)
        for j in range(n_cols):
            d = mean[i, j] - x[i, j]
            dmean_out[i, j] = g * d
            acc = _radd(acc, d * d)
        total += acc
    return total


@njit(**_JIT)
def _gaussian_learned_nll_grad(out, x, grad_scale, dout_out):
    n_rows, n_pixels = x.shape
    g = _f(grad_scale)
    half_g = _f(0.5 * grad_scale)
    total = 0.0
    for i in range(n_rows):
        # 1-D row views: with them LLVM proves the two output halves apart and vectorises the loop
        mean, logvar = out[i, :n_pixels], out[i, n_pixels:]
        dmean, dlogvar = dout_out[i, :n_pixels], dout_out[i, n_pixels:]
        target = x[i]
        acc = _f(0.0)
        for j in range(n_pixels):
            d = mean[j] - target[j]
            s = logvar[j]
            inv_var = _exp32(-s)
            sq = d * d * inv_var
            dmean[j] = g * d * inv_var
            dlogvar[j] = half_g * (_f(1.0) - sq)
            acc = _radd(acc, sq + s)
        total += acc
    return total


def bernoulli_nll_grad_cpu(logits, x, grad_scale, dlogits_out):
    shape = _check2d("logits", logits)
    _check("x", x, shape)
    _check("dlogits_out", dlogits_out, shape)
    args = (logits, x, float(grad_scale), dlogits_out, _scratch("row sums", shape[:1]))
    if logits.size >= LOSS_PARALLEL_MIN and _pool_is_fast():
        return _launch(_bernoulli_nll_grad_parallel, (*args, _CHUNKS), pooled=True, whole="bernoulli_nll_grad")
    return _launch(_bernoulli_nll_grad, args, whole="bernoulli_nll_grad")


def gaussian_nll_grad_cpu(mean, x, logvar, grad_scale, dmean_out):
    shape = _check2d("mean", mean)
    _check("x", x, shape)
    _check("dmean_out", dmean_out, shape)
    inv_var = math.exp(-logvar)
    sq_sum = _gaussian_nll_grad(mean, x, inv_var, float(grad_scale), dmean_out)
    return 0.5 * inv_var * sq_sum + 0.5 * (logvar + LOG_2PI) * (shape[0] * shape[1])


def gaussian_learned_nll_grad_cpu(out, x, grad_scale, dout_out):
    n_rows, n_pixels = _check2d("x", x)
    _check("out", out, (n_rows, 2 * n_pixels))
    _check("dout_out", dout_out, (n_rows, 2 * n_pixels))
    total = _gaussian_learned_nll_grad(out, x, float(grad_scale), dout_out)
    return 0.5 * total + 0.5 * LOG_2PI * (n_rows * n_pixels)


# -- 3. Adam over one flat buffer ------------------------------------------------------------------


# Sums of squares run in float32 SIMD lanes over blocks of _SUM_BLOCK elements, each block's total then
# added in float64: a float64 accumulator halves the vector width and made Adam 2x slower, while a
# block of 4096 float32 terms loses nothing a gradient norm needs. Like the reference (which sums in
# float32 too), a gradient element above ~1.8e19 makes the norm Inf.
_SUM_BLOCK = 4096
# Adam's moments decay geometrically wherever a gradient stays exactly zero (a dead ReLU unit, an MNIST
# border pixel that is always 0): m reaches float32's subnormal range after ~850 steps, and arithmetic
# on subnormals is microcoded -- it made the whole update 1.6x slower in a seed-b4 run. Moments below
# the smallest normal float32 are therefore stored as 0 (what a flush-to-zero CPU mode would do); their
# effect on a parameter is below 1e-30. Only every _FLUSH_EVERY-th step does it, the others compiled
# without the compares: a moment is then subnormal for at most _FLUSH_EVERY - 1 steps before it is 0
# (and stays 0 while its gradient does). The compares made seed-b4's four layer updates 1.15x slower
# than none at all; flushing every 16th step, the whole step ran 1.049x faster than flushing in every
# one (one process, in turn, 22 of 24 rounds), and three MNIST epochs of `train --preset seed` ended on
# the same weights and v, 216 of 869,184 m subnormal instead of 0.
_TINY = np.float32(np.finfo(np.float32).tiny)
_FLUSH_EVERY = 16
_F32_MAX = float(np.finfo(np.float32).max)


@njit(inline="always", **_JIT)
def _flushes(step):
    """Whether Adam's step ``step`` flushes subnormal moments (``_FLUSH_EVERY``); the fused kernels ask
    it of the step in their knob when they run."""
    return step % _FLUSH_EVERY == 0


@njit(**_JIT)
def _sum_squares_block(a):
    acc = _f(0.0)
    for i in range(a.size):
        acc = _radd(acc, a[i] * a[i])
    return acc


@njit(**_JIT)
def _sum_squares(a):
    total = 0.0
    for lo in range(0, a.size, _SUM_BLOCK):      # blocks are slices: from-0 indices keep the loop vectorised
        total += _sum_squares_block(a[lo:lo + _SUM_BLOCK])
    return total


@njit(inline="always", **_JIT_ADAM)
def _adam_element(p, m, v, g, b1, b2, m_scale, v_scale, lr_t, root, eps32, wd, tiny):
    """One parameter's (p, m, v) after the update from its gradient ``g``."""
    m_i = _flushed(_fma32(m_scale, g, b1 * m), tiny)
    v_i = _flushed(_fma32(v_scale, g * g, b2 * v), tiny)
    return _decayed(p - lr_t * m_i / (math.sqrt(v_i) / root + eps32), p, wd), m_i, v_i


@njit(**_JIT_ADAM)
def _adam_block(params, grads, m, v, b1, b2, m_scale, v_scale, lr_t, root, eps32, wd, tiny):
    acc = _f(0.0)
    for i in range(params.size):
        g = grads[i]
        acc = _radd(acc, g * g)
        p_i, m_i, v_i = _adam_element(params[i], m[i], v[i], g, b1, b2, m_scale, v_scale, lr_t, root,
                                      eps32, wd, tiny)
        m[i] = m_i
        v[i] = v_i
        params[i] = p_i
    return acc


@njit(**_JIT_ADAM)
def _adam_serial(params, grads, m, v, beta1, beta2, c1, c2, step_size, root_corr, eps, decay, flush):
    """Updates every element; returns the sum of squares of the gradients it read (pre-clip). ``flush``:
    whether this step flushes subnormal moments (``_flushes``), each way its own compiled loop."""
    # float32 constants, as NumPy applies Python floats to float32 arrays in the reference
    b1, b2, m_scale, v_scale = _f(beta1), _f(beta2), _f(c1), _f(c2)
    lr_t, root, eps32, wd = _f(step_size), _f(root_corr), _f(eps), _decay32(decay)
    total = 0.0
    for lo in range(0, params.size, _SUM_BLOCK):
        hi = lo + _SUM_BLOCK
        if flush:
            total += _adam_block(params[lo:hi], grads[lo:hi], m[lo:hi], v[lo:hi], b1, b2, m_scale, v_scale,
                                 lr_t, root, eps32, wd, _TINY)
        else:
            total += _adam_block(params[lo:hi], grads[lo:hi], m[lo:hi], v[lo:hi], b1, b2, m_scale, v_scale,
                                 lr_t, root, eps32, wd, None)
    return total


@njit(**_JIT_PARALLEL)
def _adam_parallel(params, grads, m, v, beta1, beta2, c1, c2, step_size, root_corr, eps, decay, flush, blocks,
                   n_chunks):
    """Chunk c updates the c-th range of rows of every layer's W -- the rows that chunk c of the
    small-batch gradient kernels wrote, on the same thread -- and the last chunk the biases too. The
    update is element-wise, so it is the same whichever thread runs a chunk (the norm's float64 total
    is summed per chunk, so it differs from _adam_serial's in the last bits; clipping never uses it)."""
    acc = 0.0
    for c in prange(n_chunks):
        for layer in range(blocks.shape[0]):
            offset, n_in, n_out = blocks[layer, 0], blocks[layer, 1], blocks[layer, 2]
            lo = offset + c * n_in // n_chunks * n_out
            hi = offset + ((c + 1) * n_in // n_chunks + (c == n_chunks - 1)) * n_out
            acc += _adam_serial(params[lo:hi], grads[lo:hi], m[lo:hi], v[lo:hi], beta1, beta2, c1, c2,
                                step_size, root_corr, eps, decay, flush)
    return acc


_WHOLE_BUFFERS = {}


def _whole_buffer(n):
    """``blocks`` for a buffer of ``n`` parameters with no layout given: one block of n - 1 rows of one
    element and a last "bias" row, so the chunks are 16 equal slices (made once per size)."""
    blocks = _WHOLE_BUFFERS.get(n)
    if blocks is None:
        blocks = _WHOLE_BUFFERS[n] = np.array([[0, n - 1, 1]], np.int64)
    return blocks


@njit(**_JIT)
def _blocks_tile(blocks, n):
    """Whether the (offset, n_in, n_out) rows cover 0..n with (n_in + 1) x n_out blocks in order."""
    end = 0
    for layer in range(blocks.shape[0]):
        offset, n_in, n_out = blocks[layer, 0], blocks[layer, 1], blocks[layer, 2]
        if offset != end or n_in < 1 or n_out < 1:
            return False
        end = offset + (n_in + 1) * n_out
    return blocks.shape[0] > 0 and end == n


def _check_blocks(blocks, n):
    if not (isinstance(blocks, np.ndarray) and blocks.dtype == np.int64 and blocks.ndim == 2
            and blocks.shape[1] == 3 and blocks.flags.c_contiguous):
        raise ValueError("blocks must be a C-contiguous int64 array of rows (offset, n_in, n_out)")
    if not _blocks_tile(blocks, n):
        raise ValueError(f"blocks must tile the {n} parameters with (n_in + 1, n_out) blocks in order")


def _adam_constants(step, lr, beta1, beta2, eps, weight_decay, scale):
    """The scalars the Adam kernels take after the four buffers, with the gradient scaled by ``scale``;
    the decay None where there is none (see ``_decayed``)."""
    b1, b2 = float(beta1), float(beta2)
    return (b1, b2, (1.0 - b1) * scale, (1.0 - b2) * scale * scale, lr / (1.0 - b1 ** step),
            math.sqrt(1.0 - b2 ** step), float(eps), lr * weight_decay if weight_decay else None)


def adam_step_cpu(params, grads, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.0, clip_norm=0.0, blocks=None):
    """One pass over the buffers (two when clipping: the norm must be known first).

    The update runs in float32 with the reference's constants, flushing subnormal moments to zero
    every ``_FLUSH_EVERY``-th step; the norm is summed in float32 blocks added in float64 (see
    ``_SUM_BLOCK``).
    Over every core while OpenBLAS's threads are idle (see ``_pooled``): given the layers' ``blocks``,
    each thread takes the rows of every layer that the small-batch gradient kernels gave it (see
    kernels/config.py: in the machine's slow phases that made a seed-b4 step 352 us instead of 541).
    """
    _check_flat(params, grads, m, v)
    if blocks is not None:
        _check_blocks(blocks, params.size)
    pooled = params.size >= ADAM_PARALLEL_MIN and _pool_is_fast()
    if clip_norm > 0:
        sq = _sum_squares(grads)      # serially even when the update is not: the clip scale stays exact
        norm = math.sqrt(sq)
        ratio = clip_norm / (norm + 1e-6)
        scale = ratio if ratio < 1.0 else 1.0      # a NaN norm leaves scale at 1, as min(1, nan) does
    else:
        norm, scale = None, 1.0
    args = (params, grads, m, v, *_adam_constants(step, lr, beta1, beta2, eps, weight_decay, scale),
            _flushes(step))
    if pooled:
        sq = _pooled(_adam_parallel, *args, _whole_buffer(params.size) if blocks is None else blocks, _CHUNKS)
    else:
        sq = _adam_serial(*args)
    return math.sqrt(sq) if norm is None else norm


# -- 4. bias + activation ------------------------------------------------------------------------------

@njit(**_JIT)
def _bias_act(h, bias, code):
    n_rows, n_cols = h.shape
    # one loop nest per activation, so each inner loop is branch-free and vectorises
    if code == 0:
        for i in range(n_rows):
            for j in range(n_cols):
                h[i, j] = h[i, j] + bias[j]
    elif code == 1:
        for i in range(n_rows):
            for j in range(n_cols):
                pre = h[i, j] + bias[j]
                h[i, j] = _f(0.0) if pre < _f(0.0) else pre
    elif code == 2:
        for i in range(n_rows):
            for j in range(n_cols):
                h[i, j] = _tanh32(h[i, j] + bias[j])
    else:
        for i in range(n_rows):
            for j in range(n_cols):
                h[i, j] = _sigmoid32(h[i, j] + bias[j])


@njit(**_JIT)
def _bias_act_backward(dy, y, code, dpre_out, dbias_out, in_place):
    n_rows, n_cols = dy.shape
    for j in range(n_cols):
        dbias_out[j] = _f(0.0)
    # Row by row, two simple loops: first the row of dpre (unit stride, a select rather than a
    # branch, so it vectorises: a ReLU's pattern of active units is random and a branch mispredicts
    # on half of them), then that finished row added into the bias sum. In place, dpre is read and
    # written as one array: read as ``dy``, LLVM's run-time check that the two do not overlap fails
    # (they are the same memory) and the scalar loop runs, 3x slower.
    for i in range(n_rows):
        if code == 0:
            if not in_place:                  # identity in place: dpre is dy already
                for j in range(n_cols):
                    dpre_out[i, j] = dy[i, j]
        elif code == 1:
            if in_place:
                for j in range(n_cols):
                    d = dpre_out[i, j]        # loaded unconditionally, so the select vectorises
                    dpre_out[i, j] = d if y[i, j] > _f(0.0) else _f(0.0)
            else:
                for j in range(n_cols):
                    d = dy[i, j]
                    dpre_out[i, j] = d if y[i, j] > _f(0.0) else _f(0.0)
        elif code == 2:
            if in_place:
                for j in range(n_cols):
                    t = y[i, j]
                    dpre_out[i, j] = dpre_out[i, j] * (_f(1.0) - t * t)
            else:
                for j in range(n_cols):
                    t = y[i, j]
                    dpre_out[i, j] = dy[i, j] * (_f(1.0) - t * t)
        else:
            if in_place:
                for j in range(n_cols):
                    s = y[i, j]
                    dpre_out[i, j] = dpre_out[i, j] * s * (_f(1.0) - s)
            else:
                for j in range(n_cols):
                    s = y[i, j]
                    dpre_out[i, j] = dy[i, j] * s * (_f(1.0) - s)
        for j in range(n_cols):
            dbias_out[j] += dpre_out[i, j]


def bias_act_cpu(h, bias, activation):
    code = activation_code(activation)
    n_rows, n_cols = _check2d("h", h)
    _check("bias", bias, (n_cols,))
    _launch(_bias_act, (h, bias, code), whole="bias_act")


def bias_act_backward_cpu(dy, y, activation, dpre_out, dbias_out):
    code = activation_code(activation)
    shape = _check2d("dy", dy)
    _check("y", y, shape)
    _check("dpre_out", dpre_out, shape)
    _check("dbias_out", dbias_out, (shape[1],))
    _launch(_bias_act_backward, (dy, y, code, dpre_out, dbias_out, dpre_out is dy), whole="bias_act_backward")


# -- noise ----------------------------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _normal_pair(u0, u1):
    r = np.sqrt(_f(-2.0) * _log_normal32(_f(1.0) - u0))
    c, s = _cos_sin_turns(u1)
    return r * c, r * s


@njit(**_JIT)
def _box_muller(u, out):
    for k in range(out.size // 2):
        out[2 * k], out[2 * k + 1] = _normal_pair(u[2 * k], u[2 * k + 1])
    if out.size % 2:
        out[out.size - 1] = _normal_pair(u[out.size - 1], u[out.size])[0]


def normal_from_uniform_cpu(u, out):
    """See :mod:`kernels.noise`; each number within 4 * 2**-24 * r of the float64 reference (2 ulp of r
    measured over a million pairs)."""
    shape = out.shape if isinstance(out, np.ndarray) else ()
    _check("out", out, shape)
    _check("u", u, (uniform_count(out.size),))
    _box_muller(u, out.reshape(-1))


# -- pixels ------------------------------------------------------------------------------------------
_UNIT = _f(1.0 / 255.0)


@njit(**_JIT)
def _pixels(src, out, lo, hi):
    """Columns lo..hi. Each row's are a slice of the whole row (Numba keeps it contiguous): converted
    through ``src[:, lo:hi]``, whose rows have the any-layout type, the loop did not vectorise and the
    split conversion took 15.7 us at 128x784 instead of 4.1."""
    for i in range(src.shape[0]):
        s, o = src[i, lo:hi], out[i, lo:hi]
        for j in range(s.size):
            o[j] = _f(s[j]) * _UNIT


@njit(**_JIT_PARALLEL)
def _pixels_parts(src, out, n_parts):
    """Part q converts the columns that part q of the split products reads: the first layer's
    forward over W's rows and its weight gradient by dW's rows both cut x's columns at ``_bound``."""
    n_cols = src.shape[1]
    for q in prange(n_parts):
        lo, hi = blas_pool._bound(q, n_cols, n_parts), blas_pool._bound(q + 1, n_cols, n_parts)
        _pixels(src, out, lo, hi)


def pixels_cpu(src, out):
    """In one pass: the same float32 product (and bits) as NumPy's cast and then multiply in place,
    which is two passes (128 x 784: 2.7 us against 11.8). Where products are split, each thread
    converts the columns its parts of the first layer will read, so that no thread reads pixels that
    the other core wrote."""
    shape = _check2d("out", out)
    if not (isinstance(src, np.ndarray) and src.dtype == np.uint8 and src.shape == shape):
        raise ValueError(f"src must be a uint8 array of shape {shape}")
    if _split_blas(shape[0]) is None:
        _pixels(src, out, 0, shape[1])
    else:
        _pixels_parts(src, out, blas_pool.thread_count())


# -- 5. matmul with a small batch on one side -----------------------------------------------------------
# Each kernel takes the batch four rows at a time so that one load of a row of W feeds four rows of the
# batch, and handles the last B % 4 rows one at a time (never padding with zero rows: 0 * Inf would
# turn an Inf into a NaN that the BLAS product does not have).


def _vector_lanes():
    """float32 lanes in the vector registers Numba compiles for: 16 with AVX-512, else 8 (an AVX2
    machine's 16 registers would hold only half of ``_rows4_add``'s broadcasts at 16 lanes)."""
    if _NUMBA_CPU_FEATURES is not None:       # NUMBA_CPU_FEATURES, as "+avx2,+avx512f,..."
        return 16 if "+avx512f" in _NUMBA_CPU_FEATURES.split(",") else 8
    return 16 if llvm_binding.get_host_cpu_features().get("avx512f") else 8


_LANES = _vector_lanes()


@intrinsic
def _rows4_add(typingctx, y0, y1, y2, y3, w0, w1, w2, w3, a, n):
    """``y_r[:n] += a[4r] * w0[:n] + a[4r + 1] * w1[:n] + a[4r + 2] * w2[:n] + a[4r + 3] * w3[:n]`` for r = 0-3,
    ``_LANES`` columns a step, each sum rounded as LLVM rounds that expression under 'contract' (the
    second product first, then three fused multiply-adds, then the add to y), so the same bits as the
    loop it replaces in ``_rows_times``. Written out in LLVM IR because Numba's loop kept both the sixteen
    coefficients and their sixteen broadcasts live (its scalar loop, for columns past a multiple of 16
    and for arrays that overlap, needs the first): five broadcasts spilled to the stack and were reloaded
    every 16 columns. Here the last columns take the broadcasts' first lanes. Half of a batch-4 784x400
    product (392 rows of W, what one thread does) alone: 9.0 against 7.3 us, 6.6 against 5.6 us in a
    faster phase; the same bits at 400, 37, 16 and 5 columns. Each product's rounding is now spelled
    out, so code loaded from the cache rounds as code compiled in the process (see ``_fma32``)."""
    arrays = (y0, y1, y2, y3, w0, w1, w2, w3)
    if not all(isinstance(t, types.Array) and t.ndim == 1 and t.dtype == types.float32 and t.layout == "C"
               for t in arrays):                   # rows of unit stride
        return None
    if not (isinstance(a, types.UniTuple) and a.count == 16 and a.dtype == types.float32):
        return None
    if not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        f32, i32 = ir.FloatType(), ir.IntType(32)
        vec = ir.VectorType(f32, _LANES)
        intp = context.get_value_type(types.intp)
        ptrs = [context.make_array(t)(context, builder, v).data for t, v in zip(signature.args[:8], args[:8])]
        scalars = cgutils.unpack_tuple(builder, args[8], 16)
        zeros = ir.Constant(ir.VectorType(i32, _LANES), [0] * _LANES)
        undef = ir.Constant(vec, ir.Undefined)
        splat = [builder.shuffle_vector(builder.insert_element(undef, s, ir.Constant(i32, 0)), undef, zeros)
                 for s in scalars]
        lane0 = [builder.extract_element(v, ir.Constant(i32, 0)) for v in splat]
        count = context.cast(builder, args[9], signature.args[9], types.intp)
        n_vec = builder.and_(count, ir.Constant(intp, -_LANES))

        fmas = {ty: cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * 3), name)
                for ty, name in ((vec, f"llvm.fma.v{_LANES}f32"), (f32, "llvm.fma.f32"))}

        def row_sum(coeffs, c):
            fma = fmas[c[0].type]
            t = builder.fmul(coeffs[1], c[1])
            t = builder.call(fma, [coeffs[0], c[0], t])
            t = builder.call(fma, [coeffs[2], c[2], t])
            return builder.call(fma, [coeffs[3], c[3], t])

        def loop(name, start, stop, step, body):
            entry = builder.block
            head = builder.append_basic_block(name + ".body")
            done = builder.append_basic_block(name + ".done")
            builder.cbranch(builder.icmp_signed("<", start, stop), head, done)
            builder.position_at_end(head)
            j = builder.phi(intp)
            j.add_incoming(start, entry)
            body(j)
            nxt = builder.add(j, ir.Constant(intp, step))
            j.add_incoming(nxt, builder.block)
            builder.cbranch(builder.icmp_signed("<", nxt, stop), head, done)
            builder.position_at_end(done)

        def vector_body(j):
            at = lambda p: builder.bitcast(builder.gep(p, [j]), vec.as_pointer())
            c = [builder.load(at(p), align=4) for p in ptrs[4:]]
            for r in range(4):
                t = row_sum(splat[4 * r:4 * r + 4], c)
                yp = at(ptrs[r])
                builder.store(builder.fadd(builder.load(yp, align=4), t), yp, align=4)

        def scalar_body(k):
            # fewer than _LANES columns: a loop of a constant _LANES - 1 steps, each guarded, which the
            # vectoriser leaves alone (a loop to ``count`` it vectorised, with run-time alias checks)
            j = builder.add(n_vec, k)
            with builder.if_then(builder.icmp_signed("<", j, count)):
                c = [builder.load(builder.gep(p, [j])) for p in ptrs[4:]]
                for r in range(4):
                    t = row_sum(lane0[4 * r:4 * r + 4], c)
                    yp = builder.gep(ptrs[r], [j])
                    builder.store(builder.fadd(builder.load(yp), t), yp)

        loop("rows4v", ir.Constant(intp, 0), n_vec, _LANES, vector_body)
        loop("rows4s", ir.Constant(intp, 0), ir.Constant(intp, _LANES - 1), 1, scalar_body)
        return context.get_dummy_value()

    return types.none(*arrays, a, n), codegen


@njit(**_JIT)
def _rows_times(x, W, out):
    """out = x @ W: rows of W added into four output rows at once, four rows of W per pass."""
    n_rows, n_in = x.shape
    n_out = W.shape[1]
    for r in range(n_rows):
        o = out[r]
        for j in range(n_out):
            o[j] = _f(0.0)
    r = 0
    while r < n_rows:
        if r + 4 <= n_rows:
            y0, y1, y2, y3 = out[r], out[r + 1], out[r + 2], out[r + 3]
            x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
            i = 0
            while i + 4 <= n_in:
                w0, w1, w2, w3 = W[i], W[i + 1], W[i + 2], W[i + 3]
                _rows4_add(y0, y1, y2, y3, w0, w1, w2, w3,
                           (x0[i], x0[i + 1], x0[i + 2], x0[i + 3], x1[i], x1[i + 1], x1[i + 2], x1[i + 3],
                            x2[i], x2[i + 1], x2[i + 2], x2[i + 3], x3[i], x3[i + 1], x3[i + 2], x3[i + 3]),
                           n_out)
                i += 4
            for i in range(i, n_in):
                w0 = W[i]
                a0, a1, a2, a3 = x0[i], x1[i], x2[i], x3[i]
                for j in range(n_out):
                    c0 = w0[j]
                    y0[j] += a0 * c0
                    y1[j] += a1 * c0
                    y2[j] += a2 * c0
                    y3[j] += a3 * c0
            r += 4
        else:
            y0, x0 = out[r], x[r]
            i = 0
            while i + 4 <= n_in:
                w0, w1, w2, w3 = W[i], W[i + 1], W[i + 2], W[i + 3]
                a0, a1, a2, a3 = x0[i], x0[i + 1], x0[i + 2], x0[i + 3]
                for j in range(n_out):
                    y0[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j]
                i += 4
            for i in range(i, n_in):
                w0, a0 = W[i], x0[i]
                for j in range(n_out):
                    y0[j] += a0 * w0[j]
            r += 1


@njit(**_JIT)
def _rank_update(x, d, out, lo, hi):
    """out[lo:hi] = (x.T @ d)[lo:hi]: row i of out is the sum over the batch of x[r, i] * d[r].

    The first block of rows is stored, not added to a zeroed row: at a batch of 4 that is the only
    pass over the row (10-25% faster on the seed network's layers). Needs a batch of at least one row
    (``matmul_cpu`` hands an empty one to NumPy)."""
    n_rows = x.shape[0]
    n_out = d.shape[1]
    for i in range(lo, hi):
        o = out[i]
        if n_rows >= 4:
            a0, a1, a2, a3 = x[0, i], x[1, i], x[2, i], x[3, i]
            e0, e1, e2, e3 = d[0], d[1], d[2], d[3]
            for j in range(n_out):
                o[j] = a0 * e0[j] + a1 * e1[j] + a2 * e2[j] + a3 * e3[j]
            r = 4
        else:
            a0, e0 = x[0, i], d[0]
            for j in range(n_out):
                o[j] = a0 * e0[j]
            r = 1
        while r + 4 <= n_rows:
            a0, a1, a2, a3 = x[r, i], x[r + 1, i], x[r + 2, i], x[r + 3, i]
            e0, e1, e2, e3 = d[r], d[r + 1], d[r + 2], d[r + 3]
            for j in range(n_out):
                o[j] += a0 * e0[j] + a1 * e1[j] + a2 * e2[j] + a3 * e3[j]
            r += 4
        for r in range(r, n_rows):
            a0, e0 = x[r, i], d[r]
            for j in range(n_out):
                o[j] += a0 * e0[j]


@njit(**_JIT)
def _dots(d, W, out, lo, hi):
    """out[:, lo:hi] = (d @ W.T)[:, lo:hi]: out[r, i] is the dot product of d[r] with row i of W
    (summed reassociably). Four rows of d against two rows of W at a time: eight sums share each load
    (a third faster than one row of W at a time on the seed network's layers)."""
    n_rows, n_out = d.shape
    r = 0
    while r < n_rows:
        if r + 4 <= n_rows:
            e0, e1, e2, e3 = d[r], d[r + 1], d[r + 2], d[r + 3]
            i = lo
            while i + 2 <= hi:
                w, u = W[i], W[i + 1]
                s0 = s1 = s2 = s3 = t0 = t1 = t2 = t3 = _f(0.0)
                for j in range(n_out):
                    c, c2 = w[j], u[j]
                    f0, f1, f2, f3 = e0[j], e1[j], e2[j], e3[j]
                    s0 = _radd(s0, f0 * c)
                    s1 = _radd(s1, f1 * c)
                    s2 = _radd(s2, f2 * c)
                    s3 = _radd(s3, f3 * c)
                    t0 = _radd(t0, f0 * c2)
                    t1 = _radd(t1, f1 * c2)
                    t2 = _radd(t2, f2 * c2)
                    t3 = _radd(t3, f3 * c2)
                out[r, i], out[r + 1, i], out[r + 2, i], out[r + 3, i] = s0, s1, s2, s3
                out[r, i + 1], out[r + 1, i + 1], out[r + 2, i + 1], out[r + 3, i + 1] = t0, t1, t2, t3
                i += 2
            if i < hi:
                w = W[i]
                s0 = s1 = s2 = s3 = _f(0.0)
                for j in range(n_out):
                    c = w[j]
                    s0 = _radd(s0, e0[j] * c)
                    s1 = _radd(s1, e1[j] * c)
                    s2 = _radd(s2, e2[j] * c)
                    s3 = _radd(s3, e3[j] * c)
                out[r, i], out[r + 1, i], out[r + 2, i], out[r + 3, i] = s0, s1, s2, s3
            r += 4
        else:
            e0 = d[r]
            for i in range(lo, hi):
                w = W[i]
                s0 = _f(0.0)
                for j in range(n_out):
                    s0 = _radd(s0, e0[j] * w[j])
                out[r, i] = s0
            r += 1


# The gradients' kernels in _CHUNKS ranges of rows of W, run through _pooled. The forward splits the
# sum over the rows of W into _FORWARD_PARTS partial products added in a fixed order (split by columns
# over two threads it was slower than serial: rows of 200 floats; split this way, the seed network's
# four forward products took 41 us instead of 63 on the project's 2-core machine). Like the others it
# runs only on a fast pool (kernels/config.py): under the workqueue layer even its one-thread launch
# made a seed-b4 step 845 us instead of 463. Its sums differ from the serial kernel's in the last bits,
# so the same run on a machine without a fast pool does not repeat them (resumes there still do).
_FORWARD_PARTS = 4


@njit(**_JIT_PARALLEL)
def _rows_times_parallel(x, W, out, parts):
    """out = x @ W as the sum of ``len(parts)`` products over ranges of rows of W, each into its
    ``parts[c]``, added in order: the same bits on one thread or many."""
    n_parts, n_in = parts.shape[0], W.shape[0]
    for c in prange(n_parts):
        lo, hi = c * n_in // n_parts, (c + 1) * n_in // n_parts
        _rows_times(x[:, lo:hi], W[lo:hi], parts[c])
    _sum_parts(parts, out, 0, out.shape[0])


@njit(**_JIT_PARALLEL)
def _rows_times_act_parallel(x, W, bias, code, out, parts):
    """``out = act(x @ W + bias)``: ``_rows_times_parallel``'s parts, added in order with the bias and
    activation in the same call (a seed-b4 step 1.032x faster than the product and then ``bias_act``: one
    launch and one pass a layer fewer)."""
    n_parts, n_in = parts.shape[0], W.shape[0]
    for c in prange(n_parts):
        lo, hi = c * n_in // n_parts, (c + 1) * n_in // n_parts
        _rows_times(x[:, lo:hi], W[lo:hi], parts[c])
    _sum_parts_bias_act(parts, bias, code, out, 0, out.shape[0])


@njit(**_JIT_PARALLEL)
def _rank_update_parallel(x, d, out, n_chunks):
    n_in = x.shape[1]
    for c in prange(n_chunks):
        _rank_update(x, d, out, c * n_in // n_chunks, (c + 1) * n_in // n_chunks)


@njit(**_JIT_PARALLEL)
def _dots_parallel(d, W, out, n_chunks):
    n_in = W.shape[0]
    for c in prange(n_chunks):
        _dots(d, W, out, c * n_in // n_chunks, (c + 1) * n_in // n_chunks)


@njit(inline="always", **_JIT)
def _bias_corrections(lr, beta1, beta2, count):
    """Adam's ``lr / (1 - b1**t)`` and ``sqrt(1 - b2**t)`` for the step t in the knob ``count``: the bits
    ``_adam_constants`` gets in Python (the same libm ``pow``; checked for t up to 3 million)."""
    step = count[0]
    return lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step)


@njit(**_JIT)
def _dot64(a, b):
    acc = 0.0
    for k in range(a.size):
        acc = _radd(acc, np.float64(a[k]) * np.float64(b[k]))
    return acc


@njit(**_JIT)
def _weight_squares(x, d):
    """The squared norm of the weight gradient ``x.T @ d`` of a small batch, from the batch's two Gram
    matrices: sum over r, s of (x x.T)[r, s] (d d.T)[r, s], B^2 (n_in + n_out) products. Summed inside the
    update instead, one more add per weight, the seed network's four layer updates took 7.4% longer (one
    process, in turn, 30 of 30 rounds). Where the result is not finite or beyond float32's range, the
    float32 gradient's own squares (``_weight_squares_direct``): a NaN or Inf reports as it did."""
    n_rows = x.shape[0]
    total = 0.0
    for r in range(n_rows):
        for s in range(r + 1):
            term = _dot64(x[r], x[s]) * _dot64(d[r], d[s])
            total += term if r == s else 2.0 * term
    if not total <= _F32_MAX:                       # NaN too
        return _weight_squares_direct(x, d)
    return max(total, 0.0)                          # a sum of squares, rounding below zero at most


@njit(**_JIT)
def _weight_squares_direct(x, d):
    total = 0.0
    for i in range(x.shape[1]):
        for j in range(d.shape[1]):
            g = _f(0.0)
            for r in range(x.shape[0]):
                g += x[r, i] * d[r, j]
            total += g * g                          # a float32 square: beyond ~1.8e19 it is Inf
    return total


# The fused small-batch update keeps this many rows of delta in registers: two blocks of four, the
# rows past the batch zero (a larger config.CPU_SMALL_BATCH leaves its larger batches to the plain kernels).
_REGISTER_ROWS = 8


@njit(**_JIT_ADAM)
def _rows_adam(xt, e, two_blocks, W, M, V, lo, hi, adam):
    """Rows lo..hi of W (and of Adam's M and V) updated from their gradient, each element
    ``xt[i] @ e[:, j]`` computed in registers and used at once: the weight gradient is never stored.
    ``xt`` (n_in, 8) and ``e`` (8, n_out) are x transposed and delta, zero past the batch (zero times
    zero: padding a real row of delta with x's zeros would turn an Inf into a NaN); ``adam`` the float32
    constants ``_adam_element`` takes after the gradient. The gradient's squares are summed apart
    (``_weight_squares``)."""
    e0, e1, e2, e3, e4, e5, e6, e7 = e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]
    b1, b2, m_scale, v_scale, lr_t, root, eps32, wd, tiny = adam
    for i in range(lo, hi):
        a = xt[i]
        a0, a1, a2, a3, a4, a5, a6, a7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
        p, m, v = W[i], M[i], V[i]
        # m and v stored before p: the other order made the 784x400 layer 48.8 us instead of 39.1
        if two_blocks:
            for j in range(p.size):
                g = ((a0 * e0[j] + a1 * e1[j] + a2 * e2[j] + a3 * e3[j])
                     + (a4 * e4[j] + a5 * e5[j] + a6 * e6[j] + a7 * e7[j]))
                p_j, m[j], v[j] = _adam_element(p[j], m[j], v[j], g, b1, b2, m_scale, v_scale, lr_t, root,
                                                eps32, wd, tiny)
                p[j] = p_j
        else:                                     # a batch of at most 4: half the loads (seed-b4 1.2x faster)
            for j in range(p.size):
                g = a0 * e0[j] + a1 * e1[j] + a2 * e2[j] + a3 * e3[j]
                p_j, m[j], v[j] = _adam_element(p[j], m[j], v[j], g, b1, b2, m_scale, v_scale, lr_t, root,
                                                eps32, wd, tiny)
                p[j] = p_j


@njit(**_JIT_ADAM)
def _rows_adam_dx(xt, e, two_blocks, W, M, V, dx, lo, hi, adam):
    """``_rows_adam`` that also writes column i of ``dx`` (``dx.shape[0]`` rows of delta @ W.T) from the
    weights it reads for the update, before updating them: the dot products cost the update no load.
    Against their own pass over W first (``_dots``), a seed-b4 step 1.041x faster (one process, in turn,
    24 of 24 alternations). The sums are reassociated as LLVM vectorises them, not as ``_dots`` adds.
    A function of its own, indexing W, M and V in two dimensions: one function for both cases, through
    row views as ``_rows_adam`` (which a layer without dx keeps) indexes, measured no faster than the
    old pass, and its layer without dx slower (56 -> 60 us in the step, slow phase)."""
    b1, b2, m_scale, v_scale, lr_t, root, eps32, wd, tiny = adam
    for i in range(lo, hi):
        if two_blocks:
            a0, a1, a2, a3 = xt[i, 0], xt[i, 1], xt[i, 2], xt[i, 3]
            a4, a5, a6, a7 = xt[i, 4], xt[i, 5], xt[i, 6], xt[i, 7]
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = _f(0.0)
            for j in range(W.shape[1]):
                w = W[i, j]
                f0, f1, f2, f3 = e[0, j], e[1, j], e[2, j], e[3, j]
                f4, f5, f6, f7 = e[4, j], e[5, j], e[6, j], e[7, j]
                s0, s1, s2, s3 = _radd(s0, f0 * w), _radd(s1, f1 * w), _radd(s2, f2 * w), _radd(s3, f3 * w)
                s4, s5, s6, s7 = _radd(s4, f4 * w), _radd(s5, f5 * w), _radd(s6, f6 * w), _radd(s7, f7 * w)
                g = (a0 * f0 + a1 * f1 + a2 * f2 + a3 * f3) + (a4 * f4 + a5 * f5 + a6 * f6 + a7 * f7)
                p_j, M[i, j], V[i, j] = _adam_element(w, M[i, j], V[i, j], g, b1, b2, m_scale, v_scale, lr_t, root,
                                                      eps32, wd, tiny)
                W[i, j] = p_j
            sums = (s0, s1, s2, s3, s4, s5, s6, s7)
        else:
            a0, a1, a2, a3 = xt[i, 0], xt[i, 1], xt[i, 2], xt[i, 3]
            s0 = s1 = s2 = s3 = _f(0.0)
            for j in range(W.shape[1]):
                w = W[i, j]
                f0, f1, f2, f3 = e[0, j], e[1, j], e[2, j], e[3, j]
                s0, s1, s2, s3 = _radd(s0, f0 * w), _radd(s1, f1 * w), _radd(s2, f2 * w), _radd(s3, f3 * w)
                g = a0 * f0 + a1 * f1 + a2 * f2 + a3 * f3
                p_j, M[i, j], V[i, j] = _adam_element(w, M[i, j], V[i, j], g, b1, b2, m_scale, v_scale, lr_t, root,
                                                      eps32, wd, tiny)
                W[i, j] = p_j
            sums = (s0, s1, s2, s3, s0, s1, s2, s3)        # one block: rows 4-7 are never stored
        for r in range(dx.shape[0]):
            dx[r, i] = sums[r]


@njit(inline="always", **_JIT_ADAM)
def _update_rows(xt, e, two_blocks, W, M, V, dx, lo, hi, adam):
    """``_rows_adam_dx``, or ``_rows_adam`` for a layer whose dx has no rows."""
    if dx.shape[0]:
        _rows_adam_dx(xt, e, two_blocks, W, M, V, dx, lo, hi, adam)
    else:
        _rows_adam(xt, e, two_blocks, W, M, V, lo, hi, adam)


@njit(**_JIT_PARALLEL)
def _layer_backward_adam(x, d, pads, params, grads, m, v, offset, n_out, dx, beta1, beta2, c1, c2, lr, count,
                         eps, decay):
    """Chunk c updates rows c/_CHUNKS of W from their gradient, never stored (``_rows_adam``), and writes
    its columns of dx from W as it was, in the same pass (``_rows_adam_dx``; no dx when it has no rows)
    -- and the last chunk the bias, whose gradient is in ``grads``, while the first sums the weight
    gradient's squares (``_weight_squares``); returns the sum of squared gradients. ``pads`` is scratch
    for delta and x transposed, padded to _REGISTER_ROWS rows. A chunk is the same whichever thread runs
    it, and only those two add to the sum: it is the same on any number of threads.

    Not storing dW saves a write and a read for ownership of every weight's gradient: a seed-b4 step
    256 -> 235 us (one process, in turn; 30 of 30 alternations) against dW written into ``grads`` by the
    small-batch weight-gradient kernel and Adam then reading it, whose bits it does not repeat.

    ``count`` is a one-element float64 array holding Adam's step (a knob: see ``_launch``), as in the
    split's two kernels below (``_bias_corrections``)."""
    step_size, root_corr = _bias_corrections(lr, beta1, beta2, count)
    n_rows, n_in = x.shape
    end = offset + n_in * n_out
    W = params[offset:end].reshape((n_in, n_out))
    e = pads[:_REGISTER_ROWS * n_out].reshape((_REGISTER_ROWS, n_out))
    xt = pads[_REGISTER_ROWS * n_out:].reshape((n_in, _REGISTER_ROWS))
    for r in range(_REGISTER_ROWS):
        for j in range(n_out):
            e[r, j] = d[r, j] if r < n_rows else _f(0.0)
    M, V = m[offset:end].reshape((n_in, n_out)), v[offset:end].reshape((n_in, n_out))
    adam = (_f(beta1), _f(beta2), _f(c1), _f(c2), _f(step_size), _f(root_corr), _f(eps), _decay32(decay))
    flush = _flushes(count[0])
    acc = 0.0
    for c in prange(_CHUNKS):
        lo, hi = c * n_in // _CHUNKS, (c + 1) * n_in // _CHUNKS
        for i in range(lo, hi):
            for r in range(_REGISTER_ROWS):
                xt[i, r] = x[r, i] if r < n_rows else _f(0.0)
        if c == 0:
            acc += _weight_squares(x, d)
        if flush:                                 # two compiled loops: see _FLUSH_EVERY
            _update_rows(xt, e, n_rows > 4, W, M, V, dx, lo, hi, adam + (_TINY,))
        else:
            _update_rows(xt, e, n_rows > 4, W, M, V, dx, lo, hi, adam + (None,))
        if c == _CHUNKS - 1:
            acc += _adam_serial(params[end:end + n_out], grads[end:end + n_out], m[end:end + n_out],
                                v[end:end + n_out], beta1, beta2, c1, c2, step_size, root_corr, eps, decay, flush)
    return acc


_NO_DX = np.empty((0, 0), _F32)


@njit(**_JIT_PARALLEL)
def _layer_parts_adam(sgemm, scratch, x, d, params, grads, m, v, offset, n_out, dx, beta1, beta2, c1, c2,
                      lr, count, eps, decay):
    """Part q (of ``scratch.shape[0]``) owns rows q/n_parts of W. With the split's own one-thread
    OpenBLAS calls (kernels/blas_pool.py) it computes their columns of dx = d @ W.T (none when dx has no
    rows) and their rows of dW = x.T @ d, then updates them -- and the last part the bias -- while they
    are still in its core's cache; returns the sum of squared gradients. No part reads what another
    writes, and elements are updated as ``_adam_parallel`` updates them.

    Where ``scratch`` has room (``config.CPU_TRANSPOSED_DX_MAX_BATCH``), dx's columns come from
    W_q @ d.T with neither operand transposed in OpenBLAS: the part turns d into its row of
    ``scratch`` and the product back into dx (:mod:`kernels.transpose`). Each part turns all of d
    itself: one part turning each half cost a second launch and reading the other core's half, 3% of
    an example-b128 step in the machine's slow phases."""
    step_size, root_corr = _bias_corrections(lr, beta1, beta2, count)
    n_parts, (n_rows, n_in) = scratch.shape[0], x.shape
    end = offset + n_in * n_out
    W = params[offset:end].reshape((n_in, n_out))
    dW = grads[offset:end].reshape((n_in, n_out))
    turned = scratch.shape[1] > 0
    acc = 0.0
    for q in prange(n_parts):
        lo, hi = blas_pool._bound(q, n_in, n_parts), blas_pool._bound(q + 1, n_in, n_parts)
        if dx.shape[0] and turned:
            if hi > lo:
                d_t = scratch[q, :n_out * n_rows].reshape((n_out, n_rows))
                dx_t = scratch[q, n_out * n_rows:(n_out + hi - lo) * n_rows].reshape((hi - lo, n_rows))
                transpose_into_columns(d, d_t, 0)
                blas_pool._call_sgemm(sgemm, blas_pool._NO_TRANS, blas_pool._NO_TRANS, hi - lo, n_rows, n_out,
                                      W.ctypes.data + 4 * lo * n_out, n_out, d_t.ctypes.data, n_rows,
                                      dx_t.ctypes.data, n_rows)
                transpose_into_columns(dx_t, dx, lo)
        elif dx.shape[0]:
            blas_pool._run_part(sgemm, q, n_parts, False, d, 0, W, 1, dx)      # columns of dx = d @ W.T
        blas_pool._run_part(sgemm, q, n_parts, True, x, 1, d, 0, dW)           # rows of dW = x.T @ d
        first, last = offset + lo * n_out, offset + (hi + (q == n_parts - 1)) * n_out
        acc += _adam_serial(params[first:last], grads[first:last], m[first:last], v[first:last], beta1, beta2,
                            c1, c2, step_size, root_corr, eps, decay, _flushes(count[0]))
    return acc


@njit(**_JIT_PARALLEL)
def _layer_pair_adam(sgemm, x, d, params, grads, m, v, offset, n_out, dx, beta1, beta2, c1, c2, lr, count,
                     eps, decay):
    """A small layer's two gradient products side by side, each whole in a one-thread OpenBLAS call:
    dW = x.T @ d on one thread while dx = d @ W.T (W as it was) runs on the other; then the calling
    thread, which wrote dW, updates the block. Split into parts, products this thin (20 or 40 columns
    or a depth of 20) are mostly each OpenBLAS call's fixed cost, paid twice."""
    step_size, root_corr = _bias_corrections(lr, beta1, beta2, count)
    n_in = x.shape[1]
    end = offset + n_in * n_out
    W = params[offset:end].reshape((n_in, n_out))
    dW = grads[offset:end].reshape((n_in, n_out))
    for q in prange(2):
        if q == 0:
            blas_pool._run_part(sgemm, 0, 1, True, x, 1, d, 0, dW)
        else:
            blas_pool._run_part(sgemm, 0, 1, False, d, 0, W, 1, dx)
    return _adam_serial(params[offset:end + n_out], grads[offset:end + n_out], m[offset:end + n_out],
                        v[offset:end + n_out], beta1, beta2, c1, c2, step_size, root_corr, eps, decay,
                        _flushes(count[0]))


@njit(**_JIT)
def _add_parts(partials, out, lo, hi):
    """Rows lo..hi of ``out += partials[0] + partials[1] + ...``, added in that order. The rows are
    taken from the whole arrays: a slice such as ``partials[:, lo:hi]`` has Numba's any-layout type,
    whose rows did not vectorise (128x784, two parts: 25.8 us against 8.1)."""
    for i in range(lo, hi):
        o = out[i]
        for p in range(partials.shape[0]):
            row = partials[p, i]
            for j in range(o.size):
                o[j] += row[j]


@njit(**_JIT)
def _sum_parts(partials, out, lo, hi):
    """Rows lo..hi of ``out = partials[0] + partials[1] + ...``, added in that order."""
    for i in range(lo, hi):
        o, first = out[i], partials[0, i]
        for j in range(o.size):
            o[j] = first[j]
    _add_parts(partials[1:], out, lo, hi)


@njit(**_JIT)
def _sum_parts_bias_act(partials, bias, code, out, lo, hi):
    """Rows lo..hi of ``out = act(partials[0] + partials[1] + ... + bias)``, the parts added in that
    order."""
    _sum_parts(partials, out, lo, hi)
    _bias_act(out[lo:hi], bias, code)


@njit(**_JIT_PARALLEL)
def _linear_act_parts(sgemm, x, W, bias, code, out, partials):
    """``out = act(x @ W + bias)`` as ``len(partials) + 1`` products over ranges of the rows of W -- the
    ranges ``_layer_parts_adam`` gives each part to update, so each thread reads the rows of W it wrote
    -- each a one-thread OpenBLAS call (``blas_pool._run_k_part``), the first into ``out`` and part q into
    ``partials[q - 1]``; then part q adds the others, in order, with the bias and activation, into its
    rows of ``out``. The same bits whichever thread runs a part, and as all of them into ``partials`` and
    then summed, which wrote and read one partial product more: example-b128 step 1.014 / 1.018 faster
    outside / in the slow phases (2 of 3, 17 of 21 alternations)."""
    n_parts, n_rows = partials.shape[0] + 1, x.shape[0]
    for q in prange(n_parts):
        blas_pool._run_k_part(sgemm, q, n_parts, x, W, out if q == 0 else partials[q - 1])
    for q in prange(n_parts):
        lo, hi = blas_pool._bound(q, n_rows, n_parts), blas_pool._bound(q + 1, n_rows, n_parts)
        _add_parts(partials, out, lo, hi)
        _bias_act(out[lo:hi], bias, code)


@njit(**_JIT_PARALLEL)
def _linear_act_rows(sgemm, n_parts, x, W, bias, code, out):
    """``out = act(x @ W + bias)`` by ranges of the batch's rows: part q multiplies its rows of x by the
    whole of W in a one-thread OpenBLAS call, straight into its rows of ``out``, then adds the bias and
    applies the activation there. For a W small enough that reading the rows the other thread wrote
    costs little; the same bits whichever thread runs a part."""
    n_rows = out.shape[0]
    for q in prange(n_parts):
        blas_pool._run_part(sgemm, q, n_parts, True, x, 0, W, 0, out)
        lo, hi = blas_pool._bound(q, n_rows, n_parts), blas_pool._bound(q + 1, n_rows, n_parts)
        _bias_act(out[lo:hi], bias, code)


def _forward_way(x, W, out):
    """How ``linear_act_cpu`` takes this forward, for C-contiguous float32 operands and ``out`` apart from
    ``x`` and ``W``: ``_SMALL`` (``_rows_times_act_parallel``: a batch of at most ``config.CPU_SMALL_BATCH``
    where ``matmul_cpu`` would run its parallel small-batch product); NumPy's OpenBLAS (its split over W's
    rows, or the batch's for a thin layer: a batch above that and at most
    ``config.CPU_FORWARD_PARTS_MAX_BATCH``, products split); or None, the product and then the bias and
    activation."""
    # one expression, as in _check_flat: this runs for every layer of every step
    if not (type(x) is type(W) is type(out) is np.ndarray and x.dtype is W.dtype is out.dtype is _F32
            and x.ndim == W.ndim == out.ndim == 2 and 1 <= x.shape[0] <= config.CPU_FORWARD_PARTS_MAX_BATCH
            and x.flags.c_contiguous and W.flags.c_contiguous and out.flags.c_contiguous):
        return None
    if np.may_share_memory(out, x) or np.may_share_memory(out, W):
        return None
    if x.shape[0] <= config.CPU_SMALL_BATCH:
        return _SMALL if W.size * x.shape[0] >= MATMUL_PARALLEL_MIN and _pool_is_fast() else None
    return _split_blas(x.shape[0])


def linear_act_cpu(x, W, bias, activation, out):
    """One call where ``_forward_way`` gives one, else ``matmul_cpu`` then ``bias_act_cpu``."""
    code = activation_code(activation)
    way = _forward_way(x, W, out)
    if way is None:
        return linear_act_composed(matmul_cpu, bias_act_cpu, x, W, bias, activation, out)
    (n_rows, n_in), n_out = x.shape, W.shape[1]
    for name, a, shape in (("W", W, (n_in, n_out)), ("out", out, (n_rows, n_out))):   # types: _forward_way
        if a.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
    _check("bias", bias, (n_out,))
    if np.may_share_memory(out, bias):
        raise ValueError("out must not overlap bias")
    if way is _SMALL:
        return _launch(_rows_times_act_parallel,
                       (x, W, bias, code, out, _scratch("forward parts", (_FORWARD_PARTS, n_rows, n_out))),
                       pooled=True, whole="linear_act")
    blas, n_parts = way, blas_pool.thread_count()
    if W.size <= config.CPU_THIN_LAYER_MAX_WEIGHTS:
        return _launch(_linear_act_rows, (blas.sgemm, n_parts, x, W, bias, code, out), context=blas.one_thread,
                       whole="linear_act")
    partials = _scratch("forward partials", (n_parts - 1, n_rows, n_out))
    return _launch(_linear_act_parts, (blas.sgemm, x, W, bias, code, out, partials), context=blas.one_thread,
                   whole="linear_act")


def _split_blas(batch_size):
    """NumPy's OpenBLAS where a layer at this batch is updated inside the split products (above
    ``config.CPU_SMALL_BATCH``, on a fast pool, while products are split), else None."""
    if batch_size <= config.CPU_SMALL_BATCH or not _pool_is_fast():
        return None
    return blas_pool.splitter()


def _split_fits(n_rows, n_in, n_out, with_dx):
    """Whether the split cuts this layer's dW by rows and its dx by columns, as ``_layer_parts_adam``
    does. A layer it cuts otherwise (the decoder's narrow first layer) takes the plain products, so that
    its bits are the split's whatever OpenBLAS kernel runs."""
    parts = blas_pool.thread_count()
    return (blas_pool._by_rows((n_in, n_out), True, parts)
            and not (with_dx and blas_pool._by_rows((n_rows, n_in), False, parts)))


_SMALL = "small"


def _fused_way(batch_size):
    """How ``layer_backward_adam_cpu`` fuses at this batch size: ``_SMALL`` (its own kernel, up to
    ``config.CPU_SMALL_BATCH`` but at most ``_REGISTER_ROWS`` rows, on a fast pool, where a step is bound
    by streaming W, m and v, and one pass streams each once and never stores dW); NumPy's OpenBLAS
    (above it, wherever BLAS's products are split, kernels/blas_pool.py: each thread updates the rows of
    W whose gradient its OpenBLAS call has just written); or None, where it does not fuse."""
    if 1 <= batch_size <= min(config.CPU_SMALL_BATCH, _REGISTER_ROWS):
        return _SMALL if _pool_is_fast() else None
    return _split_blas(batch_size)


def fuses_layer_adam_cpu(batch_size):
    """Whether ``layer_backward_adam_cpu`` fuses at this batch size (``_fused_way``)."""
    return _fused_way(batch_size) is not None


def layer_backward_adam_cpu(x, delta, params, grads, m, v, block, dx_out, step, lr, beta1=0.9, beta2=0.999,
                            eps=1e-8, weight_decay=0.0):
    """Fused where ``fuses_layer_adam_cpu`` says so, else the plain kernels one after the other. ``step``
    may be a knob (see ``_launch``), which the small-batch kernel reads when it runs."""
    _check_flat(params, grads, m, v)
    count = _knob("step", step)
    offset, n_in, n_out = map(int, block)
    if offset < 0 or n_in < 1 or n_out < 1 or offset + (n_in + 1) * n_out > params.size:
        raise ValueError(f"block {tuple(block)} does not fit in {params.size} parameters")
    n_rows = x.shape[0] if isinstance(x, np.ndarray) and x.ndim == 2 else -1
    _check("x", x, (n_rows, n_in))
    _check("delta", delta, (n_rows, n_out))
    if dx_out is not None:
        _check("dx_out", dx_out, (n_rows, n_in))
        if _overlaps_any(dx_out, x, delta, params, grads, m, v):
            raise ValueError("dx_out must not overlap the other arguments")
    way = _fused_way(n_rows)
    split = way is not None and way is not _SMALL
    pair = split and dx_out is not None and n_in * n_out <= config.CPU_THIN_LAYER_MAX_WEIGHTS
    if way is None or (split and not pair and not _split_fits(n_rows, n_in, n_out, dx_out is not None)):
        return layer_backward_adam_composed(matmul_cpu, adam_step_cpu, x, delta, params, grads, m, v, block,
                                            dx_out, float(count[0]), lr, beta1, beta2, eps, weight_decay)
    # _adam_constants at a scale of 1, the step's two (bias corrections) left to the kernel, which reads the
    # count when it runs; the kernels take at most 19 arguments: with exactly 20, Numba 0.68's dispatcher
    # kept 200 bytes per call (measured)
    b1, b2, c1, c2, _, _, eps32, decay = _adam_constants(1, lr, beta1, beta2, eps, weight_decay, 1.0)
    adam = (b1, b2, c1, c2, float(lr), count, eps32, decay)
    dx = _NO_DX if dx_out is None else dx_out
    if way is _SMALL:
        pads = _scratch("padded rows", (_REGISTER_ROWS * (n_in + n_out),))
        return _launch(_layer_backward_adam, (x, delta, pads, params, grads, m, v, offset, n_out, dx, *adam),
                       pooled=True, whole="layer_backward_adam")
    if pair:
        return _launch(_layer_pair_adam, (way.sgemm, x, delta, params, grads, m, v, offset, n_out, dx_out, *adam),
                       context=way.one_thread, whole="layer_backward_adam")
    n_parts = blas_pool.thread_count()
    room = (n_in + n_out) * n_rows if dx_out is not None and n_rows <= config.CPU_TRANSPOSED_DX_MAX_BATCH else 0
    return _launch(_layer_parts_adam, (way.sgemm, _scratch("turned products", (n_parts, room)), x, delta, params,
                                       grads, m, v, offset, n_out, dx, *adam),
                   context=way.one_thread, whole="layer_backward_adam")


def matmul_cpu(a, b, out):
    """``out[...] = a @ b``; the small-batch kernels above when one operand is a batch of at most
    ``config.CPU_SMALL_BATCH`` rows in the engine's layouts, NumPy's matmul (BLAS) otherwise.

    The checks are ordered and spelled for speed (exact types, the dtype singleton): at seed-b4 this
    function runs 11 times a step, and the earlier spelling cost 7 us of a 300 us step."""
    if (type(a) is np.ndarray and type(b) is np.ndarray and type(out) is np.ndarray
            and a.dtype is _F32 and b.dtype is _F32 and out.dtype is _F32 and a.ndim == 2 and b.ndim == 2):
        small = config.CPU_SMALL_BATCH
        (m, k), (k_b, n) = a.shape, b.shape
        if ((m <= small or k <= small) and k == k_b and k and m and n and out.shape == (m, n)
                and out.flags.c_contiguous and not np.may_share_memory(out, a)
                and not np.may_share_memory(out, b)):
            parallel = m * n * k >= MATMUL_PARALLEL_MIN and _pool_is_fast()
            a_flags, b_flags = a.flags, b.flags
            if a_flags.c_contiguous and m <= small:
                if b_flags.c_contiguous:                                  # x @ W
                    if parallel:
                        parts = _scratch("forward parts", (_FORWARD_PARTS, m, n))
                        return _launch(_rows_times_parallel, (a, b, out, parts), pooled=True, whole="matmul")
                    return _launch(_rows_times, (a, b, out), whole="matmul")
                if b_flags.f_contiguous:                                  # delta @ W.T
                    if parallel:
                        return _launch(_dots_parallel, (a, b.T, out, _CHUNKS), pooled=True, whole="matmul")
                    return _launch(_dots, (a, b.T, out, 0, n), whole="matmul")
            if a_flags.f_contiguous and k <= small and b_flags.c_contiguous:   # x.T @ delta
                if parallel:
                    return _launch(_rank_update_parallel, (a.T, b, out, _CHUNKS), pooled=True, whole="matmul")
                return _launch(_rank_update, (a.T, b, out, 0, m), whole="matmul")
    if not (_pool_is_fast() and blas_pool.matmul(a, b, out)):
        _BLAS_CALLED[0] = time.perf_counter()
        np.matmul(a, b, out=out)


# -- launches, and recording them ------------------------------------------------------------------------
# At a batch of a few images a step is 15 launches of 1-45 us, and the Python around them (checking
# arguments, choosing a way) took 40 us of a 205 us seed-b4 step. A caller that makes the same calls on
# the same arrays at every step can record the launches once and replay them (vaecore/cpu_replay.py).
# What changes between its steps is passed as knobs: one-element float64 arrays that a kernel reads when
# it runs (Adam's step, the KL weight), as the CUDA kernels take them inside a recorded graph.


class Launch(NamedTuple):
    kernel: object
    args: tuple
    pooled: bool          # through _pooled: every thread or one, as the split choice says at the time
    context: object       # entered around the launch (a split's ``blas.one_thread``), or None
    whole: str            # the table function this launch is all of ("" where it is a part of one)


_RECORDING = threading.local()


def _launch(kernel, args, pooled=False, context=None, whole=""):
    """``kernel(*args)``, through ``_pooled`` if ``pooled``, inside ``context`` if given; logged with its
    result while this thread records (``recording``). Only launches that are a wrapper's whole work on
    its path name it in ``whole``: a path that does anything else logs nothing, so a recording of it
    shows a gap."""
    result = _run(kernel, args, pooled and _one_thread_now(), context)
    log = getattr(_RECORDING, "log", None)
    if log is not None:
        log.append((Launch(kernel, args, pooled, context, whole), result))
    return result


def _run(kernel, args, one_thread, context):
    if one_thread:
        return _on_one_thread(kernel, args)
    if context is None:
        return kernel(*args)
    with context:
        return kernel(*args)


@contextmanager
def recording():
    """Logs (``Launch``, result) for every launch this thread makes inside the block, into the list
    it yields, and (None, why) where a call made a launch that cannot be replayed. Nesting is an error:
    an inner recording would hide the outer one's launches."""
    if getattr(_RECORDING, "log", None) is not None:
        raise RuntimeError("this thread is already recording launches")
    _RECORDING.log = log = []
    try:
        yield log
    finally:
        _RECORDING.log = None


class Replayable(NamedTuple):
    launches: tuple
    pooled: int           # how many of them go through _pooled


def replayable(launches):
    """Recorded ``launches`` ready for ``replay``."""
    launches = tuple(launches)
    return Replayable(launches, sum(launch.pooled for launch in launches))


def replay(replayable, results):
    """Runs the launches in order, each as it ran when recorded; ``results[i]`` gets launch i's result.
    Their scratch buffers are the recording thread's: replay on that thread.

    The pooled launches all run the way ``_pooled`` would choose, asked once for all of them (counted
    as that many calls, so the choice's windows keep their length). Asked per launch, a seed-b4 step
    was 1.03x slower (the same launches and arrays in one process, in turn: 1.031x, 22 of 24 rounds,
    and 1.037x, 21 of 24; the same replay on both sides gave 1.005x, 15 of 24)."""
    launches, n_pooled = replayable
    one_thread = n_pooled and _one_thread_now(n_pooled)
    for i, (kernel, args, pooled, context, _) in enumerate(launches):
        results[i] = _run(kernel, args, pooled and one_thread, context)


def _knob(name, value):
    """``value`` as the one-element float64 array a kernel reads: a knob as it is, a number through
    this thread's own array (filled now: a launch recorded with it would read whatever came last)."""
    if isinstance(value, np.ndarray):
        if value.dtype != np.float64 or value.shape != (1,):
            raise ValueError(f"{name}: expected a number or a float64 array of shape (1,), "
                             f"got {value.dtype} of shape {value.shape}")
        return value
    log = getattr(_RECORDING, "log", None)
    if log is not None:                   # a gap: a replay would read what another call wrote last
        log.append((None, f"{name} was a number, not a knob"))
    knob = _SCRATCH.__dict__.setdefault("knobs", {}).get(name)
    if knob is None:
        knob = _SCRATCH.knobs[name] = np.empty(1, np.float64)
    knob[0] = value
    return knob


# -- who has the cores ------------------------------------------------------------------------------
_BLAS_CALLED = [-math.inf]     # perf_counter() of this module's last BLAS call on OpenBLAS's own threads
_POOL = []                     # [whether Numba's pool keeps its threads ready], once known


def _pooled(kernel, *args):
    """Runs the prange ``kernel`` on Numba's threads when the cores are free and that is currently the
    faster way (:class:`_SplitChoice`), else on this thread alone.

    Either way it is the same compiled code over the same ``_CHUNKS`` chunks, so the results do not
    depend on which (a resumed run repeats the original bit for bit): a serial twin compiled separately
    may sum a dot product in another order, and did.
    """
    return _run(kernel, args, _one_thread_now(), None)


def _one_thread_now(calls=1):
    """Whether the next ``calls`` pooled launches run on this thread alone (see ``_pooled``)."""
    return not _cores_free() or _SPLIT.next_way(calls)


def _on_one_thread(kernel, args):
    threads = blas_pool.thread_count()
    set_num_threads(1)                   # this thread's setting only
    try:
        return kernel(*args)
    finally:
        set_num_threads(threads)


class _SplitChoice:
    """Whether the parallel kernels run on all threads or on one, chosen by timing both.

    Why: the parallel kernels last 10-100 us and meet at a barrier, so when another process (or the
    host, under a VM) keeps one core busy, calls wait for the thread that is not running, and Numba's
    worker, spinning between calls, takes time from this thread's serial work. With a busy loop pinned
    to one of this machine's two cores, a seed-b4 step took 620-1,600 us on two threads and 470 us on
    one. Timing the kernel calls alone missed it (their median stayed normal); what shows it is the
    wall time of a run of ``WINDOW`` calls, which includes everything done between them.

    At the start each way has one window to settle (the program's warm-up, then the switch) and one
    timed. The faster way runs. After ``FIRST_RETRY`` windows the other is tried: one window to settle
    (the first steps after a switch run 1.5x slow while caches refill), then one timed window, which must
    beat the last window of the way in use by ``MARGIN``. A trial twice as slow is cut short (next to
    a busy core one window of the wrong way took 0.5 s). Each lost trial doubles the wait, up to
    ``LAST_RETRY`` windows, so the choice follows the machine's load both ways. A window with a pause
    of ``PAUSE_SECONDS`` between two calls (validation between epochs, say) starts afresh: counted, such
    a window made a step's calls look twice as slow as they were.
    """
    WINDOW, FIRST_RETRY, LAST_RETRY, PAUSE_SECONDS = 64, 4, 256, 0.1
    # a trial of one thread must beat all threads by this much: at batch 128 the parallel kernels are 5%
    # of a step, less than a window's noise, and a busy core costs 20-300%. A trial of all threads wins
    # unless it is slower: with the margin both ways, whichever way a noisy first window chose stayed
    # (one thread, from the warm-up, made example-b128 steps 2-3% slower: its loss kernel on one thread)
    MARGIN = 0.05

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.seconds = [math.inf, math.inf]   # per call in the latest timed window: all threads, one
        self.way = 0                          # the way running now: 0 all threads, 1 one
        self.phase = "settling"               # "in use", "settling" or "timed-trial"; the first window
        # is the program's warm-up (example-b128: 1,730 us a step against 1,230): timed, it handed the
        # choice to one thread for the next 5 windows, a quarter of a 2 s benchmark
        self.calls, self.started, self.last = 0, 0.0, 0.0
        self.gap = self.wait = self.FIRST_RETRY

    def next_way(self, calls=1):
        """The way for the ``calls`` calls about to run (a replayed step asks once for all its pooled
        launches)."""
        now = self.clock()
        if self.calls and now - self.last > self.PAUSE_SECONDS:
            self.calls = 0                            # the program did something else: start afresh
        if self.calls:
            spent = now - self.started
            limit = (2 if self.phase == "timed-trial" else 4) * self.WINDOW * self.seconds[1 - self.way]
            if self.calls >= self.WINDOW or (self.phase != "in use" and spent > limit):
                self._window_done(spent / self.calls, spent > limit)
                self.calls = 0
        if not self.calls:
            self.started = now
        self.calls += calls
        self.last = now
        return self.way

    def _window_done(self, per_call, lost_already):
        way, other = self.way, 1 - self.way
        if self.phase == "settling" and not lost_already:
            self.phase = "timed-trial"
            return
        if self.phase == "in use":
            self.seconds[way] = per_call
            self.wait -= 1
            if not self.wait:
                self.way, self.phase = other, "settling"
            return
        self.seconds[way] = per_call                  # a trial's timed window, or one cut short
        if self.seconds[other] == math.inf:           # the very first windows: time both ways
            self.way, self.phase = other, "settling"
            return
        # one thread must win by MARGIN; all threads, the way for free cores, need only not lose
        margin = self.MARGIN if way == 1 else 0.0
        lost = lost_already or per_call > (1.0 - margin) * self.seconds[other]
        self.gap = min(2 * self.gap, self.LAST_RETRY) if lost else self.FIRST_RETRY
        self.wait, self.phase = self.gap, "in use"
        if lost:
            self.way = other


_SPLIT = _SplitChoice()


def _cores_free():
    """Whether Numba's pool may take every core now: ``matmul_cpu`` has not woken OpenBLAS's own threads
    for ``config.CPU_BLAS_SPIN_SECONDS`` (so they have stopped spinning; a matmul whose jobs ran on
    Numba's pool, see :mod:`kernels.blas_pool`, wakes none), and the pool keeps its threads ready."""
    return time.perf_counter() - _BLAS_CALLED[0] >= config.CPU_BLAS_SPIN_SECONDS and _pool_is_fast()


def _pool_is_fast():
    """More than one thread, and a layer that keeps them ready: OpenMP or TBB. The workqueue layer
    wakes its sleeping threads too slowly to pay for a ~100 us kernel (see kernels/config.py)."""
    if not _POOL:
        p = np.zeros(64, np.float32)
        # starts the pool
        _adam_parallel(p, p, p, p, 0.9, 0.999, 0.1, 0.001, 0.0, 1.0, 1.0, None, False, _whole_buffer(64), 2)
        _POOL.append(get_num_threads() > 1 and threading_layer() in config.FAST_LAYERS)
    return _POOL[0]


def parallel_threads():
    """Threads the parallel kernels take while the cores are free: Numba's count on a fast pool, else 1."""
    return get_num_threads() if _pool_is_fast() else 1


def warm_up():
    """Compiles (or loads from the on-disk cache) every CPU kernel for the engine's argument types."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 4), dtype=np.float32)
    b = np.empty_like(a)
    s = rng.standard_normal((2, 8), dtype=np.float32)
    reparameterize_kl_cpu(s, a, b)
    reparameterize_kl_backward_cpu(s, a, a, 1.0, np.empty_like(s))
    bernoulli_nll_grad_cpu(a, a, 1.0, b)
    gaussian_nll_grad_cpu(a, a, 0.0, 1.0, b)
    gaussian_learned_nll_grad_cpu(s, a, 1.0, np.empty_like(s))
    for activation in ACTIVATIONS:
        bias_act_cpu(b, a[0], activation)
        bias_act_backward_cpu(a, b, activation, np.empty_like(a), np.empty(4, np.float32))
    p = np.zeros(16, np.float32)
    for step in (1, _FLUSH_EVERY):                      # a step that keeps subnormal moments, one that flushes
        adam_step_cpu(p, p.copy(), p.copy(), p.copy(), step, 1e-3)
        adam_step_cpu(p, p.copy(), p.copy(), p.copy(), step, 1e-3, clip_norm=1.0)
        adam_step_cpu(p, p.copy(), p.copy(), p.copy(), step, 1e-3, blocks=np.array([[0, 3, 4]], np.int64))
    x, w, d = np.ones((5, 4), np.float32), np.ones((4, 3), np.float32), np.ones((5, 3), np.float32)
    _rows_times(x, w, np.empty((5, 3), np.float32))
    _rank_update(x, d, np.empty((4, 3), np.float32), 0, 4)
    _dots(d, w, np.empty((5, 4), np.float32), 0, 4)
    # the parallel versions too (their first compile takes seconds); this also starts Numba's pool
    _rank_update_parallel(x, d, np.empty((4, 3), np.float32), 2)
    _dots_parallel(d, w, np.empty((5, 4), np.float32), 2)
    _rows_times_parallel(x, w, np.empty((5, 3), np.float32), np.empty((2, 5, 3), np.float32))
    _bernoulli_nll_grad_parallel(x, x, 1.0, np.empty_like(x), np.empty(5, np.float32), 2)
    pixels_cpu(np.zeros((5, 4), np.uint8), x)
    normal_from_uniform_cpu(np.zeros(2, np.float32), np.empty(2, np.float32))
    _pool_is_fast()
    blas_pool.warm_up()
    # every way a layer's forward and fused update can go, where it runs: a small batch and a split one,
    # a thin layer and one just above config.CPU_THIN_LAYER_MAX_WEIGHTS
    for n_in, n_out in ((4, 3), (256, config.CPU_THIN_LAYER_MAX_WEIGHTS // 256 + 1)):
        p = np.zeros((n_in + 1) * n_out, np.float32)
        w = p[:n_in * n_out].reshape(n_in, n_out)
        for rows in (5, config.CPU_SMALL_BATCH + 1):
            x, d = np.ones((rows, n_in), np.float32), np.ones((rows, n_out), np.float32)
            layer_backward_adam_cpu(x, d, p, p.copy(), p.copy(), p.copy(), (0, n_in, n_out), np.empty_like(x),
                                    1, 1e-3)
            linear_act_cpu(x, w, w[0], "relu", np.empty((rows, n_out), np.float32))
            pixels_cpu(np.zeros((rows, n_in), np.uint8), x)


__all__ = [
    "adam_step_cpu",
    "bernoulli_nll_grad_cpu",
    "bias_act_backward_cpu",
    "bias_act_cpu",
    "fuses_layer_adam_cpu",
    "gaussian_learned_nll_grad_cpu",
    "gaussian_nll_grad_cpu",
    "layer_backward_adam_cpu",
    "linear_act_cpu",
    "matmul_cpu",
    "normal_from_uniform_cpu",
    "pixels_cpu",
    "reparameterize_kl_backward_cpu",
    "reparameterize_kl_cpu",
    "warm_up",
]
