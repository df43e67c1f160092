"""Every CUDA kernel compiles to PTX for recent GPUs, without a GPU.

The CUDA simulator runs kernels as Python and checks no types, so a kernel that only the real compiler
would reject (a float64 slipping into a shared array, an unsupported call) passes there. This module
compiles each kernel with the argument types the engine passes, through NVVM from the ``numba-cuda[cu12]``
wheels (``nvidia-cuda-nvcc-cu12`` / ``nvidia-cuda-nvrtc-cu12``). It needs the real ``numba.cuda``, so
under ``NUMBA_ENABLE_CUDASIM=1`` it re-runs itself in a child process without that variable.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                                reason="numba-cuda is not installed (the 'dev' or 'cuda' extra)")


@pytest.mark.skipif(not SIMULATED, reason="runs in this process")
def test_ptx_compilation_outside_the_simulator():
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]


def _kernels():
    if SIMULATED:
        return []
    from numba.cuda.dispatcher import CUDADispatcher

    from kernels import cuda as cuda_kernels

    found = {name for name, obj in vars(cuda_kernels).items()
             if isinstance(obj, CUDADispatcher) and not obj.targetoptions.get("device")}
    return sorted(found)


def test_every_kernel_has_a_ptx_signature():
    if SIMULATED:
        pytest.skip("checked in the child process")
    from kernels import cuda as cuda_kernels

    assert set(_kernels()) == set(cuda_kernels.KERNEL_SIGNATURES)


@pytest.mark.parametrize("cc", [(8, 0), (9, 0)], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("name", _kernels())
def test_kernel_compiles_to_ptx(name, cc):
    from numba import cuda

    from kernels import cuda as cuda_kernels

    kernel = getattr(cuda_kernels, name)
    ptx, return_type = cuda.compile_ptx(kernel.py_func, cuda_kernels.KERNEL_SIGNATURES[name], cc=cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ".entry" in ptx
