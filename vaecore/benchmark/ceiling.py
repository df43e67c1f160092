"""The machine's float32 matmul rate on one training step's own matmul shapes: the ceiling.

A step that does its matmuls with BLAS can be no faster than those matmuls alone. :class:`MatmulCeiling`
holds operands laid out as the engine's are (``x.T`` and ``W.T`` are transposed views, not copies)
and runs every matmul of one step back to back with ``matmul(a, b, out=c)`` (NumPy's BLAS, always);
its time is the step's matmul work at the BLAS rate, and ``ceiling time / our step time`` is the share
of the ceiling our step reaches (1.0 would mean everything but the matmuls is free). At a batch of at
most ``kernels.config.CPU_SMALL_BATCH`` the engine does not use BLAS for its matmuls, and the share may
pass 1.0: the small-batch kernels beat BLAS at those shapes.
"""

import numpy as np

from .configs import BenchConfig, step_matmul_flops, step_matmul_shapes


class MatmulCeiling:
    name = "matmul-ceiling"

    def __init__(self, config: BenchConfig, xp=np, synchronize=None, seed=0):
        self.config = config
        self.xp = xp
        self.synchronize = synchronize
        self.shapes = step_matmul_shapes(config)
        self.flops = step_matmul_flops(config)
        rng = np.random.default_rng(seed)
        self.operands = []
        for s in self.shapes:
            a = rng.standard_normal((s.k, s.m) if s.a_transposed else (s.m, s.k), dtype=np.float32)
            b = rng.standard_normal((s.n, s.k) if s.b_transposed else (s.k, s.n), dtype=np.float32)
            a, b = xp.asarray(a), xp.asarray(b)
            self.operands.append((a.T if s.a_transposed else a, b.T if s.b_transposed else b,
                                  xp.empty((s.m, s.n), dtype=xp.float32)))

    def step(self):
        """Every matmul of one step, in the engine's order."""
        matmul = self.xp.matmul
        for a, b, c in self.operands:
            matmul(a, b, out=c)
        if self.synchronize is not None:
            self.synchronize()

    __call__ = step

    def gflops(self, seconds_per_step):
        return self.flops / seconds_per_step / 1e9

    def describe(self):
        return f"{len(self.shapes)} matmuls, {self.flops / 1e9:.3f} GFLOP per step"
