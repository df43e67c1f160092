"""A float32 transpose that vectorises: 8x8 blocks turned in registers.

Why: OpenBLAS's ``d @ W.T`` at a batch of 128 runs at 180 GFLOP/s on one core against 220-240 for the
same product with no transposed operand: packing a transposed operand, its copy routine is the slow
part, and at 128 columns its cost is spread over few multiply-adds. :func:`kernels.cpu._layer_parts_adam`
therefore turns ``delta`` itself and multiplies ``W @ delta.T`` with no transpose, then turns the result
into its columns of dx. A transpose written as ``dst[j, i] = src[i, j]`` stays scalar in Numba
(200x784: 62 us; NumPy's copy 42 us); loading eight rows of eight floats, shuffling them in three
rounds (LLVM's ``shufflevector``, which the backend lowers to the machine's own shuffles) and storing
eight columns takes 12 us, and 128x784 6 us.
"""

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_LANES = 8


@intrinsic
def _turn_block(typingctx, src, src_stride, dst, dst_stride):
    """The 8x8 float32 block at address ``src`` (rows ``src_stride`` elements apart) written transposed
    at address ``dst`` (rows ``dst_stride`` apart)."""
    def codegen(context, builder, signature, args):
        src, src_stride, dst, dst_stride = args
        f32, i64 = ir.FloatType(), ir.IntType(64)
        row_type = ir.VectorType(f32, _LANES).as_pointer()

        def row(base, stride, r):
            element = builder.gep(builder.inttoptr(base, f32.as_pointer()), [builder.mul(stride, ir.Constant(i64, r))])
            return builder.bitcast(element, row_type)

        def mix(a, b, mask):
            return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), _LANES), mask))

        rows = [builder.load(row(src, src_stride, r), align=4) for r in range(_LANES)]
        # 1: interleave pairs of rows; 2: pairs of those, two elements at a time; 3: the 4-element halves
        low, high = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
        t = [mix(rows[r], rows[r + 1], mask) for r in range(0, _LANES, 2) for mask in (low, high)]
        low, high = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
        u = [mix(t[r + k], t[r + k + 2], mask) for r in (0, 4) for k in (0, 1) for mask in (low, high)]
        low, high = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
        columns = [mix(u[r], u[r + 4], mask) for mask in (low, high) for r in range(4)]
        for r, column in enumerate(columns):
            builder.store(column, row(dst, dst_stride, r), align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64), codegen


@njit(inline="always")
def transpose_into_columns(src, dst, col):
    """``dst[:, col:col + n] = src.T`` for C-contiguous float32 ``src`` (n, m) and ``dst`` (m, >= col + n).
    Column blocks outermost: each block's eight rows of ``dst`` are written left to right, and the source
    lines it reads half of stay in L1 for the next block (the other order: 200x784 in 20 us, not 12)."""
    n, m = src.shape
    stride = dst.shape[1]
    n_full, m_full = n - n % _LANES, m - m % _LANES
    src_at, dst_at = src.ctypes.data, dst.ctypes.data + 4 * col
    for j in range(0, m_full, _LANES):
        for i in range(0, n_full, _LANES):
            _turn_block(src_at + 4 * (i * m + j), m, dst_at + 4 * (j * stride + i), stride)
    for j in range(m_full, m):
        for i in range(n):
            dst[j, col + i] = src[i, j]
    for j in range(m_full):
        for i in range(n_full, n):
            dst[j, col + i] = src[i, j]


@njit(cache=True, nogil=True)
def transpose_into_columns_serial(src, dst, col):
    """:func:`transpose_into_columns` as a call of its own (for the tests)."""
    transpose_into_columns(src, dst, col)
