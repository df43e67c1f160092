"""The column-major cuBLAS call that ``kernels.cublas`` makes for a row-major product, checked without a GPU:
a plain column-major SGEMM over the arrays' own memory, given the arguments ``sgemm_arguments`` chose,
must write ``a @ b`` into ``out``. The engine's layouts, shapes with a dimension of 1 or 0, and the layouts
it refuses (left to CuPy's matmul). The real call is compared on a GPU in ``test_kernels_cuda_sim.py``."""

import numpy as np
import pytest

from kernels.cublas import _OP_N, _OP_T, sgemm_arguments


def column_major(memory, rows, cols, ld):
    """The column-major (rows x cols) matrix with leading dimension ``ld`` over flat ``memory``."""
    return np.array([[memory[i + j * ld] for j in range(cols)] for i in range(rows)], np.float64).reshape(rows, cols)


def operand(memory, op, rows, cols, ld):
    """op(X) as cuBLAS reads it: (rows x cols) after the operation."""
    if op == _OP_N:
        return column_major(memory, rows, cols, ld)
    assert op == _OP_T
    return column_major(memory, cols, rows, ld).T


def emulate_sgemm(a, b, out):
    """Runs the column-major sgemm(op_1, op_2, m, n, k, 1, b, ld_1, a, ld_2, 0, out, ld_out) on the arrays'
    memory (``np.ravel(order="K")`` is a contiguous array's memory order)."""
    op_1, op_2, m, n, k, ld_1, ld_2, ld_out = sgemm_arguments(a, b, out)
    assert ld_1 >= max(1, m if op_1 == _OP_N else k) and ld_2 >= max(1, k if op_2 == _OP_N else n)
    assert ld_out >= max(1, m)
    product = operand(np.ravel(b, order="K"), op_1, m, k, ld_1) @ operand(np.ravel(a, order="K"), op_2, k, n, ld_2)
    memory = np.zeros(out.size)
    for j in range(n):
        memory[j * ld_out:j * ld_out + m] = product[:, j]
    return memory.reshape(out.shape)


def layouts(rng, rows, cols):
    """The same matrix C-contiguous and as the transposed view of a C-contiguous array."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    return {"C": x, "F": np.ascontiguousarray(x.T).T}


@pytest.mark.parametrize("m, k, n", [(3, 5, 7), (4, 784, 3), (1, 5, 7), (3, 1, 7), (3, 5, 1), (1, 1, 1), (3, 0, 4)])
@pytest.mark.parametrize("layout_a", ["C", "F"])
@pytest.mark.parametrize("layout_b", ["C", "F"])
def test_the_column_major_call_writes_the_row_major_product(m, k, n, layout_a, layout_b):
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    a, b = layouts(rng, m, k)[layout_a], layouts(rng, k, n)[layout_b]
    out = np.empty((m, n), np.float32)
    np.testing.assert_allclose(emulate_sgemm(a, b, out), a.astype(np.float64) @ b, rtol=1e-6, atol=1e-6)


def test_the_engine_layouts_take_the_expected_operations():
    """Forward x @ W, weight gradient x.T @ delta, data gradient delta @ W.T (row-major names)."""
    x, w, d = np.ones((128, 784), np.float32), np.ones((784, 400), np.float32), np.ones((128, 400), np.float32)
    assert sgemm_arguments(x, w, np.empty((128, 400), np.float32)) == (_OP_N, _OP_N, 400, 128, 784, 400, 784, 400)
    assert sgemm_arguments(x.T, d, np.empty((784, 400), np.float32)) == (_OP_N, _OP_T, 400, 784, 128, 400, 784, 400)
    assert sgemm_arguments(d, w.T, np.empty((128, 784), np.float32)) == (_OP_T, _OP_N, 784, 128, 400, 400, 400, 784)


def test_layouts_cublas_cannot_read_are_refused():
    a, b = np.ones((4, 6), np.float32), np.ones((6, 5), np.float32)
    out = np.empty((4, 5), np.float32)
    assert sgemm_arguments(a, b, out) is not None
    assert sgemm_arguments(np.ones((4, 12), np.float32)[:, ::2], b, out) is None        # strided
    assert sgemm_arguments(a, b, np.empty((5, 4), np.float32).T) is None                 # out not C-contiguous
    assert sgemm_arguments(a.astype(np.float64), b, out) is None                          # not float32
    assert sgemm_arguments(a, np.ones((7, 5), np.float32), out) is None                  # shapes disagree
    assert sgemm_arguments(a[None], b, out) is None                                       # not 2-D
