"""Adam whose whole state is three flat buffers and a step count.

The model's parameters and gradients are single flat arrays, so one fused kernel call per step
updates every weight; the state saves to a checkpoint as two arrays and an integer. Where the kernel
table fuses a layer's gradients with its update (``fuses_layer_adam``: the CPU table, in its own
kernels at a batch of a few images and in its split BLAS products above that), :class:`LayerUpdates`
updates each layer inside the backward pass instead, while its weights and gradients are still in
cache: the same update, bit for bit on the project's benchmark configurations.
"""

import math


class Adam:
    def __init__(self, backend, n_params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, clip_norm=0.0):
        self.backend = backend
        self.m = backend.zeros((n_params,))
        self.v = backend.zeros((n_params,))
        self.t = 0
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.weight_decay, self.clip_norm = weight_decay, clip_norm

    def layer_updates(self, params, grads, blocks):
        """A :class:`LayerUpdates` for these buffers, or None with clipping: then no layer can be updated
        before every gradient is known."""
        if self.clip_norm > 0:
            return None
        return LayerUpdates(self, params, grads, blocks)

    def step(self, params, grads, blocks=None, count=None):
        """Updates ``params`` in place; returns the gradient norm before clipping. ``blocks``, the
        model's ``param_blocks``, only tells the CPU kernel how to share the work among threads.

        ``count``: where the step count comes from. None advances ``t`` and passes it; a recorded CUDA
        graph passes a device array that it fills with ``t`` before each replay (and advances ``t``)."""
        if count is None:
            self.t += 1
            count = self.t
        return self.backend.kernels.adam_step(params, grads, self.m, self.v, count, self.lr, self.beta1,
                                              self.beta2, self.eps, self.weight_decay, self.clip_norm, blocks)


class LayerUpdates:
    """``model.backward(..., update=this)`` after ``start()``: each layer's weight and data gradients and
    its Adam update in one kernel call (``layer_backward_adam``); ``norm()`` is then the step's gradient
    norm. Made once per trainer: a step allocates nothing."""

    def __init__(self, adam, params, grads, blocks):
        self.adam, self.params, self.grads = adam, params, grads
        self.blocks = [tuple(row) for row in blocks.tolist()]
        self.squares = 0.0
        self.count = 0

    def start(self, count=None):
        """``count`` as in :meth:`Adam.step`: None advances ``t`` and passes it; a replayed CPU step
        (vaecore/cpu_replay.py) passes a one-element float64 array it fills with ``t`` itself."""
        if count is None:
            self.adam.t += 1
            count = self.adam.t
        self.count = count
        self.squares = 0.0

    def __call__(self, layer, x, delta, dx_out):
        a = self.adam
        self.squares += a.backend.kernels.layer_backward_adam(x, delta, self.params, self.grads, a.m, a.v,
                                                              self.blocks[layer], dx_out, self.count, a.lr,
                                                              a.beta1, a.beta2, a.eps, a.weight_decay)

    def norm(self):
        return math.sqrt(self.squares)
