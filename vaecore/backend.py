"""The one object that decides where arrays live and which kernels run.

A :class:`Backend` is made once, at the edge (the command line or an API call), and passed down.
Model code touches arrays only through ``backend.xp`` operations that NumPy, CuPy and the array API
standard share, plus the few methods here for the operations they spell differently (matmul into a
preallocated buffer, host <-> device copies).

Random numbers are always drawn on the host from NumPy's PCG64 (the noise as its uniforms, turned into
normals by :mod:`kernels.noise`) and copied into device buffers: the copy is tiny (B x Z noise per step),
the stream is identical on every backend, and its state is a JSON-serializable dict that a checkpoint
can carry -- so a run resumes exactly on either backend.
"""

from dataclasses import dataclass, field

import numpy as np

import kernels
import kernels.memory
import kernels.noise

from .errors import VaecoreError, reason

BACKENDS = ("numpy", "cupy", "auto")


@dataclass
class Backend:
    name: str                     # "numpy", "cupy" or "array_api_strict"
    xp: object                    # the array namespace
    kernels: kernels.KernelTable
    dtype: object = None          # float32 of xp unless asked otherwise
    device: object = None         # only for array_api_strict: where arrays are placed
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    _staging: dict = field(default_factory=dict, repr=False)   # device uint8 buffers by batch shape
    _uniforms: dict = field(default_factory=dict, repr=False)  # host float32 uniforms by noise size

    def __post_init__(self):
        if self.dtype is None:
            self.dtype = self.xp.float32

    # -- allocation -------------------------------------------------------------------------
    def empty(self, shape):
        if self.name == "numpy":                      # on cache lines: see kernels/memory.py
            return kernels.memory.empty_aligned(shape, self.dtype)
        return self.xp.empty(shape, dtype=self.dtype, **self._where())

    def zeros(self, shape):
        if self.name == "numpy":
            return kernels.memory.empty_aligned(shape, self.dtype, zero=True)
        return self.xp.zeros(shape, dtype=self.dtype, **self._where())

    def _where(self):
        return {} if self.device is None else {"device": self.device}

    # -- host <-> device: the only two crossings -------------------------------------------
    def asarray(self, host_array, dtype=None):
        """A new device array holding a copy of ``host_array`` (a NumPy array)."""
        return self.xp.asarray(np.ascontiguousarray(host_array), dtype=dtype or self.dtype, **self._where())

    def copy_from_host(self, dst, host_src):
        """Fills the existing device array ``dst`` from the NumPy array ``host_src`` of equal shape."""
        if self.name == "numpy":
            np.copyto(dst, host_src, casting="unsafe")
        elif self.name == "cupy":
            dst.set(np.ascontiguousarray(host_src, dtype=dst.dtype))
        else:
            dst[...] = self.xp.asarray(host_src, dtype=dst.dtype, **self._where())

    def to_host(self, array):
        """A NumPy copy (or view, on the NumPy backend) of a device array."""
        if self.name == "numpy":
            return array
        if self.name == "cupy":
            return array.get()
        import array_api_strict

        return np.asarray(array.to_device(array_api_strict.Device("CPU_DEVICE")))

    # -- operations the array libraries spell differently ----------------------------------
    def matmul(self, a, b, out):
        """``out[...] = a @ b`` without allocating where the library allows it (the kernel table's
        matmul: BLAS, cuBLAS, or the CPU's own kernels for a small batch)."""
        self.kernels.matmul(a, b, out)

    def normal_into(self, out, host_buffer, rng=None):
        """Fills ``out`` with N(0, 1) noise drawn on the host (into ``host_buffer``, same shape, except on
        NumPy): the generator's float32 uniforms through the Box-Muller transform (:mod:`kernels.noise`;
        5x faster than its ``standard_normal``), into a buffer made once per size.

        ``rng`` defaults to the backend's own stream, the one checkpoints save.
        """
        rng = rng or self.rng
        target = out if self.name == "numpy" else host_buffer
        uniforms = self._uniforms.get(target.size)
        if uniforms is None:
            uniforms = self._uniforms[target.size] = np.empty(kernels.noise.uniform_count(target.size), np.float32)
        rng.random(dtype=np.float32, out=uniforms)
        if target.dtype == np.float32:
            from kernels.cpu import normal_from_uniform_cpu    # here: importing vaecore loads no Numba

            normal_from_uniform_cpu(uniforms, target)
        else:
            kernels.noise.normal_from_uniform_reference(uniforms, target)
        if target is not out:
            self.copy_from_host(out, host_buffer)

    def images_into(self, out, host_uint8):
        """``out[...] = host_uint8 / 255`` as float on the device (the table's ``pixels``); only uint8
        crosses to it, through a staging buffer made once per batch shape."""
        self.kernels.pixels(self.stage_images(host_uint8), out)

    def stage_images(self, host_uint8):
        """The uint8 images on the device: copied into the staging buffer of their shape (the same array
        for every batch of that shape), or the host array itself on NumPy."""
        if self.name == "numpy":
            return host_uint8
        staging = self._staging.get(host_uint8.shape)
        if staging is None:
            staging = self._staging[host_uint8.shape] = self.xp.empty(host_uint8.shape, dtype=self.xp.uint8,
                                                                       **self._where())
        self.copy_from_host(staging, host_uint8)
        return staging

    def warm_up(self):
        """Compiles the CPU kernels, or loads them from Numba's disk cache (seconds the first time)."""
        if self.kernels.name == "cpu":
            import kernels.cpu

            kernels.cpu.warm_up()

    def synchronize(self):
        """Waits for all queued device work, on every stream (a graphed step runs on its own)."""
        if self.name == "cupy":
            self.xp.cuda.Device().synchronize()

    def describe(self):
        dtype = getattr(self.dtype, "__name__", None) or str(self.dtype).rsplit(".", 1)[-1]
        return f"{self.name} ({self.kernels.name} kernels, {dtype})"


def cupy_status():
    """(usable, reason): whether CuPy imports and a CUDA device answers."""
    try:
        import cupy
    except ImportError:
        return False, "CuPy is not installed (pip install 'vaecore[cuda]')"
    except Exception as e:  # a broken CUDA install raises all sorts of errors at import
        return False, f"CuPy failed to import: {reason(e)}"
    try:
        if not cupy.is_available():
            return False, "CuPy is installed but no CUDA device is available"
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return False, f"CuPy cannot reach a CUDA device: {reason(e)}"
    return True, "CUDA device available"


def _probe_cuda_kernels(table, cupy):
    """Compiles and launches one CUDA kernel and one matrix product now. A Numba CUDA target that cannot
    compile here fails only at a kernel's first launch, deep inside the first training step:
    numba-cuda 0.30.4 with NumPy 2.5 (which dropped ``np.row_stack``) did so on an H200 machine. The
    product makes the cuBLAS handle, outside any graph's memory pool."""
    try:
        one = cupy.zeros((1, 1), cupy.float32)
        table.bias_act(one, cupy.zeros(1, cupy.float32), "relu")
        table.matmul(one, one, cupy.empty((1, 1), cupy.float32))
        cupy.cuda.get_current_stream().synchronize()
    except Exception as e:
        from importlib.metadata import PackageNotFoundError, version

        try:
            numba_cuda = f"numba-cuda {version('numba-cuda')}"
        except PackageNotFoundError:
            numba_cuda = "numba's bundled CUDA target"
        raise VaecoreError(f"--backend cupy: the CUDA kernels do not compile or run here ({type(e).__name__}: "
                           f"{reason(e)}; {numba_cuda}, NumPy {np.__version__})") from None


def make_backend(name="auto", *, seed=0, kernel_table=None, log=None):
    """Builds the backend called ``name`` (``numpy``, ``cupy``, ``auto`` or ``array_api_strict``).

    ``kernel_table`` overrides the default kernels (``cpu`` on NumPy, ``cuda`` on CuPy,
    ``reference`` under array_api_strict); ``log`` receives the line saying what ``auto`` chose.
    """
    rng = np.random.default_rng(seed)
    if name == "auto":
        usable, why = cupy_status()
        if usable:
            try:
                gpu = make_backend("cupy", seed=seed, kernel_table=kernel_table)
            except VaecoreError as e:
                usable, why = False, str(e)
        if log is not None:
            log(f"backend auto: using {'cupy' if usable else 'numpy'}" + ("" if usable else f" ({why})"))
        if usable:
            return gpu
        name = "numpy"
    if name == "numpy":
        return Backend("numpy", np, kernels.kernel_table(kernel_table or "cpu"), rng=rng)
    if name == "cupy":
        usable, reason = cupy_status()
        if not usable:
            raise VaecoreError(f"--backend cupy: {reason}; use --backend numpy or auto")
        import cupy

        try:
            table = kernels.kernel_table(kernel_table or "cuda")
        except RuntimeError as e:   # Numba's CUDA target missing or not matching CuPy's CUDA
            raise VaecoreError(f"--backend cupy: {e}") from None
        if table.name == "cuda":
            _probe_cuda_kernels(table, cupy)
        return Backend("cupy", cupy, table, rng=rng)
    if name == "array_api_strict":
        import array_api_strict

        return Backend("array_api_strict", array_api_strict, kernels.kernel_table(kernel_table or "reference"),
                       device=array_api_strict.Device("device1"), rng=rng)
    raise VaecoreError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")

