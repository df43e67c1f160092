"""Adam whose whole state is three flat buffers and a step count.

The model's parameters and gradients are single flat arrays, so one fused kernel call per step
updates every weight; the state saves to a checkpoint as two arrays and an integer.
"""


class Adam:
    def __init__(self, backend, n_params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, clip_norm=0.0):
        self.backend = backend
        self.m = backend.zeros((n_params,))
        self.v = backend.zeros((n_params,))
        self.t = 0
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.weight_decay, self.clip_norm = weight_decay, clip_norm

    def step(self, params, grads, blocks=None):
        """Updates ``params`` in place; returns the gradient norm before clipping. ``blocks``, the
        model's ``param_blocks``, only tells the CPU kernel how to share the work among threads."""
        self.t += 1
        return self.backend.kernels.adam_step(params, grads, self.m, self.v, self.t, self.lr, self.beta1,
                                              self.beta2, self.eps, self.weight_decay, self.clip_norm, blocks)
