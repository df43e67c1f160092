"""OpenBLAS's matmuls run on Numba's threads, so one pool holds the cores for the whole training step.

Why: NumPy's OpenBLAS keeps its own worker threads, and after every call they spin for about 0.1 s
waiting for the next one. A parallel Numba kernel (Adam, a small-batch product) started in that window shares a core
with a spinning worker, and steps measured 10x slower; so before this module the engine kept its own
kernels on one thread whenever BLAS had run recently, which at a batch above
``config.CPU_SMALL_BATCH`` was always.

OpenBLAS 0.3.27 added caller-managed threading: ``openblas_set_threads_callback_function`` installs a
function that OpenBLAS hands its jobs to instead of waking its workers. :func:`matmul` installs ours
around one ``np.matmul``: it runs the jobs on Numba's pool, one job per thread (OpenBLAS's threaded
GEMM jobs wait for each other, so they must run at once, never one after another), and removes it
again, so no other BLAS call in the process is affected. OpenBLAS splits the work exactly as it would
for its own threads, so the product is the same bit for bit (tested). With OpenBLAS's own workers
never woken, they stay asleep, and Numba's kernels can take every core right after a matmul.

:func:`matmul` declines (the caller then runs a plain ``np.matmul`` on OpenBLAS's own threads) when
NumPy's BLAS is not an OpenBLAS with the callback; when OpenBLAS wants more threads than this thread's
Numba setting (``numba.get_num_threads``) gives; when the pool is not an OpenMP/TBB one (the workqueue
layer cannot run two launches at once, and a second Python thread calling BLAS would be one); or when
``OMP_DYNAMIC`` or ``OMP_THREAD_LIMIT`` may hand the pool fewer threads than asked for. In the last
three cases two jobs could land on one thread and wait for each other forever.
"""

import ctypes
import os

import numpy as np
from llvmlite import ir
from numba import cfunc, get_num_threads, njit, prange, types
from numba.extending import intrinsic

from . import config

# -- the callback ---------------------------------------------------------------------------------------


@intrinsic
def _call_job(typingctx, job, index, data, extra):
    """Calls OpenBLAS's ``void dojob(int thread, void *jobdata, int extra)`` at address ``job``."""
    def codegen(context, builder, signature, args):
        address, i, d, e = args
        i32, ptr = ir.IntType(32), ir.IntType(8).as_pointer()
        fn = builder.inttoptr(address, ir.FunctionType(ir.VoidType(), [i32, ptr, i32]).as_pointer())
        builder.call(fn, [builder.trunc(i, i32), builder.inttoptr(d, ptr), builder.trunc(e, i32)])
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64), codegen


@njit(cache=True, parallel=True, nogil=True)
def _run_jobs(job, n_jobs, job_size, jobs, extra):
    # one job per thread: matmul() lends the pool only while this thread's Numba setting
    # (get_num_threads) is at least OpenBLAS's thread count, the most jobs it makes
    for i in prange(n_jobs):
        _call_job(job, i, jobs + i * job_size, extra)


def _blas_callback(sync, job, n_jobs, job_size, jobs, extra):
    if n_jobs == 1:
        _call_job(job, 0, jobs, extra)
    else:
        _run_jobs(job, np.int64(n_jobs), job_size, jobs, np.int64(extra))


# OpenBLAS's ``openblas_threads_callback``: (int sync, dojob, int numjobs, size_t jobdata_elsize,
# void *jobdata, int dojob_data); pointers and size_t travel as 64-bit integers.
_CALLBACK_TYPE = types.void(types.int32, types.int64, types.int32, types.int64, types.int64, types.int32)
_CALLBACK = []


def _callback_address():
    """The compiled callback, made on first use: after Numba's pool has started, since machine code
    loaded from the cache needs the pool's symbols (``allocate_sched``) to be there already."""
    if not _CALLBACK:
        _run_jobs(0, 0, 0, 0, 0)
        _CALLBACK.append(cfunc(_CALLBACK_TYPE, cache=True)(_blas_callback))
    return _CALLBACK[0].address


# -- finding NumPy's OpenBLAS ---------------------------------------------------------------------------

class _OpenBLAS:
    """ctypes handles of the two functions used. Symbol names differ between builds:
    ``scipy_openblas_..64_`` in NumPy's wheels (``..`` without ``64_`` for 32-bit integers), and
    plain ``openblas_..`` in a distribution's library."""

    def __init__(self, path):
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_", "64_"), ("scipy_", ""), ("", "")):
            setter = f"{prefix}openblas_set_threads_callback_function{suffix}"
            getter = f"{prefix}openblas_get_num_threads{suffix}"
            if hasattr(lib, setter) and hasattr(lib, getter):
                self.set_callback = getattr(lib, setter)
                self.set_callback.argtypes, self.set_callback.restype = [ctypes.c_void_p], None
                self.threads = getattr(lib, getter)
                self.threads.argtypes, self.threads.restype = [], ctypes.c_int
                return
        raise LookupError("NumPy's OpenBLAS has no openblas_set_threads_callback_function (it needs >= 0.3.27)")


_STATE = []      # [(_OpenBLAS or None, why)], once known


def _numpy_openblas():
    """NumPy's OpenBLAS with the callback setter, or None (``_STATE`` then says why)."""
    if not _STATE:
        try:
            from threadpoolctl import threadpool_info

            np.ones((2, 2)) @ np.ones((2, 2))                    # makes sure NumPy's BLAS is loaded
            found = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
            mine = [i for i in found if "numpy" in i.get("filepath", "")] or (found if len(found) == 1 else [])
            if not mine:
                raise LookupError("NumPy's BLAS is not an OpenBLAS that threadpoolctl can tell apart")
            if mine[0].get("threading_layer") != "pthreads":
                raise LookupError(f"NumPy's OpenBLAS threads with {mine[0].get('threading_layer')}, not pthreads")
            limits = [name for name in ("OMP_DYNAMIC", "OMP_THREAD_LIMIT") if os.environ.get(name, "").strip()
                      and os.environ[name].strip().lower() not in ("false", "0")]
            if limits:
                raise LookupError(f"{' and '.join(limits)} set: OpenMP might give fewer threads than OpenBLAS's jobs")
            _STATE.append((_OpenBLAS(mine[0]["filepath"]), "NumPy's OpenBLAS runs its jobs on Numba's threads"))
        except (LookupError, OSError) as error:
            _STATE.append((None, str(error)))
    return _STATE[0][0]


_LAYER = []      # Numba's threading layer, once a parallel kernel has chosen it


def _layer():
    if not _LAYER:
        from numba import threading_layer

        try:
            _LAYER.append(threading_layer())
        except ValueError:          # no parallel kernel has run yet
            return "not started"
    return _LAYER[0]


def _lendable():
    """(NumPy's OpenBLAS, None) when the pool can be lent now, else (None, why not)."""
    blas = _numpy_openblas()
    if blas is None:
        return None, _STATE[0][1]
    if not config.CPU_SHARE_BLAS_THREADS:
        return None, "kernels.config.CPU_SHARE_BLAS_THREADS is off"
    if _layer() not in config.FAST_LAYERS:
        return None, f"Numba's threading layer is {_layer()}; the pool is lent only with omp or tbb"
    if blas.threads() > get_num_threads():
        return None, f"OpenBLAS wants {blas.threads()} threads, Numba gives this thread {get_num_threads()}"
    return blas, None


def status():
    """(whether the engine's BLAS matmuls run on Numba's pool, why or why not), for ``bench``'s notes."""
    blas, why = _lendable()
    return blas is not None, why or _STATE[0][1]


def matmul(a, b, out):
    """``np.matmul(a, b, out=out)`` with OpenBLAS's jobs on Numba's threads, and True; or, where that
    cannot be (see the module's docstring), nothing done and False."""
    blas, _ = _lendable()
    if blas is None:
        return False
    blas.set_callback(_callback_address())
    try:
        np.matmul(a, b, out=out)
    finally:
        blas.set_callback(None)
    return True


def warm_up():
    """Finds NumPy's OpenBLAS and compiles (or loads) the callback, where the pool can be lent."""
    if _numpy_openblas() is not None and _layer() in config.FAST_LAYERS:
        _callback_address()
