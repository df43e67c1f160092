"""Speed of the training step against the same network in PyTorch and JAX, and against the matmul ceiling.

One module per thing measured, shared by the pytest-benchmark suite (``benchmarks/test_step_bench.py``)
and ``vaecore bench``:

- :mod:`.configs`          the three named configurations, the step's matmul shapes and FLOPs;
- :mod:`.ours`             our step: the engine's ``Trainer.train_step`` on NumPy or CuPy;
- :mod:`.torch_reference`  the network in PyTorch (eager, ``torch.optim.Adam``), on the CPU or a GPU;
- :mod:`.jax_reference`    the network in JAX (one ``jax.jit`` step including Adam), on the CPU or a GPU;
- :mod:`.ceiling`          the step's matmuls alone at this machine's BLAS (or cuBLAS) rate;
- :mod:`.timing`           the interleaved timer ``vaecore bench`` uses;
- :mod:`.machine`          CPU, BLAS kernel and threads, library versions, environment warnings;
- :mod:`.report`           the comparison ``vaecore bench`` runs, and its table.

PyTorch and JAX are never dependencies: they are imported only when their step is built, and a missing
one is reported with the reason (:class:`Unavailable`).
"""

from ..errors import VaecoreError
from .configs import CONFIGS, BenchConfig, config_by_name, step_matmul_flops, step_matmul_shapes

# names of the implementations, as they appear in benchmark ids (``test_step[example-b128-torch]``)
IMPLEMENTATIONS = ("ours-numpy", "ours-cupy", "torch", "jax", "torch-cuda", "jax-gpu", "matmul-ceiling",
                   "matmul-ceiling-cupy")
REFERENCES = ("torch", "jax")
# per backend of ours: the reference implementations on the same device, and its matmul ceiling
REFERENCES_ON = {"numpy": {"torch": "torch", "jax": "jax"}, "cupy": {"torch": "torch-cuda", "jax": "jax-gpu"}}
CEILING_ON = {"numpy": "matmul-ceiling", "cupy": "matmul-ceiling-cupy"}


class Unavailable(VaecoreError):
    """An implementation cannot run here; ``str(e)`` says why and how to make it run."""


def implementation_status(impl):
    """(usable, detail) of one implementation on this machine, without building anything."""
    if impl == "ours-numpy" or impl == "matmul-ceiling":
        return True, "numpy"
    if impl in ("ours-cupy", "matmul-ceiling-cupy"):
        from ..backend import cupy_status

        return cupy_status()
    if impl in ("torch", "torch-cuda"):
        from . import torch_reference

        return torch_reference.status() if impl == "torch" else torch_reference.cuda_status()
    if impl in ("jax", "jax-gpu"):
        from . import jax_reference

        return jax_reference.status() if impl == "jax" else jax_reference.gpu_status()
    raise ValueError(f"unknown implementation {impl!r}; expected one of {', '.join(IMPLEMENTATIONS)}")


def make_step(impl, config, seed=0):
    """A callable running one training step of ``config`` (a name or :class:`BenchConfig`) with
    ``impl``, warmed up by nothing yet; raises :class:`Unavailable` with the reason when it cannot run."""
    config = config_by_name(config) if isinstance(config, str) else config
    usable, detail = implementation_status(impl)
    if not usable:
        raise Unavailable(detail)
    if impl.startswith("ours-"):
        from .ours import OurStep

        return OurStep(config, backend=impl.split("-", 1)[1], seed=seed)
    if impl in ("torch", "torch-cuda"):
        from .torch_reference import TorchStep

        return TorchStep(config, seed=seed, device="cpu" if impl == "torch" else "cuda")
    if impl in ("jax", "jax-gpu"):
        from .jax_reference import JaxStep

        return JaxStep(config, seed=seed, platform="cpu" if impl == "jax" else "gpu")
    from .ceiling import MatmulCeiling

    if impl == "matmul-ceiling-cupy":
        import cupy

        return MatmulCeiling(config, xp=cupy, synchronize=lambda: cupy.cuda.get_current_stream().synchronize())
    return MatmulCeiling(config)


__all__ = ["CEILING_ON", "CONFIGS", "IMPLEMENTATIONS", "REFERENCES", "REFERENCES_ON", "BenchConfig", "Unavailable",
           "config_by_name", "implementation_status", "make_step", "step_matmul_flops", "step_matmul_shapes"]
