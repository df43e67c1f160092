"""The CuPy training step as a CUDA graph: recorded once per batch size, then replayed.

Why: on a GPU our step waited on the host, not the device. Launched one at a time, its 13 Numba kernels
(tens of microseconds of argument handling each) and 11 cuBLAS calls took about 2 ms a step at every
benchmark configuration on an H200, whose device work is 0.1-0.5 ms. A recorded graph runs them all
with one launch.

How a step runs (:meth:`GraphedStep.__call__`):

* On a stream of its own, after the work already queued on the caller's stream; the caller's stream then
  waits for it, so whatever reads the results or the weights afterwards sees them.
* The batch is copied into its staging buffer (its conversion to float is in the graph) and the noise
  into the workspace. Adam's step count and the KL weight, the only scalars that change between steps,
  are copied into ``knobs``, a device array the kernels read when they run (see :mod:`kernels.cuda`).
* The first step at a batch size runs eagerly under a memory pool of its own: it compiles what needs
  compiling and leaves that pool holding a block for every allocation the step makes. The second step
  is recorded under the same pool (``Stream.begin_capture``) and launched; later steps only launch.
  Nothing else allocates from that pool, so the blocks the graph writes stay its own while it lives,
  and a warm step allocates nothing. The matrix products can be recorded because they call cuBLAS
  directly (:mod:`kernels.cublas`): CuPy's matmul refuses to run while a stream records.
* The sums and the gradient norm returned are the graph's own 0-d arrays, which the next launch
  overwrites: read them before the next step (the trainer does, every step).

If recording fails, the step runs eagerly from then on (with the same knobs) and ``disabled`` says why.
"""

import warnings

import numpy as np

from .errors import reason


class GraphedStep:
    """One ELBO training step (images in, Adam applied) for a model on the CuPy backend with the
    ``cuda`` kernel table; returns (rec_sum, kl_sum, grad_norm) as 0-d device arrays."""

    def __init__(self, model, optimizer):
        import cupy

        self._cupy = cupy
        self.model, self.optimizer = model, optimizer
        self.stream = cupy.cuda.Stream()           # blocking: ordered with the legacy default stream too
        self._queued = cupy.cuda.Event(disable_timing=True)   # the caller's work so far
        self._done = cupy.cuda.Event(disable_timing=True)     # this step's work
        self._knobs_host = np.zeros(2)             # [Adam's step count, KL weight]
        self._knobs = cupy.zeros(2, dtype=cupy.float64)
        self._recorded = {}                        # batch size -> _Recording
        self.disabled = None                       # why recording failed, once it has

    def __call__(self, ws, batch, scale, kl_weight):
        backend, optimizer = self.model.backend, self.optimizer
        caller = self._cupy.cuda.get_current_stream()
        caller.record(self._queued)
        self.stream.wait_event(self._queued)
        with self.stream:
            images = backend.stage_images(batch)
            backend.normal_into(ws.eps, ws.eps_host)
            optimizer.t += 1
            self._knobs_host[0], self._knobs_host[1] = optimizer.t, kl_weight
            self._knobs.set(self._knobs_host)
            results = self._run(ws, images, scale)
            self.stream.record(self._done)
        caller.wait_event(self._done)
        return results

    def _step(self, ws, images, scale):
        """The step's device work; the scalars that change between steps come from ``knobs``."""
        model = self.model
        model.backend.kernels.pixels(images, ws.x)
        rec, kl = model.loss(ws, grad_scale=scale)
        model.backward(ws, kl_weight=self._knobs[1:2], grad_scale=scale)
        norm = self.optimizer.step(model.params, model.grads, model.param_blocks, count=self._knobs[0:1])
        return rec, kl, norm

    def _run(self, ws, images, scale):
        if self.disabled is not None:
            return self._step(ws, images, scale)
        recording = self._recorded.get(ws.batch_size)
        if recording is None:                      # the first step at this size: eager, filling the pool
            recording = self._recorded[ws.batch_size] = _Recording(self._cupy.cuda.MemoryPool())
            with self._cupy.cuda.using_allocator(recording.pool.malloc):
                return self._step(ws, images, scale)
        if recording.graph is None:
            try:
                recording.record(self._cupy, self.stream, lambda: self._step(ws, images, scale))
            except Exception as e:                 # an unrecordable call somewhere in the step
                self.disabled = f"{type(e).__name__}: {reason(e)}"
                warnings.warn(f"CUDA graphs are off, each step launches its kernels one by one: recording "
                              f"the step failed ({self.disabled})", RuntimeWarning, stacklevel=3)
                return self._step(ws, images, scale)
        recording.graph.launch(self.stream)
        return recording.results


class _Recording:
    """A batch size's graph, the pool its buffers come from, and the arrays it writes its results to."""

    def __init__(self, pool):
        self.pool, self.graph, self.results = pool, None, None

    def record(self, cupy, stream, step):
        with cupy.cuda.using_allocator(self.pool.malloc):
            stream.begin_capture()
            try:
                results = step()
            except BaseException:
                try:
                    stream.end_capture()           # leaves the stream usable; its own error is secondary
                except Exception:
                    pass
                raise
            self.graph = stream.end_capture()
        self.results = results
