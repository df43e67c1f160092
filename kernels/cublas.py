"""cuBLAS's float32 matrix product on CuPy arrays, called through cuBLAS's C API with a handle of our own.

Why not ``cupy.matmul``: CuPy refuses every cuBLAS call while a stream records a CUDA graph
(``NotImplementedError: calling cuBLAS API during stream capture is currently unsupported``, CuPy 14),
though cuBLAS supports capture, and a recorded training step (``vaecore/cuda_graph.py``) is mostly
matrix products. Called directly, a product also costs the host a few microseconds instead of CuPy's ~18.

The handle runs on CuPy's current stream and uses a workspace of its own (cuBLAS asks for one under
graph capture), allocated once per device outside CuPy's memory pool so that no pool can reuse it.
"""

import ctypes
import ctypes.util
import re

_OP_N, _OP_T = 0, 1
_WORKSPACE_BYTES = 32 << 20            # what cuBLAS recommends for Hopper; ample for older GPUs
_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)   # host pointer mode: read when the call is made


class Unavailable(RuntimeError):
    pass


def _library():
    """The libcublas CuPy loaded (found in this process's memory map), else one the loader finds."""
    import cupy
    import cupy_backends.cuda.libs.cublas  # noqa: F401  (loads libcublas into the process)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if re.search(r"/libcublas\.so[.\d]*$", line.strip())}
    except OSError:
        paths = set()
    major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    for candidate in [*sorted(paths), f"libcublas.so.{major}", ctypes.util.find_library("cublas")]:
        if candidate:
            try:
                return ctypes.CDLL(candidate)
            except OSError:
                continue
    raise Unavailable("libcublas is not loaded in this process and the loader cannot find it")


class Cublas:
    """One cuBLAS handle on the current CUDA device."""

    def __init__(self):
        import cupy

        lib = _library()
        try:
            self._create, self._set_stream = lib.cublasCreate_v2, lib.cublasSetStream_v2
            self._set_workspace, self._sgemm = lib.cublasSetWorkspace_v2, lib.cublasSgemm_v2
        except AttributeError as e:
            raise Unavailable(f"libcublas lacks {e}") from None
        self._create.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        self._set_stream.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._set_workspace.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float)
        self._sgemm.argtypes = [p, i, i, i, i, i, f, p, i, p, i, f, p, i]
        handle = ctypes.c_void_p()
        self._check(self._create(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        self._workspace = cupy.cuda.Memory(_WORKSPACE_BYTES)    # a plain cudaMalloc, owned by this object
        self._cupy = cupy
        self._stream = None

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def _on_current_stream(self):
        stream = self._cupy.cuda.get_current_stream().ptr
        if stream != self._stream:
            self._check(self._set_stream(self.handle, stream), "cublasSetStream")
            # setting the stream puts cuBLAS back on its default workspace
            self._check(self._set_workspace(self.handle, self._workspace.ptr, _WORKSPACE_BYTES), "cublasSetWorkspace")
            self._stream = stream

    def matmul(self, a, b, out):
        """``out[...] = a @ b`` where :func:`sgemm_arguments` takes the layouts; False, doing nothing,
        where it does not."""
        args = sgemm_arguments(a, b, out)
        if args is None:
            return False
        op_1, op_2, m, n, k, ld_1, ld_2, ld_out = args
        if k == 0:
            out.fill(0.0)                       # an empty sum, whatever cuBLAS would do with one
        elif m and n:
            self._on_current_stream()
            self._check(self._sgemm(self.handle, op_1, op_2, m, n, k, ctypes.byref(_ONE), b.data.ptr, ld_1,
                                    a.data.ptr, ld_2, ctypes.byref(_ZERO), out.data.ptr, ld_out), "cublasSgemm")
        return True


def sgemm_arguments(a, b, out):
    """(op_1, op_2, m, n, k, ld_1, ld_2, ld_out) of the column-major ``sgemm`` of ``b`` (first) and ``a``
    (second) that writes the row-major ``out = a @ b``; None unless all three are 2-D float32 arrays of
    matching shapes, ``a`` and ``b`` each C- or F-contiguous (a transposed view), ``out`` C-contiguous.

    Column-major, ``out`` is ``out.T = b.T @ a.T``: cuBLAS reads a C-contiguous array as its transpose
    as it is, and an F-contiguous one with the transposing operation."""
    lay_a, lay_b, lay_out = _layout(a), _layout(b), _layout(out)
    if lay_a is None or lay_b is None or lay_out is None or lay_out[0] != _OP_N:
        return None
    m, n, k = out.shape[0], out.shape[1], a.shape[1]
    if a.shape[0] != m or b.shape != (k, n):
        return None
    return lay_b[0], lay_a[0], n, m, k, lay_b[1], lay_a[1], lay_out[1]


def _layout(x):
    """(operation, leading dimension) with which cuBLAS reads the transpose of the row-major ``x``; None
    for a layout it cannot read as it is."""
    if x.ndim != 2 or x.dtype.char != "f":
        return None
    rows, cols = x.shape
    if x.flags.c_contiguous:
        return _OP_N, max(1, cols)
    if x.flags.f_contiguous:
        return _OP_T, max(1, rows)
    return None


_handles = {}


def for_current_device():
    """The current device's :class:`Cublas`, made on first use; raises :class:`Unavailable`.

    One per device and process, so that its workspace outlives every graph that recorded it. The engine
    drives the GPU from one thread; two threads running products at once would share that workspace."""
    import cupy

    device = cupy.cuda.runtime.getDevice()
    blas = _handles.get(device)
    if blas is None:
        blas = _handles[device] = Cublas()
    return blas
