"""Run-time settings of the kernels: CUDA launch sizes and CPU threading.

Everything here is read when a kernel is *called*, so the engine or a test may change it at any time
(tests under the CUDA simulator shrink the launch sizes so that multi-block paths run on tiny inputs).
Compile-time choices (fast-math flags, which CPU kernels are parallel) live at the top of
``kernels/cpu.py`` because Numba's on-disk cache only notices edits to the file that defines a kernel.
"""

import os

# -- CUDA launches ---------------------------------------------------------------------------------
# Threads per block: a power of two, at most 1024 (the block reductions are tree reductions in shared
# memory sized for 1024 threads).
CUDA_THREADS_PER_BLOCK = 256
# Upper bound on blocks per launch; grid-stride loops cover the rest. 1024 x 256 threads keep an H100's
# 132 SMs full while limiting a reduction to 1024 atomic adds.
CUDA_MAX_BLOCKS = 1024
# Rows of the batch that one thread folds into a bias-gradient column before its atomic add.
CUDA_BIAS_ROWS_PER_THREAD = 32

# -- CPU threading ---------------------------------------------------------------------------------
# Every CPU kernel runs serially by default. Measured on the project's 2-core machine (AMD EPYC, Numba
# 0.68, NumPy 2.4 with OpenBLAS 0.3.31 at its default 2 threads). Numba's threading layer there is
# 'omp' (GNU libgomp; TBB is not installed), or 'workqueue' when NUMBA_THREADING_LAYER asks for it.
#
#   Adam alone, 869k params:         serial 0.60 ms    parallel 0.34 ms
#   Bernoulli alone, 128 x 784:      serial 49 us      parallel 27 us
#   a step (per layer a forward and a weight-gradient matmul, then Adam), median per step:
#     seed-b4 (869k params)          serial Adam 0.6-1.4 ms   parallel, omp 12-13 ms   workqueue 1.2 ms
#     wide-b512 (3.9M params)        serial Adam 24-26 ms     parallel, omp 41-42 ms   workqueue 25 ms
#     OPENBLAS_NUM_THREADS=1 and parallel Adam (omp): seed-b4 0.62 ms, wide-b512 37 ms
#
# Next to OpenBLAS's two threads, which keep spinning for a while after each matmul, Numba's OpenMP
# workers make the step 10x slower; the non-spinning workqueue layer still loses to the serial kernel,
# and taking OpenBLAS's second thread away costs the matmuls of the wide network more than a parallel
# Adam gains. So: serial kernels, OpenBLAS keeps both cores, and the engine needs to do nothing about
# threading (no numba.set_num_threads, no thread-count environment variables). Turn this on
# (VAECORE_PARALLEL_ADAM=1) only where BLAS is held to fewer threads than there are cores; the pool
# then has numba.get_num_threads() threads, which numba.set_num_threads() lowers.
CPU_PARALLEL_ADAM = os.environ.get("VAECORE_PARALLEL_ADAM", "0") == "1"


def cpu_threads():
    """Threads the parallel CPU kernels use (Numba's current setting, ``numba.set_num_threads``)."""
    import numba

    return numba.get_num_threads()
