"""``out = a @ b`` into a preallocated buffer, with kernels of their own for a small batch.

Every matmul of a training step has the batch on one side: the forward ``x @ W`` (B, n_in) @
(n_in, n_out), the weight gradient ``x.T @ delta`` and the data gradient ``delta @ W.T``. At a batch of
a few images these are matrix-vector products bound by streaming ``W`` once, where a BLAS ``sgemm``
spends more in its packing and thread hand-offs than in the arithmetic (OpenBLAS took 38-83 us for a
784 x 400 layer at batch 4 on the project's machine; the small-batch kernels 18-36 us on one core).
And a step with no BLAS call leaves OpenBLAS's threads asleep, so these kernels and Adam can have
both cores (``kernels.config`` says when; the forward then sums over W's rows in four parts added in a
fixed order, so the bits do not depend on the number of threads).

The CPU table takes its own kernels when the batch side has at most ``kernels.config.CPU_SMALL_BATCH``
rows and the operands are the engine's float32 layouts; anything else goes to NumPy's matmul. The CUDA
table always calls CuPy's (cuBLAS); the reference is the plain ``@``.
"""


def matmul_reference(a, b, out):
    out[...] = a @ b
