"""Adam over one flat parameter buffer.

All weights of a model are views into one contiguous 1-D array, so one call updates everything.
``step`` is the 1-based step count used for bias correction. Optional global-norm clipping scales the
whole gradient by ``min(1, clip_norm / (||g|| + 1e-6))`` first; weight decay is decoupled (AdamW)::

    g      = g * clip_scale
    m      = b1 * m + (1 - b1) * g
    v      = b2 * v + (1 - b2) * g**2
    p     -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps) + lr * weight_decay * p

Returns the gradient's global norm before clipping (a float), which the trainer uses to notice
NaN or Inf without another pass over the gradients. ``grads`` is not modified.

``blocks`` (optional) says how the buffer is laid out: an int64 array of rows ``(offset, n_in, n_out)``,
one per layer, each an ``(n_in + 1, n_out)`` block ``[W; b]`` starting at ``offset``, together tiling
the buffer. The update is element-wise, so this changes no result; the CPU kernel uses it to give
each thread the same rows of every layer that the small-batch gradient kernels gave it, so a core
updates what it has just written (see ``kernels.cpu.adam_step_cpu``). The other kernels ignore it.
"""

import math

from .matmul import matmul_reference
from .namespace import array_namespace


def adam_step_reference(params, grads, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.0, clip_norm=0.0, blocks=None):
    xp = array_namespace(params)
    norm = float(xp.sqrt(xp.sum(grads * grads)))
    scale = min(1.0, clip_norm / (norm + 1e-6)) if clip_norm > 0 else 1.0
    m[...] = beta1 * m + ((1.0 - beta1) * scale) * grads
    v[...] = beta2 * v + ((1.0 - beta2) * scale * scale) * (grads * grads)
    step_size = lr / (1.0 - beta1 ** step)
    root_correction = math.sqrt(1.0 - beta2 ** step)
    params[...] = params - step_size * m / (xp.sqrt(v) / root_correction + eps) - (lr * weight_decay) * params
    return norm


# -- one layer's gradients and update in one call ----------------------------------------------------
# ``layer_backward_adam(x, delta, params, grads, m, v, block, dx_out, step, lr, beta1, beta2, eps,
# weight_decay)`` finishes one layer's backward pass and updates it, for the engine's layer-by-layer
# path (``vaecore.optim.LayerUpdates``). ``block`` is the layer's ``(offset, n_in, n_out)`` row of the
# model's ``param_blocks``, so ``W`` is ``params[offset:offset + n_in * n_out]`` as (n_in, n_out) and its
# bias the ``n_out`` elements after it; ``x`` (B, n_in) is the layer's input and ``delta`` (B, n_out) the
# gradient of its pre-activation, whose column sums (the bias gradient) are already in ``grads``::
#
#     dW     = x.T @ delta
#     dx_out = delta @ W.T                        (W before the update; skipped when dx_out is None)
#     Adam step ``step`` on the [W; b] block      (no clipping: that needs every layer's gradient first)
#
# It returns the block's sum of squared gradients, so the caller can report the global norm. The W part
# of ``grads`` is the kernel's scratch: the reference leaves dW there, as the plain backward does, but a
# table may never store it (the CPU table's small-batch kernel computes each weight's gradient in
# registers and updates the weight at once), so nothing may read it after the call.
# ``fuses_layer_adam(batch_size)`` says whether a table's version is worth calling instead of the plain
# backward and one ``adam_step``: where it is only this composition, it is not. The cpu and cuda tables
# also take ``step`` as a one-element float64 array that the kernel reads when it runs, so that a step
# recorded once (vaecore/cpu_replay.py, vaecore/cuda_graph.py) replays with each step's count.


def layer_backward_adam_composed(matmul, adam_step, x, delta, params, grads, m, v, block, dx_out, step, lr,
                                 beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """The contract spelled with a table's ``matmul`` and ``adam_step``."""
    offset, n_in, n_out = block
    w_end, end = offset + n_in * n_out, offset + (n_in + 1) * n_out
    matmul(x.T, delta, _matrix(grads[offset:w_end], n_in, n_out))
    if dx_out is not None:
        matmul(delta, _matrix(params[offset:w_end], n_in, n_out).T, dx_out)
    norm = adam_step(params[offset:end], grads[offset:end], m[offset:end], v[offset:end], step, lr, beta1,
                     beta2, eps, weight_decay)
    return norm * norm


def _matrix(flat, n_in, n_out):
    """An (n_in, n_out) view of a contiguous slice."""
    return array_namespace(flat).reshape(flat, (n_in, n_out))


def layer_backward_adam_reference(x, delta, params, grads, m, v, block, dx_out, step, lr, beta1=0.9, beta2=0.999,
                                  eps=1e-8, weight_decay=0.0):
    return layer_backward_adam_composed(matmul_reference, adam_step_reference, x, delta, params, grads, m, v,
                                        block, dx_out, step, lr, beta1, beta2, eps, weight_decay)


def fuses_layer_adam_reference(batch_size):
    return False
