"""The NumPy training step: its kernel launches recorded once per batch size, then replayed.

Why: at a batch of a few images a CPU step is about 15 Numba launches of 1-45 us each, and the Python
around them (the kernel wrappers' argument checks and choices of a way, the model's loops) took 40 us of
a 205 us seed-b4 step. Step after step the calls are the same, on the same arrays; only the batch, the
noise, Adam's step count and the KL weight change. Larger batches replay too (their launches split the
products over one-thread OpenBLAS calls), where the Python is a smaller share.

How a step runs (:meth:`ReplayedStep.__call__`), once the trainer has written the batch's pixels and
the noise into the workspace (the batch is the caller's array, so that part is not recorded):

* Adam's step count and the KL weight (times the batch's 1/B) go into ``knobs``, a float64 array whose
  one-element views the kernels read when they run (``kernels.cpu._launch``).
* The first step at a batch size runs the model's loss and backward, each layer updated as its gradient
  is known, while ``kernels.cpu.recording`` logs the launches, through a copy of the kernel table that
  notes which launches each call made. The log is kept only if each call's launches are the whole of
  that call (``Launch.whole``) and the call returned what its launch returned: then replaying them is
  the step, bit for bit. Otherwise (a product NumPy makes, a Gaussian likelihood whose wrapper finishes
  its sum in Python) that batch size takes the trainer's eager step from then on, and ``refused`` says
  why.
* A replay returns the likelihood's and the KL's sums and the gradient norm, the layers' squared sums
  added in the eager step's order.

Every array operation of the step must go through the kernel table: one done outside it would run once,
while recording, and never again (``tests/test_cpu_replay.py`` compares replays with eager steps). The
launches use the recording thread's scratch buffers, so another thread records its own; so does a change
to Adam's settings, which the launches hold, to the backend's kernel table, or to Numba's thread count
(a split product's parts are cut for it).
"""

import dataclasses
import math
import threading

import numpy as np

LIKELIHOODS = ("bernoulli_nll_grad", "gaussian_nll_grad", "gaussian_learned_nll_grad")
# a table call made of other calls' launches, as kernels.bias_act.linear_act_composed makes it
COMPOSED = {"linear_act": ("matmul", "bias_act")}


class ReplayedStep:
    """One ELBO training step (images in, Adam applied) on the NumPy backend with the ``cpu`` kernel
    table and each layer updated in the backward pass (``updates``, a :class:`vaecore.optim.LayerUpdates`);
    returns (rec_sum, kl_sum, grad_norm)."""

    def __init__(self, model, optimizer, updates):
        import kernels.cpu
        from kernels.blas_pool import thread_count

        self._cpu, self._threads = kernels.cpu, thread_count
        self.model, self.optimizer, self.updates = model, optimizer, updates
        self.knobs = np.zeros(2)                   # [Adam's step count, KL weight / batch size]
        self._count, self._kl = self.knobs[0:1], self.knobs[1:2]
        self._recorded = {}                        # batch size -> _Recording
        self.refused = {}                          # batch size -> why its step is not replayed

    def handles(self, batch_size):
        """Whether this step is the trainer's at ``batch_size``: the layers are updated in the backward
        pass there, and a recording has not been refused."""
        return batch_size not in self.refused and self.model.backend.kernels.fuses_layer_adam(batch_size)

    def replays(self, batch_size):
        """Whether steps at ``batch_size`` are replayed now (one has been recorded and kept)."""
        return batch_size in self._recorded

    def __call__(self, ws, scale, kl_weight):
        """The step on the pixels and noise already in ``ws``."""
        backend, optimizer = self.model.backend, self.optimizer
        optimizer.t += 1
        self.knobs[0], self.knobs[1] = optimizer.t, kl_weight * scale
        key = (threading.get_ident(), self._threads(), backend.kernels, optimizer.lr, optimizer.beta1,
               optimizer.beta2, optimizer.eps, optimizer.weight_decay)
        recording = self._recorded.get(ws.batch_size)
        if recording is not None and recording.key == key:
            return recording.replay(self._cpu.replay)
        return self._record(ws, scale, key)

    def _record(self, ws, scale, key):
        """The step, eagerly, with its launches logged; keeps the log where replaying it is the step."""
        model, updates = self.model, self.updates
        backend, table = model.backend, model.backend.kernels
        calls = []
        with self._cpu.recording() as log:
            backend.kernels = _noting(table, calls, log)
            try:
                rec, kl = model.loss(ws, grad_scale=scale)
                updates.start(count=self._count)
                model.backward(ws, kl_weight=self._kl, grad_scale=1.0, update=updates)
            finally:
                backend.kernels = table
        why = _unreplayable(calls, len(log))
        if why is None:
            recording = _Recording(key, self._cpu.replayable(launch for launch, _ in log), calls)
            why = recording.unlike(log, rec, kl)
        if why is None:
            self._recorded[ws.batch_size] = recording
        else:
            self._recorded.pop(ws.batch_size, None)
            self.refused[ws.batch_size] = why
        return rec, kl, updates.norm()


class _Recording:
    """A batch size's launches (``kernels.cpu.replayable``), and where in them the step's results are."""

    def __init__(self, key, launches, calls):
        self.key, self.launches = key, launches
        self.results = [None] * len(launches.launches)
        last, at = [], -1                          # each call's result is its last launch's
        for name, made, _ in calls:
            at += len(made)
            last.append((name, at))
        self.rec_at = [i for name, i in last if name in LIKELIHOODS]
        self.kl_at = [i for name, i in last if name == "reparameterize_kl"]
        self.squares_at = [i for name, i in last if name == "layer_backward_adam"]

    def unlike(self, log, rec, kl):
        """Why these launches' results would not be the step's (None when they are)."""
        if len(self.rec_at) != 1 or len(self.kl_at) != 1:
            return "the step is not one likelihood and one KL term"
        if log[self.rec_at[0]][1] is not rec or log[self.kl_at[0]][1] is not kl:
            return "the loss's sums are not its launches' results"
        return None

    def replay(self, run):
        results = self.results
        run(self.launches, results)
        squares = 0.0                              # as LayerUpdates adds them: the same bits
        for i in self.squares_at:
            squares += results[i]
        return results[self.rec_at[0]], results[self.kl_at[0]], math.sqrt(squares)


def _noting(table, calls, log):
    """``table`` whose calls each append (name, the launches it logged, its result) to ``calls``."""
    def noted(name, function):
        def call(*args, **kwargs):
            start = len(log)
            result = function(*args, **kwargs)
            calls.append((name, log[start:], result))
            return result
        return call

    return dataclasses.replace(table, **{field.name: noted(field.name, getattr(table, field.name))
                                         for field in dataclasses.fields(table)
                                         if field.name not in ("name", "fuses_layer_adam")})


def _unreplayable(calls, n_logged):
    """Why replaying the logged launches would not repeat these table calls (None when it would)."""
    for name, made, result in calls:
        if any(launch is None for launch, _ in made):
            return f"{name}: {next(why for launch, why in made if launch is None)}"
        if tuple(launch.whole for launch, _ in made) not in ((name,), COMPOSED.get(name)):
            return f"{name} does work here that is not one of its launches"
        if result is not made[-1][1]:
            return f"{name} returns more than its launch's result"
    if sum(len(made) for _, made, _ in calls) != n_logged:
        return "a launch outside the kernel table's calls"
    return None
