"""Run-time settings of the kernels: CUDA launch sizes and CPU threading.

Everything here is read when a kernel is *called*, so the engine or a test may change it at any time
(tests under the CUDA simulator shrink the launch sizes so that multi-block paths run on tiny inputs).
Compile-time choices (fast-math flags, which CPU kernels are parallel) live at the top of
``kernels/cpu.py`` because Numba's on-disk cache only notices edits to the file that defines a kernel.
"""

# -- CUDA launches ---------------------------------------------------------------------------------
# Threads per block: a power of two, at most 1024 (the block reductions are tree reductions in shared
# memory sized for 1024 threads).
CUDA_THREADS_PER_BLOCK = 256
# Upper bound on blocks per launch; grid-stride loops cover the rest. 1024 x 256 threads keep an H100's
# 132 SMs full while limiting a reduction to 1024 atomic adds.
CUDA_MAX_BLOCKS = 1024
# Rows of the batch that one thread folds into a bias-gradient column before its atomic add. Few, so a
# batch of 128 makes 64 blocks of a 400-wide layer rather than 8 (each thread's loads are serial).
CUDA_BIAS_ROWS_PER_THREAD = 4

# -- CPU matmuls and threading ---------------------------------------------------------------------
# A matmul whose batch side has at most this many rows runs in the small-batch kernels of
# kernels/matmul.py instead of BLAS. Per layer of the seed network (784-400-200) against OpenBLAS
# 0.3.31 (2 threads) on the project's 2-core machine, batch 4: forward 18-21 us vs 38-46 us, data
# gradient 15-32 us vs 43-83 us, weight gradient 36 us (19 on two threads) vs 17-59 us. Whole steps
# with all matmuls in these kernels against all in BLAS: batch 4, 300 vs 480 us; batch 8, 0.74x;
# batch 12, 0.77-0.86x; batch 16, 0.83-1.0x; batch 24, 0.95-1.14x (784-400 with latent 200 and 20).
CPU_SMALL_BATCH = 8

# BLAS matmuls run on Numba's threads (kernels/blas_pool.py; OpenBLAS >= 0.3.27), so OpenBLAS's own
# workers stay asleep and Numba's kernels may take every core right after a matmul. Off, or where
# NumPy's BLAS cannot do it, the rule below decides.
CPU_SHARE_BLAS_THREADS = True
# ... and, where NumPy's OpenBLAS allows (a 64-bit-integer build), by splitting each product into one
# part per Numba thread, each a one-thread OpenBLAS call, instead of taking OpenBLAS's own jobs: its
# jobs share packed panels between the threads, and on the project's 2-core machine moving them between
# the cores cost more than each thread packing its own. Per product,
# same process, both ways in turn (OpenBLAS 0.3.31, SkylakeX kernels): example-b128's eleven products
# 1,115 -> 1,046 us (x @ W 205 -> 191, delta @ W.T 251 -> 236, the heads' 10-15 us ones 1.1-2.2x
# faster); wide-b512's within 1% (OpenBLAS is at the cores' peak there either way). Whole step, 30
# alternations, twice: example-b128 1,347 -> 1,301 us and 1,347 -> 1,300 us; wide-b512 28.10 -> 28.01 ms.
# Measured on two cores only: with many, each thread would pack the shared operand for a thin part, so
# the split runs while Numba has at most this many threads. Beyond that, or at 0: OpenBLAS's own jobs on
# Numba's threads (its callback), the same bits as OpenBLAS's own threads.
CPU_BLAS_SPLIT_THREADS = 2
# Above CPU_SMALL_BATCH and up to this batch, while products are split, a layer's forward is split over
# the rows of W instead -- each thread takes the rows its Adam updates, so it reads the weights it
# wrote -- and the threads then add the partial products in order, with the bias and activation, each
# into its rows of the output (kernels.cpu.linear_act_cpu). On the project's machine, data written by
# one core reaches the other 2.5x slower in phases (benchmarks/RESULTS.md). example-b128 step, one
# process, in turn with the split by columns then the bias and activation: 1.052-1.057 old/new in those
# phases (new faster in 40 of 40 and 53 of 53 alternations), 1.000 outside them (7 alternations).
# wide-b512 then: 1.029 and 1.042 in those phases, but 0.972 outside them (new faster in 6 of 23), its
# partial products 2 MB each, written and read again. Since the first part's product goes straight into
# the output, and the partial sums vectorise (both 2026-11-26), wide-b512 with its batch of 512 taken this
# way against the old limit of 128: 1.004 / 1.007 outside the slow phases (9 of 14, 6 of 8 alternations)
# and 1.060 / 1.070 in them (8 of 10, 14 of 16). Not measured above 512.
CPU_FORWARD_PARTS_MAX_BATCH = 512
# Up to this batch, while products are split, a layer's data gradient d @ W.T is taken as W_q @ d.T
# with both operands turned first (kernels/transpose.py): OpenBLAS packs a transposed operand slowly,
# and at few columns that copy is much of the product. One core, SkylakeX kernels, a part of the
# example decoder's last layer (128x784 by 784x200): 223 us as d @ W.T, 184 + 8 + 2 us turned. Batch
# 192: 295 against 265 + 15 + 3; 256: 377 against 358 + 20 + 4; 512 (wide-b512): the step 0.985
# (3 of 11 alternations). example-b128 step, one process, in turn: 1.018 and 1.031 (10 of 12, 4 of 4
# alternations) outside the slow phases, 1.031 and 1.039 in them (8 of 8, 13 of 14); against this
# limit at 0, 1.036 (19 of 20, outside them).
CPU_TRANSPOSED_DX_MAX_BATCH = 128
# A thin layer -- a W of at most this many weights: the example network's heads (400x40) and decoder's
# first layer (20x400), 8-16k -- goes its own way wherever products are split, because products over
# 10 of W's rows or 20 of its columns are mostly each OpenBLAS call's fixed cost:
# - its forward (batches 9 to CPU_FORWARD_PARTS_MAX_BATCH) by the batch's rows, each thread's product
#   straight into its rows of the output with the bias and activation. Alone: 27.2 -> 9.5 and
#   20.4 -> 15.7 us; example-b128 step 1.015 old/new in slow phases (25 of 26 alternations), 1.006
#   otherwise. Reading the other thread's rows of so small a W costs little; for the big layers this
#   way was slower (0.935).
# - its backward with a data gradient: the weight and data gradients whole, side by side on the two
#   threads, then the update (kernels.cpu._layer_pair_adam). Alone 36 -> 26 and 47 -> 37 us;
#   example-b128 step 1.011 (15 of 17) and 1.034-1.041 in slow phases (28 of 29, 10 of 13);
#   wide-b512, whose decoder's first layer (64x1024) also takes it, 1.002.
CPU_THIN_LAYER_MAX_WEIGHTS = 1 << 16

# Numba threading layers whose threads wait ready between parallel calls; only these run the parallel
# kernels and take OpenBLAS's jobs (workqueue wakes sleeping threads per call, see below).
FAST_LAYERS = ("omp", "tbb")

# Adam and the parallel kernels spread over Numba's threads only while OpenBLAS's own threads are idle:
# when kernels.cpu.matmul_cpu has not woken them for this many seconds. After a call OpenBLAS's workers
# spin for about 0.1 s (measured: a step that followed one straight away ran 10x slower with a parallel
# Adam), so without the sharing above a training step at a batch of at most CPU_SMALL_BATCH, which
# calls no BLAS, gets both cores from its second step on, and one at a larger batch never does.
CPU_BLAS_SPIN_SECONDS = 0.25
#
# Measured on the project's 2-core machine (AMD EPYC, Numba 0.68, NumPy 2.4 with OpenBLAS 0.3.31 at its
# default 2 threads). Numba's threading layer there is 'omp' (GNU libgomp; TBB is not installed), or
# 'workqueue' when NUMBA_THREADING_LAYER asks for it; only omp and tbb are used in parallel (the
# workqueue layer's sleeping threads made a parallel Adam slower than a serial one even alone).
#
#   Adam alone, 869k params:         serial 0.12-0.17 ms   omp 0.085 ms   workqueue 0.18 ms
#   small-batch matmul, batch 4:     784x400 weight gradient 36 us serial, 19 us omp; data gradient 28 / 16 us
#   a step with BLAS matmuls, then Adam, serial vs parallel Adam (median per step):
#     seed-b4 (869k params)          omp, default spin  0.48 ms vs 8.0 ms
#                                    omp, OMP_WAIT_POLICY=passive  0.48 vs 0.49 ms;  workqueue 0.48 vs 0.52 ms
#     example-b128 (653k params)     omp 1.36 ms vs 8.0 ms;  workqueue 1.36 vs 1.46 ms
#     wide-b512 (3.9M params)        omp 28.8 ms vs 35.5-37.2 ms;  workqueue 28.4 vs 28.7 ms
#
#   with the pool lent to OpenBLAS (CPU_SHARE_BLAS_THREADS) or not, same process, alternating rounds:
#     example-b128                   1.54 -> 1.45 ms (Adam 163 -> 89 us); in a slow phase 2.10 -> 1.94 ms
#     wide-b512                      33.4 -> 32.8 ms (Adam 1.83 -> 1.50 ms: bound by memory)
#
# Even with the cores free, kernels.cpu._SplitChoice runs the parallel kernels on one thread while
# timing says that is faster: when another process keeps a core busy, every two-thread call waits at
# its barrier (seed-b4 with a busy loop pinned to one core: 620-1,600 us per step on two threads, 470 on
# one; with the choice, 468 us, and 291 us once the core is free again).
#
# Each thread keeps to the same rows of every layer from kernel to kernel: the small-batch forward,
# gradient kernels and Adam split a layer's W by rows alike (Adam through the model's
# param_blocks), so a core updates the rows it has just written. In this machine's slow phases, when
# data written on one core is slow to reach the other, Adam over equal slices of the flat buffer made
# a seed-b4 step 541 us against 352 us (no difference in normal phases).
#
# The engine sets no thread-count environment variables and never calls numba.set_num_threads for
# the process: the pool has numba.get_num_threads() threads, which numba.set_num_threads() lowers,
# and OpenBLAS's jobs are lent it only while that is at least OpenBLAS's own thread count.


def cpu_threads():
    """Threads the parallel CPU kernels use (Numba's current setting, ``numba.set_num_threads``)."""
    import numba

    return numba.get_num_threads()
