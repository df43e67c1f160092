"""The full training step against the same network in PyTorch and JAX, and against its own matmuls.

Run as users' machines are -- the development machines' OpenBLAS overrides unset for this command
alone (they hold NumPy to older matmul kernels; tests and CI keep them)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python -m pytest benchmarks/test_step_bench.py \\
        --benchmark-only --benchmark-columns=median,iqr,ops,rounds --benchmark-json=step.json

``test_step[<config>-<impl>]`` times one training step (forward, backward, Adam) of each configuration
of ``DESIGN.md`` with each implementation: ``ours-numpy``, ``torch`` (eager), ``jax`` (one jitted
step) and ``matmul-ceiling``, the step's matmuls alone at this machine's BLAS rate; on a GPU also
``ours-cupy``, ``torch-cuda``, ``jax-gpu`` and ``matmul-ceiling-cupy`` (cuBLAS). Each one that cannot
run here is skipped with the reason. Groups are the configuration names. The summary at the end prints
the table ``vaecore bench`` prints, from the medians of this run. Those benchmarks run one after
another, so ``test_interleaved_comparison`` also times every implementation in interleaved rounds, as
``vaecore bench`` does, and prints that table too: on a machine whose speed changes within seconds its
ratios are the ones to quote. Also here: one MNIST training epoch, the importance-sampled evaluation's
throughput, and resident memory over a 10-epoch ``train`` (all at example-b128).

Every implementation is warmed up (Numba's cache loaded, JAX compiled, thread pools started) before
timing, and each benchmark starts after a short sleep so the previous one's spinning BLAS/OpenMP
threads have gone idle.
"""

import os
import time

import numpy as np
import pytest

from vaecore.benchmark import CEILING_ON, CONFIGS, IMPLEMENTATIONS, REFERENCES_ON, Unavailable, machine, \
    make_step, step_matmul_flops
from vaecore.benchmark.report import BUSY_CORES, ConfigResult, format_table
from vaecore.benchmark.timing import SETTLE_SECONDS, Timing, warm

STEP_CASES = [pytest.param(config, impl, id=f"{config}-{impl}") for config in CONFIGS for impl in IMPLEMENTATIONS]
EPOCH_CONFIG = "example-b128"
IS_IMAGES, IS_SAMPLES = 200, 1000          # importance-sampled NLL: test images, samples per image

_timings = {}       # (config, impl) -> Timing of this run
_extra_lines = []   # one line per epoch / evaluation / memory benchmark, for the summary
_other_load = machine.OtherLoad()


def settle():
    time.sleep(2 * SETTLE_SECONDS)


def record(benchmark, key):
    if benchmark.stats is not None:        # None under --benchmark-disable
        s = benchmark.stats.stats
        _timings[key] = Timing(s.median, s.q1, s.q3, s.rounds)
        return s
    return None


class _StepSummary:
    """Prints the comparison table from this run's medians after pytest-benchmark's tables."""

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter):
        write = terminalreporter.write_line
        for backend, on_device in REFERENCES_ON.items():
            ours_impl, results = f"ours-{backend}", []
            for config in CONFIGS:
                ours = _timings.get((config, ours_impl))
                refs = {r: _timings[(config, impl)] for r, impl in on_device.items() if (config, impl) in _timings}
                ceiling = _timings.get((config, CEILING_ON[backend]))
                if ours is not None:
                    results.append(ConfigResult(CONFIGS[config], ours_impl, ours, refs, ceiling))
            if results:
                write("")
                for line in format_table(results).splitlines():
                    write(line)
        if _extra_lines:
            write("")
            for line in _extra_lines:
                write(line)
        others = _other_load.stop()
        if others is not None:
            write("")
            write(f"other processes kept {others:.2f} cores busy on average while this module ran"
                  + (" -- figures disturbed, re-run on an idle machine" if others > BUSY_CORES else ""))


@pytest.fixture(scope="module", autouse=True)
def step_summary(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("step-bench-summary"):
        manager.register(_StepSummary(), "step-bench-summary")
        _other_load.start()


@pytest.mark.benchmark(min_rounds=10, max_time=3.0)
@pytest.mark.parametrize("config, impl", STEP_CASES)
def test_step(benchmark, config, impl):
    try:
        step = make_step(impl, config)
    except Unavailable as e:
        pytest.skip(f"{impl}: {e}")
    benchmark.group = config
    benchmark.extra_info.update(config=config, impl=impl, matmul_flops=step_matmul_flops(CONFIGS[config]))
    with np.errstate(all="ignore"):
        warm(step, 0.5)
        benchmark.extra_info["implementation"] = step.describe()     # after warming: what was recorded
        settle()
        benchmark(step)
    stats = record(benchmark, (config, impl))
    if stats is not None:
        benchmark.extra_info["steps_per_s"] = 1.0 / stats.median
        if impl.startswith("matmul-ceiling"):
            benchmark.extra_info["matmul_gflops"] = step_matmul_flops(CONFIGS[config]) / stats.median / 1e9


INTERLEAVED_SECONDS = 1.0      # per implementation and configuration


@pytest.mark.parametrize("backend", list(REFERENCES_ON))
def test_interleaved_comparison(benchmark, backend):
    """``vaecore bench``'s comparison: each configuration's implementations timed in interleaved rounds.
    The step benchmarks above run one after another, so a change of the machine's speed between them
    (on the project's machine they come and go within seconds) shifts their ratios; here it falls on
    every implementation alike. Its table follows the one above, and its ratios go into the JSON."""
    from vaecore.benchmark.report import compare, resolve_backend

    try:
        resolve_backend(backend)
    except Unavailable as e:            # cupy without a usable GPU
        pytest.skip(str(e))
    result = {}
    settle()
    with np.errstate(all="ignore"):
        benchmark.pedantic(lambda: result.update(comparison=compare(seconds=INTERLEAVED_SECONDS, backend=backend)),
                           rounds=1, iterations=1)
    benchmark.group = "interleaved"
    results = result["comparison"].results
    benchmark.extra_info.update(backend=backend, ratio_to_faster_reference={r.name: r.ratio() for r in results},
                                share_of_ceiling={r.name: r.ceiling_share() for r in results})
    _extra_lines.append(f"the same, {backend}, timed in interleaved rounds as `vaecore bench` does "
                        f"({INTERLEAVED_SECONDS:g} s per implementation and configuration):")
    _extra_lines.extend(format_table(results).split("\n\n")[0].splitlines() + [""])  # its table, not the legend


# -- one MNIST epoch, evaluation throughput, memory over a 10-epoch run -----------------------------

@pytest.fixture(scope="module")
def mnist():
    from vaecore.data import load_dataset

    try:
        return load_dataset("mnist", log=lambda message: None)
    except Exception as e:   # offline with an empty cache: nothing to measure on
        pytest.skip(f"MNIST is not available here ({e}); fetch it once with: python cli.py data fetch mnist")


@pytest.mark.parametrize("config", [EPOCH_CONFIG], ids=lambda c: f"{c}-ours-numpy")
def test_mnist_epoch(benchmark, mnist, config):
    """One shuffled pass over MNIST's 60,000 training images (training only: no validation, no pictures)."""
    from vaecore.benchmark.ours import make_trainer

    trainer = make_trainer(CONFIGS[config], mnist.x_train, mnist.x_test)
    epochs = iter(range(1, 1000))
    benchmark.group = "mnist-epoch"
    benchmark.extra_info.update(config=config, impl="ours-numpy", images=len(trainer.x_train))
    with np.errstate(all="ignore"):
        trainer.train_step(trainer.x_train[:CONFIGS[config].batch])           # kernels loaded
    settle()
    benchmark.pedantic(lambda: trainer.train_epoch(next(epochs)), rounds=3, iterations=1)
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["images_per_s"] = len(trainer.x_train) / seconds
        _extra_lines.append(f"MNIST epoch at {config} (ours-numpy): {seconds:.2f} s median, "
                            f"{len(trainer.x_train) / seconds:,.0f} images/s")


@pytest.mark.parametrize("config", [EPOCH_CONFIG], ids=lambda c: f"{c}-ours-numpy")
def test_importance_sampled_nll(benchmark, mnist, config):
    """``vaecore.evaluation.importance_sampled_nll`` on IS_IMAGES test images with IS_SAMPLES samples each."""
    from vaecore.benchmark.ours import make_trainer
    from vaecore.evaluation import importance_sampled_nll

    model = make_trainer(CONFIGS[config], mnist.x_train[:CONFIGS[config].batch]).model
    images = mnist.x_test[:IS_IMAGES]
    benchmark.group = "evaluation"
    benchmark.extra_info.update(config=config, impl="ours-numpy", images=len(images), samples_per_image=IS_SAMPLES)
    with np.errstate(all="ignore"):
        importance_sampled_nll(model, images[:2], IS_SAMPLES, seed=0)        # warm
        settle()
        benchmark.pedantic(importance_sampled_nll, args=(model, images, IS_SAMPLES), kwargs={"seed": 0},
                           rounds=3, iterations=1)
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.median
        benchmark.extra_info.update(images_per_s=len(images) / seconds,
                                    samples_per_s=len(images) * IS_SAMPLES / seconds)
        _extra_lines.append(f"importance-sampled NLL at {config} (k={IS_SAMPLES}, {len(images)} images): "
                            f"{seconds:.2f} s median, {len(images) / seconds:,.1f} images/s, "
                            f"{len(images) * IS_SAMPLES / seconds:,.0f} decoded samples/s")


def resident_mib():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize("config", [EPOCH_CONFIG], ids=lambda c: f"{c}-ours-numpy")
def test_train_10_epochs_memory(benchmark, mnist, config, tmp_path):
    """``vaecore train`` for 10 epochs (validation, pictures and checkpoint each epoch); the peak
    resident memory of each epoch, sampled every step, should stay flat after the first."""
    from vaecore.backend import make_backend
    from vaecore.benchmark.configs import BETA1, BETA2, LR
    from vaecore.config import TrainConfig
    from vaecore.train import run_training

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("resident memory is read from /proc/self/statm (Linux)")
    bench = CONFIGS[config]
    peaks = {}

    def progress_factory(epoch):
        def update(step, steps, loss):
            peaks[epoch] = max(peaks.get(epoch, 0.0), resident_mib())
        return update

    def train():
        peaks.clear()
        run_training(tmp_path / "run", bench.model_config(),
                     TrainConfig(epochs=10, batch_size=bench.batch, lr=LR, beta1=BETA1, beta2=BETA2),
                     make_backend("numpy"), mnist, log=lambda message: None, progress_factory=progress_factory)

    benchmark.group = "train-10-epochs"
    settle()
    with np.errstate(all="ignore"):
        benchmark.pedantic(train, rounds=1, iterations=1)
    later = [peaks[e] for e in sorted(peaks) if e > 1]
    spread = max(later) - min(later)
    benchmark.extra_info.update(config=config, impl="ours-numpy",
                                peak_rss_mib_per_epoch={e: round(v, 1) for e, v in sorted(peaks.items())},
                                epoch_2_minus_epoch_1_mib=round(later[0] - peaks[1], 2),
                                spread_epochs_2_to_10_mib=round(spread, 2))
    _extra_lines.append(f"10-epoch train at {config}: peak resident memory per epoch (MiB) "
                        + " ".join(f"{peaks[e]:.0f}" for e in sorted(peaks))
                        + f"; epoch 2 - epoch 1: {later[0] - peaks[1]:+.1f} MiB, spread over epochs 2-10: "
                          f"{spread:.1f} MiB")
