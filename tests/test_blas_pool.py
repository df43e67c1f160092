"""OpenBLAS's matmuls on Numba's threads (kernels/blas_pool.py): split into one-thread calls per part,
or OpenBLAS's own jobs through its callback; the bits each way promises, the work really on Numba's
thread, and a plain matmul wherever the pool cannot be lent."""

import contextlib
import os
from functools import partial
import threading
import time

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from kernels import blas_pool, config, cpu
from kernels.adam import layer_backward_adam_composed

cpu.warm_up()          # starts Numba's pool and compiles the callback where it can be used
LENT, WHY = blas_pool.status()
needs_lending = pytest.mark.skipif(not LENT, reason=f"the pool cannot be lent here: {WHY}")
SPLITS = LENT and blas_pool._splits(blas_pool._numpy_openblas(), numba.get_num_threads())
needs_split = pytest.mark.skipif(not SPLITS, reason="the split does not run here: NumPy's OpenBLAS is not a "
                                 "64-bit-integer build, or Numba has more than "
                                 f"config.CPU_BLAS_SPLIT_THREADS threads ({WHY})")


def _products(rng):
    """The engine's layouts (x @ W, x.T @ delta, delta @ W.T) at sizes OpenBLAS splits over threads,
    a weight gradient with fewer rows than columns, and a square one."""
    x, w = rng.standard_normal((256, 784), np.float32), rng.standard_normal((784, 400), np.float32)
    delta = rng.standard_normal((256, 400), np.float32)
    sq = rng.standard_normal((512, 512), np.float32)
    return [(x, w), (x.T, delta), (delta, w.T), (delta.T, x), (sq, sq.T)]


@contextlib.contextmanager
def numba_threads(n):
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def test_thread_count_is_numbas_count_for_the_calling_thread():
    """The fast getter answers what numba.get_num_threads() does, after a set_num_threads on this
    thread, and on another Python thread (each thread has its own setting)."""
    assert blas_pool.thread_count() == numba.get_num_threads()
    with numba_threads(1):
        assert blas_pool.thread_count() == numba.get_num_threads() == 1
    assert blas_pool.thread_count() == numba.get_num_threads()
    seen = []
    worker = threading.Thread(target=lambda: seen.append((blas_pool.thread_count(), numba.get_num_threads())))
    with numba_threads(1):
        worker.start()
        worker.join()
    assert seen[0][0] == seen[0][1]


@needs_lending
def test_callback_gives_blas_its_own_bits(monkeypatch):
    monkeypatch.setattr(config, "CPU_BLAS_SPLIT_THREADS", 0)
    rng = np.random.default_rng(7)
    for a, b in _products(rng):
        expected = np.matmul(a, b)                    # OpenBLAS's own threads
        out = np.full_like(expected, np.nan)
        assert blas_pool.matmul(a, b, out)
        np.testing.assert_array_equal(out, expected)


def bound(q, n, n_parts):
    """Where the split starts part q (``blas_pool._bound``, spelled out): a multiple of 16 near q * n / n_parts."""
    return n if q >= n_parts else min(n, (q * n // n_parts + 8) // 16 * 16)


def test_parts_start_on_whole_panels_near_equal_shares():
    assert [blas_pool._bound(q, 400, 2) for q in range(3)] == [0, 208, 400]
    assert [blas_pool._bound(q, 784, 2) for q in range(3)] == [0, 400, 784]
    assert [blas_pool._bound(q, 1024, 2) for q in range(3)] == [0, 512, 1024]
    assert [blas_pool._bound(q, 128, 3) for q in range(4)] == [0, 48, 80, 128]
    assert [blas_pool._bound(q, 5, 2) for q in range(3)] == [0, 0, 5]          # one part takes it all
    for n in range(0, 300, 7):
        for parts in (1, 2, 3, 4):
            starts = [blas_pool._bound(q, n, parts) for q in range(parts + 1)]
            assert starts == [bound(q, n, parts) for q in range(parts + 1)]
            assert starts[0] == 0 and starts[-1] == n and starts == sorted(starts)
            assert all(x % 16 == 0 or x == n for x in starts)          # or an empty last part


def _one_thread_parts(a, b, n_parts):
    """a @ b as the split computes it: OpenBLAS on one thread, per range of rows (or columns)."""
    m, n = a.shape[0], b.shape[1]
    by_rows = blas_pool._by_rows((m, n), not a.flags.c_contiguous, n_parts)
    b = b.T.copy().T if b.flags.f_contiguous else b.copy()   # same layout, but NumPy does a @ a.T by syrk
    with threadpool_limits(1, user_api="blas"):
        if by_rows:
            return np.concatenate([a[bound(q, m, n_parts):bound(q + 1, m, n_parts)] @ b for q in range(n_parts)])
        return np.concatenate([a @ b[:, bound(q, n, n_parts):bound(q + 1, n, n_parts)] for q in range(n_parts)],
                              axis=1)


@needs_split
def test_split_gives_one_thread_blas_bits_of_each_part():
    rng = np.random.default_rng(9)
    small = rng.standard_normal((5, 3), np.float32), rng.standard_normal((3, 9), np.float32)
    for threads in sorted({1, numba.get_num_threads()}):       # one part per thread, even just one
        with numba_threads(threads):
            for a, b in [*_products(rng), small, (small[1].T, small[0].T)]:
                out = np.full((a.shape[0], b.shape[1]), np.nan, np.float32)
                assert blas_pool.matmul(a, b, out)
                np.testing.assert_array_equal(out, _one_thread_parts(a, b, threads))


@needs_split
@pytest.mark.parametrize("n_in,batch", [(784, 128), (20, 128), (10, 128), (784, config.CPU_FORWARD_PARTS_MAX_BATCH)])
def test_forward_over_rows_of_w_gives_one_thread_blas_parts_added_in_order(n_in, batch, monkeypatch):
    """At a batch of 9 to CPU_FORWARD_PARTS_MAX_BATCH, a layer's forward is one one-thread OpenBLAS
    product per part of W's rows (10 rows: an empty first part), added in order, then the bias and
    activation."""
    monkeypatch.setattr(config, "CPU_THIN_LAYER_MAX_WEIGHTS", 0)        # W's rows, however small W is
    rng = np.random.default_rng(11)
    x, W = rng.standard_normal((batch, n_in), np.float32), rng.standard_normal((n_in, 400), np.float32)
    bias = rng.standard_normal(400, np.float32)
    out = np.full((batch, 400), np.nan, np.float32)
    assert cpu._forward_way(x, W, out) not in (None, cpu._SMALL)
    cpu.linear_act_cpu(x, W, bias, "relu", out)
    n_parts = numba.get_num_threads()
    with threadpool_limits(1, user_api="blas"):
        parts = [x[:, bound(q, n_in, n_parts):bound(q + 1, n_in, n_parts)].copy()
                 @ W[bound(q, n_in, n_parts):bound(q + 1, n_in, n_parts)] for q in range(n_parts)]
    expected = parts[0]
    for part in parts[1:]:
        expected = expected + part
    cpu.bias_act_cpu(expected, bias, "relu")
    np.testing.assert_array_equal(out, expected)


@needs_split
@pytest.mark.parametrize("n_rows", [128, 20, 9])
def test_forward_of_a_small_w_over_rows_of_the_batch_gives_one_thread_blas_rows(n_rows):
    """A W of at most ``config.CPU_THIN_LAYER_MAX_WEIGHTS`` weights is split by the batch's rows
    instead: one one-thread OpenBLAS product per part of x's rows (9 rows: an empty first part), then
    the bias and activation."""
    rng = np.random.default_rng(12)
    x, W = rng.standard_normal((n_rows, 20), np.float32), rng.standard_normal((20, 400), np.float32)
    bias = rng.standard_normal(400, np.float32)
    assert W.size <= config.CPU_THIN_LAYER_MAX_WEIGHTS
    out = np.full((n_rows, 400), np.nan, np.float32)
    assert cpu._forward_way(x, W, out) not in (None, cpu._SMALL)
    cpu.linear_act_cpu(x, W, bias, "relu", out)
    n_parts = numba.get_num_threads()
    with threadpool_limits(1, user_api="blas"):
        expected = np.concatenate([x[bound(q, n_rows, n_parts):bound(q + 1, n_rows, n_parts)] @ W
                                   for q in range(n_parts)])
    cpu.bias_act_cpu(expected, bias, "relu")
    np.testing.assert_array_equal(out, expected)


@needs_split
def test_split_bits_do_not_depend_on_which_thread_runs_a_part():
    rng = np.random.default_rng(10)
    blas = blas_pool._numpy_openblas()
    for a, b in _products(rng)[:4]:
        expected = _one_thread_parts(a, b, 3)
        for threads in (1, numba.get_num_threads()):        # three parts on one thread, or spread
            with numba_threads(threads):
                out = np.full_like(expected, np.nan)
                assert blas_pool._split(blas, a, b, out, 3)
                np.testing.assert_array_equal(out, expected)


@needs_split
def test_split_declines_what_it_does_not_handle_and_the_callback_computes_it():
    blas = blas_pool._numpy_openblas()
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    for x, y, out in [(a.astype(np.float64), a.T, np.empty((3, 3))),          # not float32
                      (a[:, ::2], a[:, ::2].T, np.empty((3, 3), np.float32)),  # strided operands
                      (a, a.T, np.empty((3, 3), np.float32).T),                # output not C-contiguous
                      (a[:, :0], a[:, :0].T, np.empty((3, 3), np.float32))]:   # nothing to sum
        assert not blas_pool._split(blas, x, y, out, 2)
        assert blas_pool.matmul(x, y, out)
        np.testing.assert_allclose(out, x @ y)
    square = np.ones((4, 4), np.float32)
    assert not blas_pool._split(blas, square, square, square, 2)                   # out overlaps an operand


def _thread_cpu_times():
    """{thread id: CPU seconds} of this process's threads, from /proc."""
    times = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:                               # the thread ended meanwhile
            continue
        times[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return times


def _helper_thread(work):
    """The thread other than this one that ``work`` kept busiest."""
    before = _thread_cpu_times()
    work()
    after = _thread_cpu_times()
    me = str(threading.get_native_id())
    gained = {t: after[t] - before.get(t, 0.0) for t in after if t != me}
    return max(gained, key=gained.get)


@needs_lending
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc to see threads")
@pytest.mark.skipif(numba.get_num_threads() < 2, reason="one thread: no second thread to look for")
@pytest.mark.parametrize("split", [pytest.param(True, marks=needs_split, id="split"),
                                   pytest.param(False, id="callback")])
def test_lent_matmul_runs_on_numbas_thread_not_openblas_own(monkeypatch, split):
    monkeypatch.setattr(config, "CPU_BLAS_SPLIT_THREADS", 64 if split else 0)
    rng = np.random.default_rng(8)
    a = rng.standard_normal((1024, 1024), np.float32)
    out = np.empty_like(a)
    p = np.zeros(1 << 22, np.float32)

    def numba_work():
        for _ in range(40):
            cpu._adam_parallel(p, p, p, p, 0.9, 0.999, 0.1, 0.001, 0.0, 1.0, 1.0, 0.0, False,
                               cpu._whole_buffer(p.size), 16)

    def lent_work():
        for _ in range(20):
            assert blas_pool.matmul(a, a, out)

    def own_work():
        for _ in range(20):
            np.matmul(a, a, out=out)

    numba_thread = _helper_thread(numba_work)
    time.sleep(0.3)                                   # OpenBLAS's own workers back asleep
    assert _helper_thread(lent_work) == numba_thread
    assert _helper_thread(own_work) != numba_thread


def test_pool_is_not_lent_when_switched_off_or_numba_has_fewer_threads(monkeypatch):
    a = np.ones((300, 300), np.float32)
    out = np.empty_like(a)
    monkeypatch.setattr(config, "CPU_SHARE_BLAS_THREADS", False)
    assert not blas_pool.matmul(a, a, out)
    monkeypatch.setattr(config, "CPU_SHARE_BLAS_THREADS", True)
    monkeypatch.setattr(config, "CPU_BLAS_SPLIT_THREADS", 0)
    with numba_threads(1):         # OpenBLAS's jobs wait for each other: one Numba thread would deadlock
        if blas_pool._numpy_openblas() is not None and blas_pool._numpy_openblas().threads() > 1:
            assert not blas_pool.matmul(a, a, out)
    cpu.matmul_cpu(a, a, out)      # and the engine's matmul still computes it, on OpenBLAS's threads
    np.testing.assert_allclose(out, 300.0)


def test_status_says_why():
    lent, why = blas_pool.status()
    assert isinstance(lent, bool) and why


@needs_lending
def test_engine_steps_give_the_same_bits_with_the_callback_or_openblas_own_threads(monkeypatch):
    from vaecore.benchmark.configs import CONFIGS
    from vaecore.benchmark.ours import OurStep

    monkeypatch.setattr(config, "CPU_BLAS_SPLIT_THREADS", 0)
    params = {}
    for lend in (False, True):
        monkeypatch.setattr(config, "CPU_SHARE_BLAS_THREADS", lend)
        step = OurStep(CONFIGS["example-b128"])
        for _ in range(3):
            step.step()
        params[lend] = step.model.params.copy()
    np.testing.assert_array_equal(params[True], params[False])


@needs_split
def test_split_leaves_openblas_thread_count_as_it_found_it():
    blas = blas_pool._numpy_openblas()
    a = np.ones((64, 32), np.float32)
    out = np.empty((64, 64), np.float32)
    before = blas.threads()
    assert blas_pool.matmul(a, a.T, out)
    assert blas.threads() == before
    with threadpool_limits(1, user_api="blas"):     # a count the user set is kept too
        assert blas_pool.matmul(a, a.T, out)
        assert blas.threads() == 1
    np.testing.assert_array_equal(out, 32.0)


@needs_split
def test_engine_steps_with_the_split_repeat_bit_for_bit():
    from vaecore.benchmark.configs import CONFIGS
    from vaecore.benchmark.ours import OurStep

    runs = []
    for _ in range(2):
        step = OurStep(CONFIGS["example-b128"])
        for _ in range(10):
            step.step()
        runs.append(step.model.params.copy())
    np.testing.assert_array_equal(runs[0], runs[1])


def _one_thread_blas(a, b, out):
    with threadpool_limits(1, user_api="blas"):
        np.matmul(a, b, out=out)


def _turned_parts(x, delta, W):
    """dx as the split takes it at a batch of at most CPU_TRANSPOSED_DX_MAX_BATCH: part q's columns are
    one-thread OpenBLAS's W_q @ delta.T, neither operand transposed, turned back."""
    n_parts, n_in = numba.get_num_threads(), W.shape[0]
    delta_t = np.ascontiguousarray(delta.T)
    dx = np.empty((delta.shape[0], n_in), np.float32)
    for q in range(n_parts):
        lo, hi = blas_pool._bound(q, n_in, n_parts), blas_pool._bound(q + 1, n_in, n_parts)
        part = np.empty((hi - lo, delta.shape[0]), np.float32)
        _one_thread_blas(np.ascontiguousarray(W[lo:hi]), delta_t, part)
        dx[:, lo:hi] = part.T
    return dx


@needs_split
@pytest.mark.parametrize("n_in,n_out", [(784, 400), (400, 784), (400, 40), (20, 400), (3, 5)])
@pytest.mark.parametrize("with_dx", [True, False])
@pytest.mark.parametrize("batch", [config.CPU_TRANSPOSED_DX_MAX_BATCH, config.CPU_TRANSPOSED_DX_MAX_BATCH + 16])
def test_layer_update_in_the_split_gives_the_plain_paths_bits(n_in, n_out, with_dx, batch):
    """At a batch above CPU_SMALL_BATCH, kernels.cpu.layer_backward_adam_cpu runs each thread's column
    part of the data gradient, row part of the weight gradient and their update in one launch (or,
    for a layer the split would cut otherwise, the plain products): the bits of the split products
    followed by adam_step_cpu, whichever OpenBLAS kernel runs. Up to CPU_TRANSPOSED_DX_MAX_BATCH, the
    data gradient's parts are turned products (``_turned_parts``; the same bits as d @ W.T with
    SkylakeX's kernels, not with Haswell's). A thin layer with a data gradient computes both products
    whole, each on one thread: one-thread OpenBLAS's bits."""
    rng = np.random.default_rng(11)
    offset = 3
    assert cpu.fuses_layer_adam_cpu(batch)
    n = offset + (n_in + 1) * n_out + 2
    state = [rng.standard_normal(n, np.float32), rng.standard_normal(n, np.float32),
             np.abs(rng.standard_normal(n, np.float32)) * 0.01, np.abs(rng.standard_normal(n, np.float32)) * 0.01]
    x, delta = rng.standard_normal((batch, n_in), np.float32), rng.standard_normal((batch, n_out), np.float32)
    runs = []
    plain_matmul = cpu.matmul_cpu
    thin = n_in * n_out <= config.CPU_THIN_LAYER_MAX_WEIGHTS
    if with_dx and thin:
        plain_matmul = _one_thread_blas          # a thin layer's products whole, side by side
    plain_kernels = partial(layer_backward_adam_composed, plain_matmul, cpu.adam_step_cpu)
    for kernel in (cpu.layer_backward_adam_cpu, plain_kernels):
        out = [a.copy() for a in state]
        dx = np.full((batch, n_in), np.nan, np.float32) if with_dx else None
        squares = kernel(x, delta, *out, (offset, n_in, n_out), dx, 2, 1e-3, weight_decay=0.1)
        runs.append((squares, out, dx))
    (squares, fused, dx), (squares_plain, plain, dx_plain) = runs
    for a, b in zip(fused, plain):
        np.testing.assert_array_equal(a, b)
    turned = with_dx and not thin and batch <= config.CPU_TRANSPOSED_DX_MAX_BATCH and cpu._split_fits(
        batch, n_in, n_out, True)
    if turned:
        W = state[0][offset:offset + n_in * n_out].reshape(n_in, n_out)
        np.testing.assert_array_equal(dx, _turned_parts(x, delta, W))
        np.testing.assert_allclose(dx, dx_plain, rtol=1e-5, atol=1e-4)
    elif with_dx:
        np.testing.assert_array_equal(dx, dx_plain)
    assert squares == pytest.approx(squares_plain, rel=1e-6)
