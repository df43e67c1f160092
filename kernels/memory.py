"""NumPy buffers that start on a cache line.

Why: the CPU kernels split rows between threads by columns (each part of a split product writes its
columns of dx, each thread converts its columns of the pixels), and the splits fall on multiples of 16
float32s, 64 bytes. That keeps two threads off one cache line only when the row starts on one, and
NumPy's buffers of more than 128 KB come from ``mmap`` 16 bytes past a page: the line at every row's
edge between two threads' columns went back and forth between the cores (two threads each taking half
of a 128x400 array's columns: 27 us with the edge inside a line, 5 with it on one). With the engine's
buffers on 64-byte lines, one process, a step object each way, in turn: example-b128 1.019 (14 of 16
alternations), seed-b4 1.035 (9 of 11), wide-b512 1.031 (10 of 12).
"""

import math

import numpy as np

LINE = 64       # bytes


def empty_aligned(shape, dtype=np.float32, zero=False):
    """A C-contiguous array of ``shape`` whose data starts on a ``LINE``-byte boundary: a view into a
    buffer one line longer (zeroed with ``zero``)."""
    shape = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    spare = LINE // dtype.itemsize
    buffer = (np.zeros if zero else np.empty)(count + spare, dtype)
    start = (-buffer.ctypes.data % LINE) // dtype.itemsize
    return buffer[start:start + count].reshape(shape)
