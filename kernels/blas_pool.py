"""OpenBLAS's matmuls run on Numba's threads, so one pool holds the cores for the whole training step.

Why: NumPy's OpenBLAS keeps its own worker threads, and after every call they spin for about 0.1 s
waiting for the next one. A parallel Numba kernel (Adam, a small-batch product) started in that window shares a core
with a spinning worker, and steps measured 10x slower; so before this module the engine kept its own
kernels on one thread whenever BLAS had run recently, which at a batch above
``config.CPU_SMALL_BATCH`` was always.

:func:`matmul` does it one of two ways, the first where it can:

1. **Split** (while Numba has at most ``config.CPU_BLAS_SPLIT_THREADS`` threads): the product is cut
   into one part per Numba thread, by rows of the output when it has at least as many rows as columns
   or is a weight gradient (``_by_rows``), else by columns, and each thread computes its part in a ``cblas_sgemm`` call while OpenBLAS's thread
   count is 1 (NumPy's 64-bit-integer OpenBLAS; see ``_ONE_THREAD``). The threads share nothing:
   OpenBLAS's own threading shares packed panels of the operands between its threads, and moving them
   between the two cores of the project's machine cost more than each packing its own: the
   example-b128 step's products 1,115 -> 1,046 us, its whole step 1,347 -> 1,301 us, wide-b512's within
   1% (kernels/config.py). A part is the same whichever thread runs it, so the bits depend only on the
   number of threads (as OpenBLAS's own threading's do) and equal one-thread OpenBLAS calls on the
   parts (tested).
2. **Callback**: OpenBLAS 0.3.27 added caller-managed threading: ``openblas_set_threads_callback_function``
   installs a function that OpenBLAS hands its jobs to instead of waking its workers. It is installed
   around one ``np.matmul`` and runs the jobs on Numba's pool, one job per thread (OpenBLAS's threaded
   GEMM jobs wait for each other, so they must run at once, never one after another), then removed
   again, so no other BLAS call in the process is affected. OpenBLAS splits the work exactly as it
   would for its own threads, so the product is the same bit for bit (tested).

Either way OpenBLAS's own workers are never woken, they stay asleep, and Numba's kernels can take every
core right after a matmul.

:func:`matmul` declines (the caller then runs a plain ``np.matmul`` on OpenBLAS's own threads) when
NumPy's BLAS is not an OpenBLAS with the callback; when the pool is not an OpenMP/TBB one (the workqueue
layer cannot run two launches at once, and a second Python thread calling BLAS would be one); or when
``OMP_DYNAMIC`` or ``OMP_THREAD_LIMIT`` may hand the pool fewer threads than asked for. The callback
also declines when OpenBLAS wants more threads than this thread's Numba setting
(``numba.get_num_threads``) gives. In those cases two jobs could land on one thread and wait for each
other forever.
"""

import ctypes
import os
import threading

import numpy as np
from llvmlite import ir
from numba import cfunc, get_num_threads, njit, prange, types
from numba.extending import intrinsic
from numba.np.ufunc import parallel as _numba_parallel

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


# -- the split ------------------------------------------------------------------------------------------
_COUNT = []      # the threading layer's own getter of the calling thread's count, once the pool runs


def thread_count():
    """``numba.get_num_threads()`` without the lock that it takes on every call to be sure the pool has
    started (0.48 us a call, and an example-b128 step made 18): once it has, the threading layer's own
    getter answers, in 0.07 us. Numba keeps that getter under a private name. Where it is missing, or
    gives a count below 1 (which the public function reports as a bug in Numba), the public one answers."""
    if _COUNT:
        n = _COUNT[0]()
        return n if n > 0 else get_num_threads()
    n = get_num_threads()
    getter = getattr(_numba_parallel, "_get_num_threads", None)
    if callable(getter) and getter() == n:
        _COUNT.append(getter)
    return n


_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112      # CBLAS's enum values


@intrinsic
def _call_sgemm(typingctx, sgemm, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc):
    """``C = op(A) @ op(B)`` (row-major, alpha 1, beta 0) through the ``cblas_sgemm`` at address
    ``sgemm``, with 64-bit integers as in NumPy's wheels (ILP64); the operands are addresses."""
    def codegen(context, builder, signature, args):
        fn, ta, tb, m, n, k, a, lda, b, ldb, c, ldc = args
        i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
        ptr = f32.as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, i64, i64, i64, f32, ptr, i64, ptr, i64, f32,
                                               ptr, i64])
        builder.call(builder.inttoptr(fn, fnty.as_pointer()),
                     [i32(_ROW_MAJOR), builder.trunc(ta, i32), builder.trunc(tb, i32), m, n, k, f32(1.0),
                      builder.inttoptr(a, ptr), lda, builder.inttoptr(b, ptr), ldb, f32(0.0),
                      builder.inttoptr(c, ptr), ldc])
        return context.get_dummy_value()

    return types.void(*(types.int64,) * 12), codegen


# Parts start on multiples of 16 floats: a part of 200 columns left OpenBLAS's AVX-512 kernel, which
# works on panels of 16, a tail of 8 in every part (example-b128's 128x784x400 product, alone on two
# threads: 244 -> 218 us; its step 1,811 -> 1,777 us over 60 alternations, in a slow phase).
_PANEL = 16


@njit(inline="always")
def _bound(q, n, n_parts):
    """Where part q of n rows (or columns) starts: q * n / n_parts down to a multiple of _PANEL
    (rounded to the nearest), and n for q = n_parts."""
    if q >= n_parts:
        return n
    return min(n, (q * n // n_parts + _PANEL // 2) // _PANEL * _PANEL)


@njit(inline="always")
def _run_part(sgemm, q, n_parts, by_rows, a, trans_a, b, trans_b, c):
    """Part q of ``c = op(a) @ op(b)`` (see ``_run_parts``): one OpenBLAS call on its range of c's rows
    (or columns) from ``_bound``, nothing when the range is empty."""
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    lda, ldb = a.shape[1], b.shape[1]
    a0, b0, c0 = a.ctypes.data, b.ctypes.data, c.ctypes.data
    if by_rows:
        lo, hi = _bound(q, m, n_parts), _bound(q + 1, m, n_parts)
        a_q, b_q, c_q = a0 + 4 * lo * (1 if trans_a else lda), b0, c0 + 4 * lo * n
        m_q, n_q = hi - lo, n
    else:
        lo, hi = _bound(q, n, n_parts), _bound(q + 1, n, n_parts)
        a_q, b_q, c_q = a0, b0 + 4 * lo * (ldb if trans_b else 1), c0 + 4 * lo
        m_q, n_q = m, hi - lo
    if m_q > 0 and n_q > 0:
        _call_sgemm(sgemm, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS,
                    m_q, n_q, k, a_q, lda, b_q, ldb, c_q, n)


@njit(inline="always")
def _run_k_part(sgemm, q, n_parts, a, b, c):
    """Part q of the sum over k of ``c = a @ b`` (C-contiguous, no transposes): ``a``'s columns and
    ``b``'s rows in the range ``_bound`` gives part q, multiplied into ``c`` by one OpenBLAS call; zeros
    when the range is empty."""
    m, k = a.shape
    n = c.shape[1]
    lo, hi = _bound(q, k, n_parts), _bound(q + 1, k, n_parts)
    if hi > lo:
        _call_sgemm(sgemm, _NO_TRANS, _NO_TRANS, m, n, hi - lo, a.ctypes.data + 4 * lo, k,
                    b.ctypes.data + 4 * lo * n, n, c.ctypes.data, n)
    else:
        c[:, :] = np.float32(0.0)


@njit(cache=True, parallel=True, nogil=True)
def _run_parts(sgemm, n_parts, by_rows, a, trans_a, b, trans_b, c):
    """``c = op(a) @ op(b)`` of C-contiguous ``a``, ``b``, ``c`` (op transposes where asked) in ``n_parts``
    parts, each an OpenBLAS call on whichever thread takes it (one-thread calls: ``_split`` sets
    OpenBLAS's count to 1 around this)."""
    for q in prange(n_parts):
        _run_part(sgemm, q, n_parts, by_rows, a, trans_a, b, trans_b, c)


def _stored(x):
    """(x's C-contiguous storage, whether x is its transpose) for a 2-D float32 operand, or (None, 0)."""
    if not (isinstance(x, np.ndarray) and x.ndim == 2 and x.dtype == np.float32):
        return None, 0
    if x.flags.c_contiguous:
        return x, 0
    if x.flags.f_contiguous:
        return x.T, 1
    return None, 0


_MIN_ROWS_PER_PART = 128


def _by_rows(shape, trans_a, n_parts):
    """Whether the split cuts the output (m, n) by rows: when it has at least as many rows as columns,
    and for a weight gradient (``x.T @ delta``: ``a`` transposed) whenever each part gets 128 rows,
    because then each thread writes the rows of dW that Adam's chunks on the same thread update
    (example-b128 step -15 us and -47 us in two runs of 30 alternations; wide-b512 unchanged)."""
    m, n = shape
    return m >= n or (bool(trans_a) and m >= _MIN_ROWS_PER_PART * n_parts)


# OpenBLAS's thread count is one process-wide number in NumPy's (pthreads) build: even
# openblas_set_num_threads_local(1) called on one thread changed what every thread sees (measured). Set
# and reset by each part, it let a part that started after another had reset it run on OpenBLAS's two
# threads, and one `train` in four gave other bits. So the count is 1 around the whole split, under a
# lock so that two Python threads' splits cannot interleave their settings (a plain BLAS call from
# another thread meanwhile runs on one thread: slower, not wrong).
_ONE_THREAD = threading.Lock()


class _OneThread:
    """``with blas.one_thread:`` runs the body with OpenBLAS's thread count at 1, under ``_ONE_THREAD``,
    and restores the count. Made once per library, so entering it allocates nothing."""

    def __init__(self, blas):
        self.blas, self.saved = blas, 1

    def __enter__(self):
        _ONE_THREAD.acquire()
        try:
            self.saved = self.blas.threads()
            self.blas.set_threads(1)
        except BaseException:
            _ONE_THREAD.release()
            raise

    def __exit__(self, *exc):
        try:
            self.blas.set_threads(self.saved)
        finally:
            _ONE_THREAD.release()


def _split(blas, a, b, out, n_parts):
    """``out = a @ b`` in ``n_parts`` parts (see the module's docstring), and True; or False where the
    layouts are not ones it handles."""
    (a_c, trans_a), (b_c, trans_b), (out_c, out_transposed) = _stored(a), _stored(b), _stored(out)
    if (a_c is None or b_c is None or out_c is None or out_transposed
            or a.shape[1] != b.shape[0] or out.shape != (a.shape[0], b.shape[1]) or not (out.size and a.shape[1])
            or np.may_share_memory(out, a) or np.may_share_memory(out, b)):
        return False
    with blas.one_thread:
        _run_parts(blas.sgemm, n_parts, _by_rows(out.shape, trans_a, n_parts), a_c, trans_a, b_c, trans_b, out)
    return True

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
                self.sgemm, self.set_threads = self._split_functions(lib, prefix, suffix)
                self.one_thread = _OneThread(self)
                return
        raise LookupError("NumPy's OpenBLAS has no openblas_set_threads_callback_function (it needs >= 0.3.27)")

    @staticmethod
    def _split_functions(lib, prefix, suffix):
        """The address of ``cblas_sgemm`` and ``openblas_set_num_threads``, or (None, None): the split
        is only for 64-bit-integer builds (``64_``, as NumPy's wheels are)."""
        sgemm, setter = f"{prefix}cblas_sgemm{suffix}", f"{prefix}openblas_set_num_threads{suffix}"
        if suffix != "64_" or not hasattr(lib, sgemm) or not hasattr(lib, setter):
            return None, None
        set_threads = getattr(lib, setter)
        set_threads.argtypes, set_threads.restype = [ctypes.c_int], None
        return ctypes.cast(getattr(lib, sgemm), ctypes.c_void_p).value, set_threads


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
    return blas, None


def _splits(blas, threads):
    return blas.sgemm is not None and threads <= config.CPU_BLAS_SPLIT_THREADS


def _callback_fits(blas, threads):
    """Whether Numba gives this thread a thread for each of the jobs OpenBLAS may make."""
    return blas.threads() <= threads


def status():
    """(whether the engine's BLAS matmuls run on Numba's pool, how or why not), for ``bench``'s notes."""
    blas, why = _lendable()
    threads = thread_count()
    if blas is not None and _splits(blas, threads):
        return True, f"each split into one one-thread OpenBLAS call per Numba thread ({threads})"
    if blas is not None and _callback_fits(blas, threads):
        return True, f"OpenBLAS's jobs on Numba's {threads} threads"
    if blas is not None:
        why = f"OpenBLAS wants {blas.threads()} threads, Numba gives this thread {threads}"
    return False, why


def splitter():
    """NumPy's OpenBLAS when products are split now (the split above), else None: for kernels that run
    their own one-thread ``cblas_sgemm`` parts (``kernels.cpu._layer_parts_adam``) in its ``one_thread``."""
    blas, _ = _lendable()
    return blas if blas is not None and _splits(blas, thread_count()) else None


def matmul(a, b, out):
    """``np.matmul(a, b, out=out)`` split over Numba's threads or with OpenBLAS's jobs on them, and
    True; or, where neither can be (see the module's docstring), nothing done and False."""
    blas, _ = _lendable()
    if blas is None:
        return False
    threads = thread_count()
    if _splits(blas, threads) and _split(blas, a, b, out, threads):
        return True
    if not _callback_fits(blas, threads):
        return False
    blas.set_callback(_callback_address())
    try:
        np.matmul(a, b, out=out)
    finally:
        blas.set_callback(None)
    return True


def warm_up():
    """Finds NumPy's OpenBLAS and compiles (or loads) the split's kernel and the callback, where the
    pool can be lent."""
    if _numpy_openblas() is not None and _layer() in config.FAST_LAYERS:
        _run_parts(0, 0, True, *(np.zeros((0, 0), np.float32), 0) * 2, np.zeros((0, 0), np.float32))
        _callback_address()
