"""Kernels loaded from Numba's on-disk cache give the bits of kernels compiled in the process.

A resumed run loads what the first run compiled; where an expression has two products added, LLVM
fused either one into an FMA, and the cached code had fused the other (Adam's second moment: a bit
apart in 68k of 314k elements after one update). ``kernels.cpu._fma32`` writes those out."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# one small-batch fused update (its own kernel, batch 4) and one split one (batch 32), with dx
SCRIPT = r"""
import hashlib, numpy as np
from kernels import cpu
rng = np.random.default_rng(0)
digest = hashlib.sha1()
for batch in (4, 32):
    x = rng.standard_normal((batch, 300), dtype=np.float32)
    d = rng.standard_normal((batch, 200), dtype=np.float32)
    n = 301 * 200
    state = [rng.standard_normal(n, dtype=np.float32), np.zeros(n, np.float32),
             np.abs(rng.standard_normal(n, dtype=np.float32)) * 0.01, np.abs(rng.standard_normal(n, dtype=np.float32)) * 0.01]
    dx = np.empty_like(x)
    cpu.layer_backward_adam_cpu(x, d, *state, (0, 300, 200), dx, 3, 1e-3)
    for a in (state[0], state[2], state[3], dx):
        digest.update(a.tobytes())
from numba.core.registry import CPUDispatcher
kernels = [f for f in vars(cpu).values() if isinstance(f, CPUDispatcher)]
print(digest.hexdigest(), *(sum(sum(getattr(f.stats, kind).values()) for f in kernels)
                            for kind in ("cache_hits", "cache_misses")))
"""


def _run(cache_dir):
    """(digest of the results, kernels loaded from the cache, kernels compiled) of one process."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT))
    digest, hits, misses = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                                          text=True, timeout=600, check=True).stdout.split()
    return digest, int(hits), int(misses)


def test_cached_kernels_give_the_bits_of_fresh_ones(tmp_path):
    """Whichever way the update goes here (its own kernel on a fast pool, else the plain kernels)."""
    fresh, fresh_hits, fresh_misses = _run(tmp_path)
    cached, cached_hits, cached_misses = _run(tmp_path)
    assert fresh_hits == 0 and fresh_misses > 0          # compiled,
    assert cached_hits > 0 and cached_misses == 0        # then loaded from the cache
    assert fresh == cached
