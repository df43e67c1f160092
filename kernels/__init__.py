"""Fused compute kernels behind one contract, with several implementations.

A :class:`KernelTable` names every kernel the training step calls. ``reference`` holds plain array
code that runs on any array-API namespace (NumPy, CuPy, array_api_strict) and is the test oracle;
``cpu`` (Numba ``@njit``) and ``cuda`` (Numba CUDA on CuPy arrays) provide the same signatures.
Each kernel's maths and shapes are documented once, in its module.

This package never imports ``vaecore``.
"""

from dataclasses import dataclass
from typing import Callable

from .adam import adam_step_reference, fuses_layer_adam_reference, layer_backward_adam_reference
from .bias_act import ACTIVATIONS, bias_act_backward_reference, bias_act_reference, linear_act_reference
from .likelihood import (
    bernoulli_nll_grad_reference,
    gaussian_learned_nll_grad_reference,
    gaussian_nll_grad_reference,
)
from .matmul import matmul_reference
from .pixels import pixels_reference
from .reparam_kl import reparameterize_kl_backward_reference, reparameterize_kl_reference


@dataclass(frozen=True)
class KernelTable:
    name: str
    reparameterize_kl: Callable          # (stats, eps, z_out) -> kl_sum
    reparameterize_kl_backward: Callable  # (stats, eps, dz, kl_weight, dstats_out) -> None
    bernoulli_nll_grad: Callable         # (logits, x, grad_scale, dlogits_out) -> nll_sum
    gaussian_nll_grad: Callable          # (mean, x, logvar: float, grad_scale, dmean_out) -> nll_sum
    gaussian_learned_nll_grad: Callable  # (out, x, grad_scale, dout_out) -> nll_sum
    adam_step: Callable                  # (params, grads, m, v, step, lr, beta1, beta2, eps, weight_decay, clip_norm, blocks) -> grad_norm
    matmul: Callable                     # (a, b, out) -> None, out[...] = a @ b
    bias_act: Callable                   # (h, bias, activation) -> None, in place
    bias_act_backward: Callable          # (dy, y, activation, dpre_out, dbias_out) -> None
    linear_act: Callable                 # (x, W, bias, activation, out) -> None, out[...] = act(x @ W + bias)
    # (x, delta, params, grads, m, v, block, dx_out, step, lr, beta1, beta2, eps, weight_decay) -> sum of squares
    layer_backward_adam: Callable
    fuses_layer_adam: Callable           # (batch_size) -> whether to call layer_backward_adam per layer
    pixels: Callable                     # (src_uint8, out) -> None, out[...] = src / 255


REFERENCE = KernelTable(
    name="reference",
    reparameterize_kl=reparameterize_kl_reference,
    reparameterize_kl_backward=reparameterize_kl_backward_reference,
    bernoulli_nll_grad=bernoulli_nll_grad_reference,
    gaussian_nll_grad=gaussian_nll_grad_reference,
    gaussian_learned_nll_grad=gaussian_learned_nll_grad_reference,
    adam_step=adam_step_reference,
    matmul=matmul_reference,
    bias_act=bias_act_reference,
    bias_act_backward=bias_act_backward_reference,
    linear_act=linear_act_reference,
    layer_backward_adam=layer_backward_adam_reference,
    fuses_layer_adam=fuses_layer_adam_reference,
    pixels=pixels_reference,
)


_TABLES = {"reference": REFERENCE}
_KERNELS = [field for field in KernelTable.__dataclass_fields__ if field != "name"]


def _table(name: str, module, suffix: str) -> KernelTable:
    """The table whose kernel ``foo`` is ``module.foo_<suffix>``."""
    return KernelTable(name=name, **{field: getattr(module, f"{field}_{suffix}") for field in _KERNELS})


def kernel_table(name: str) -> KernelTable:
    """The table called ``name``: ``reference``, ``cpu`` or ``cuda`` (the last two compile lazily).

    ``cpu`` imports Numba's CPU kernels (compiled on first call, then loaded from the on-disk cache;
    ``kernels.cpu.warm_up()`` does that up front). ``cuda`` imports ``numba.cuda`` only now, so
    ``import kernels`` never needs CUDA; it raises ``RuntimeError`` with the reason when the CUDA
    target cannot be imported. Its kernels take CuPy arrays (NumPy arrays under Numba's CUDA simulator).
    """
    table = _TABLES.get(name)
    if table is not None:
        return table
    if name == "cpu":
        from . import cpu

        table = _table("cpu", cpu, "cpu")
    elif name == "cuda":
        try:
            from . import cuda
        except ImportError as error:  # numba-cuda or its CUDA bindings missing
            raise RuntimeError(f"the cuda kernel table needs the 'cuda' extra "
                               f"(pip install 'vaecore[cuda]'): {error}") from error
        table = _table("cuda", cuda, "cuda")
    else:
        raise ValueError(f"unknown kernel table {name!r}; expected 'reference', 'cpu' or 'cuda'")
    _TABLES[name] = table
    return table


__all__ = ["ACTIVATIONS", "KernelTable", "REFERENCE", "kernel_table"]
