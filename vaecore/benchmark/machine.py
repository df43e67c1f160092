"""What a speed figure depends on: the CPU, the BLAS kernel that actually runs, threads, versions."""

import importlib
import os
import platform
import textwrap
from importlib import metadata

# set on the project's development machines to hold old OpenBLAS builds to safe kernels; with a
# current NumPy they select older, slower matmul kernels than the CPU supports
OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
UNSET_COMMAND = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE"


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux) with its family and model numbers (a name like
    "AMD EPYC" alone does not say which generation), else what ``platform`` knows."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def cores():
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def blas_pools():
    """threadpoolctl's view of the loaded BLAS / OpenMP libraries: what ran, not what was built."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return threadpool_info()


def numpy_blas():
    """The pool of NumPy's own BLAS (the one ``np.matmul`` calls), or None."""
    importlib.import_module("numpy")          # loaded, so threadpoolctl sees its BLAS

    for pool in blas_pools():
        if pool.get("user_api") == "blas" and "numpy" in pool.get("filepath", ""):
            return pool
    blas = [p for p in blas_pools() if p.get("user_api") == "blas"]
    return blas[0] if blas else None


def describe_pool(pool):
    if pool is None:
        return "unknown (threadpoolctl not installed)"
    arch = f", {pool['architecture']} kernels" if pool.get("architecture") else ""
    layer = f", {pool['threading_layer']}" if pool.get("threading_layer") else ""
    return (f"{pool.get('internal_api')} {pool.get('version') or ''}{arch}, {pool.get('num_threads')} threads"
            f"{layer}").replace("  ", " ")


def version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


CUPY_PACKAGES = ("cupy-cuda12x", "cupy-cuda13x", "numba-cuda")


def versions():
    """{package: version or None}, read from the installed metadata (imports nothing)."""
    return {name: version(name) for name in ("vaecore", "numpy", "numba", "torch", "jax", "jaxlib", *CUPY_PACKAGES,
                                             "threadpoolctl", "pytest-benchmark")}


def numba_threads():
    import numba

    return numba.config.NUMBA_NUM_THREADS


def overrides_set():
    """{name: value} of the OpenBLAS overrides present in the environment."""
    return {name: os.environ[name] for name in OPENBLAS_OVERRIDES if name in os.environ}


def override_warning():
    """A paragraph when OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set, else None."""
    found = overrides_set()
    if not found:
        return None
    pool = numpy_blas()
    arch = f" (now: {pool['architecture']})" if pool and pool.get("architecture") else ""
    names = " and ".join(f"{k}={v}" for k, v in found.items())
    text = (f"warning: {names} {'are' if len(found) > 1 else 'is'} set. OPENBLAS_CORETYPE makes NumPy's "
            f"OpenBLAS use the matmul kernels of that CPU type{arch} instead of the fastest ones this CPU "
            f"supports, so ours and the matmul ceiling run slower than on a user's machine (PyTorch and JAX "
            f"bring their own BLAS and are not affected). Measure as users' machines run by unsetting them "
            f"for this command alone:")
    return textwrap.fill(text, 100) + f"\n    {UNSET_COMMAND} python cli.py bench"


class OtherLoad:
    """How many cores *other* processes kept busy between :meth:`start` and :meth:`stop`: the machine's
    busy CPU time (``/proc/stat``) minus this process's own (``getrusage``), over the wall time. The
    load average cannot tell: a benchmark's own threads count in it. None where /proc is missing."""

    def __init__(self):
        self._start = None

    @staticmethod
    def _sample():
        import resource
        import time

        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks       # all but idle and iowait
        own = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy, own.ru_utime + own.ru_stime

    def start(self):
        self._start = self._sample()
        return self

    def stop(self):
        """Average cores used by other processes since :meth:`start` (None if unknown)."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = end[0] - self._start[0]
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return max(0.0, others / wall) if wall > 0 else None


def load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def summary():
    """A dict of everything above, for RESULTS.md and pytest-benchmark's machine_info."""
    pool = numpy_blas()
    return {"cpu": cpu_model(), "cores": cores(), "python": platform.python_version(),
            "numpy_blas": describe_pool(pool), "blas_architecture": pool.get("architecture") if pool else None,
            "threadpool_info": blas_pools(), "versions": versions(), "openblas_overrides": overrides_set(),
            "numba_num_threads": numba_threads(), "load_average": load_average()}
