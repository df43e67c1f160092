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


def adam_step_reference(params, grads, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.0, clip_norm=0.0, blocks=None):
    xp = params.__array_namespace__()
    norm = float(xp.sqrt(xp.sum(grads * grads)))
    scale = min(1.0, clip_norm / (norm + 1e-6)) if clip_norm > 0 else 1.0
    m[...] = beta1 * m + ((1.0 - beta1) * scale) * grads
    v[...] = beta2 * v + ((1.0 - beta2) * scale * scale) * (grads * grads)
    step_size = lr / (1.0 - beta1 ** step)
    root_correction = math.sqrt(1.0 - beta2 ** step)
    params[...] = params - step_size * m / (xp.sqrt(v) / root_correction + eps) - (lr * weight_decay) * params
    return norm
