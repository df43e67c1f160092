"""OpenBLAS's jobs on Numba's threads (kernels/blas_pool.py): the same products, bit for bit, the work
really on Numba's thread, and a plain matmul wherever the pool cannot be lent."""

import os
import threading
import time

import numba
import numpy as np
import pytest

from kernels import blas_pool, config, cpu

cpu.warm_up()          # starts Numba's pool and compiles the callback where it can be used
LENT, WHY = blas_pool.status()
needs_lending = pytest.mark.skipif(not LENT, reason=f"the pool cannot be lent here: {WHY}")


def _products(rng):
    """The engine's layouts (x @ W, x.T @ delta, delta @ W.T) at sizes OpenBLAS splits over threads,
    and a square one."""
    x, w = rng.standard_normal((256, 784), np.float32), rng.standard_normal((784, 400), np.float32)
    delta = rng.standard_normal((256, 400), np.float32)
    sq = rng.standard_normal((512, 512), np.float32)
    return [(x, w), (x.T, delta), (delta, w.T), (sq, sq.T)]


@needs_lending
def test_lent_pool_gives_blas_its_own_bits(monkeypatch):
    rng = np.random.default_rng(7)
    for a, b in _products(rng):
        expected = np.matmul(a, b)                    # OpenBLAS's own threads
        out = np.full_like(expected, np.nan)
        assert blas_pool.matmul(a, b, out)
        np.testing.assert_array_equal(out, expected)


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
def test_lent_matmul_runs_on_numbas_thread_not_openblas_own(monkeypatch):
    rng = np.random.default_rng(8)
    a = rng.standard_normal((1024, 1024), np.float32)
    out = np.empty_like(a)
    p = np.zeros(1 << 22, np.float32)

    def numba_work():
        for _ in range(40):
            cpu._adam_parallel(p, p, p, p, 0.9, 0.999, 0.1, 0.001, 0.0, 1.0, 1.0, 0.0,
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
    threads = numba.get_num_threads()
    numba.set_num_threads(1)       # OpenBLAS's jobs wait for each other: one Numba thread would deadlock
    try:
        if blas_pool._numpy_openblas() is not None and blas_pool._numpy_openblas().threads() > 1:
            assert not blas_pool.matmul(a, a, out)
    finally:
        numba.set_num_threads(threads)
    cpu.matmul_cpu(a, a, out)      # and the engine's matmul still computes it, on OpenBLAS's threads
    np.testing.assert_allclose(out, 300.0)


def test_status_says_why():
    lent, why = blas_pool.status()
    assert isinstance(lent, bool) and why


@needs_lending
def test_engine_steps_give_the_same_bits_with_the_pool_lent_or_not(monkeypatch):
    from vaecore.benchmark.configs import CONFIGS
    from vaecore.benchmark.ours import OurStep

    params = {}
    for lend in (False, True):
        monkeypatch.setattr(config, "CPU_SHARE_BLAS_THREADS", lend)
        step = OurStep(CONFIGS["example-b128"])
        for _ in range(3):
            step.step()
        params[lend] = step.model.params.copy()
    np.testing.assert_array_equal(params[True], params[False])
