"""The comparison ``vaecore bench`` runs, and the table it prints.

For each configuration: our step, the PyTorch and JAX steps (where installed) and the step's matmuls
alone (the ceiling) are built, warmed up and timed interleaved (:mod:`.timing`); the table shows steps
per second, ours over the faster reference, and the share of the matmul ceiling our step reaches. With
``--backend cupy`` every one of them runs on the GPU: PyTorch on CUDA, JAX on its GPU client, the
ceiling with cuBLAS. The targets are the CPU's (issue 7); a GPU run shows none.
"""

from dataclasses import dataclass, field

import numpy as np

from . import CEILING_ON, REFERENCES, REFERENCES_ON, Unavailable, implementation_status, make_step, machine
from .configs import CONFIGS, BenchConfig, config_by_name, step_matmul_flops
from .timing import measure_each

# the targets of issue 7: ours / faster reference, in steps per second
RATIO_TARGETS = {"seed-b4": 3.0, "example-b128": 1.3, "wide-b512": 1.1}
# ceiling time / our step time
CEILING_TARGETS = {"wide-b512": 0.8}
# other processes using more than this many cores on average make the figures unreliable
BUSY_CORES = 0.2
INSTALL_HINTS = {"torch": "pip install torch==2.13.0", "jax": "pip install jax"}


@dataclass
class ConfigResult:
    """The medians (seconds per step, :class:`~.timing.Timing`) of one configuration."""
    config: BenchConfig
    ours_impl: str                                   # "ours-numpy" or "ours-cupy"
    ours: object = None
    references: dict = field(default_factory=dict)   # "torch"/"jax" -> Timing (missing ones absent)
    ceiling: object = None
    ours_ran: str = ""                               # how ours ran, once timed (OurStep.describe)

    @property
    def backend(self):
        return self.ours_impl.split("-", 1)[1]

    @property
    def name(self):
        return self.config.name

    @property
    def flops(self):
        return step_matmul_flops(self.config)

    def faster_reference(self):
        """(name, Timing) of the reference with the shorter median step, or (None, None)."""
        if not self.references:
            return None, None
        name = min(self.references, key=lambda k: self.references[k].median)
        return name, self.references[name]

    def ratio(self):
        """Our steps per second over the faster reference's (above 1: ours is faster)."""
        _, ref = self.faster_reference()
        return None if ref is None or self.ours is None else ref.median / self.ours.median

    def ceiling_share(self):
        """How close our step comes to its matmuls alone: ceiling time / our step time."""
        return None if self.ceiling is None or self.ours is None else self.ceiling.median / self.ours.median

    def matmul_gflops(self):
        return None if self.ceiling is None else self.flops / self.ceiling.median / 1e9


@dataclass
class Comparison:
    results: list
    missing: dict                # implementation -> why it did not run
    machine: dict
    other_load: float = None     # cores other processes kept busy meanwhile (None: unknown)


def resolve_backend(name):
    """``auto`` -> cupy when a device answers, else numpy; ``cupy`` without one -> Unavailable."""
    if name == "auto":
        usable, _ = implementation_status("ours-cupy")
        return "cupy" if usable else "numpy"
    if name == "cupy":
        usable, reason = implementation_status("ours-cupy")
        if not usable:
            raise Unavailable(f"--backend cupy: {reason}")
    return name


def compare(configs=tuple(CONFIGS), seconds=2.0, backend="numpy", references=REFERENCES, log=None,
            seed=0):
    """Builds and times every implementation for each configuration (names or :class:`BenchConfig`)
    on ``backend``'s device; returns a :class:`Comparison` (references under their base names)."""
    backend = resolve_backend(backend)
    ours_impl, ceiling_impl, on_device = f"ours-{backend}", CEILING_ON[backend], REFERENCES_ON[backend]
    missing = {}
    for ref in references:
        usable, detail = implementation_status(on_device[ref])
        if not usable:
            missing[ref] = detail
    present = [r for r in references if r not in missing]
    meter = machine.OtherLoad().start()
    results = []
    for config in configs:
        config = config_by_name(config) if isinstance(config, str) else config
        if log:
            log(f"{config.name}: {config.describe()} -- timing {ours_impl}, "
                f"{', '.join([on_device[r] for r in present] + [ceiling_impl])} "
                f"(about {seconds:g} s each)")
        steps = {"ours": make_step(ours_impl, config, seed), "ceiling": make_step(ceiling_impl, config, seed)}
        for ref in present:
            try:
                steps[ref] = make_step(on_device[ref], config, seed)
            except Unavailable as e:
                missing[ref] = str(e)
        with np.errstate(all="ignore"):          # as in training: a diverging reference is no crash
            timings = measure_each(steps, seconds)
        results.append(ConfigResult(config, ours_impl, timings.pop("ours"), ceiling=timings.pop("ceiling"),
                                    references=timings, ours_ran=steps["ours"].describe()))
        del steps
    return Comparison(results, missing, machine.summary(), meter.stop())


# -- formatting ----------------------------------------------------------------------------------

def _rate(timing):
    return "-" if timing is None else f"{timing.per_second:,.0f}" if timing.per_second >= 100 else \
        f"{timing.per_second:,.1f}"


def format_machine(info):
    v = info["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("numpy", "numba", "torch", "jax", "jaxlib", *machine.CUPY_PACKAGES)
                     if v.get(k))
    return "\n".join([
        f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}",
        f"NumPy's BLAS: {info['numpy_blas']}",
        f"versions: {libs}",
    ])


def format_table(results):
    """One row per configuration: steps per second (medians), ratio to the faster reference, target,
    matmul ceiling and our share of it."""
    ours_label = results[0].ours_impl if results else "ours"
    backend = results[0].backend if results else "numpy"
    labels = REFERENCES_ON[backend]
    head = (f"{'config':<13} {ours_label:>11} {labels['torch']:>10} {labels['jax']:>9} {'ours/faster ref':>17} "
            f"{'target':>8}  "
            f"{'matmuls alone':>13} {'GFLOP/s':>8}  {'share of ceiling':<16}")
    lines = ["training steps per second (median; higher is better)", head, "-" * len(head.rstrip())]
    for r in results:
        ref_name, _ = r.faster_reference()
        ratio = r.ratio()
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x ({ref_name})"
        target = RATIO_TARGETS.get(r.name) if backend == "numpy" else None
        target_text = "-" if target is None else f"{target:.1f}x"
        mark = ""
        if ratio is not None and target is not None:
            mark = " ok" if ratio >= target else " low"
        share = r.ceiling_share()
        share_target = CEILING_TARGETS.get(r.name) if backend == "numpy" else None
        share_text = "-" if share is None else f"{share:.0%}"
        if share is not None and share_target is not None:
            share_text += f" (>= {share_target:.0%}{' ok' if share >= share_target else ' low'})"
        gflops = r.matmul_gflops()
        lines.append((f"{r.name:<13} {_rate(r.ours):>11} {_rate(r.references.get('torch')):>10} "
                     f"{_rate(r.references.get('jax')):>9} {ratio_text:>17} {target_text + mark:>8}  "
                     f"{_rate(r.ceiling):>13} {'-' if gflops is None else f'{gflops:.0f}':>8}  {share_text:<16}").rstrip())
    library = "np.matmul" if backend == "numpy" else "cupy.matmul (cuBLAS)"
    lines += ["",
              "ours/faster ref: our steps/s over the faster of PyTorch and JAX. matmuls alone: the step's own "
              "matmuls",
              f"run back to back with {library} (the ceiling), at GFLOP/s; share: their time over our step's time."]
    if backend != "numpy":
        lines.append("targets: the CPU's; none is set for a GPU.")
    return "\n".join(lines)


def format_notes(comparison):
    lines = []
    ran = {}                                         # how ours ran -> the configurations that ran so
    for result in comparison.results:
        if result.ours_ran:
            ran.setdefault(result.ours_ran, []).append(result.config.name)
    lines += [f"ours ran as {how}: {', '.join(names)}" for how, names in ran.items()]
    for ref, why in comparison.missing.items():
        lines.append(f"{ref}: not compared -- {why}" + ("" if INSTALL_HINTS[ref] in why else
                                                         f"; to compare: {INSTALL_HINTS[ref]}"))
    cores = comparison.machine.get("cores") or 1
    if comparison.other_load is not None and comparison.other_load > BUSY_CORES:
        lines.append(f"note: other processes kept {comparison.other_load:.1f} of the {cores} cores busy while this "
                     f"ran; they compete with the threads of every implementation, so re-run on an idle "
                     f"machine for figures you can trust")
    return "\n".join(lines)


def gpu_name():
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return name.decode() if isinstance(name, bytes) else name


def format_threads(comparison):
    if comparison.results and comparison.results[0].backend != "numpy":
        return (f"device: {gpu_name()}; ours: CuPy arrays, cuBLAS and Numba CUDA kernels; torch-cuda and "
                f"jax-gpu on the same GPU, each step waited for before the clock stops")
    from .ours import threads_note

    parts = [f"ours: {threads_note()}"]
    present = [r for r in REFERENCES if r not in comparison.missing]
    if "torch" in present:
        from .torch_reference import default_threads

        parts.append(f"torch: {default_threads()} threads (torch.set_num_threads)")
    if "jax" in present:
        from .jax_reference import threads_note as jax_threads

        parts.append(f"jax: {jax_threads()}")
    return "threads: " + "\n         ".join(parts)


def format_report(comparison):
    blocks = [format_machine(comparison.machine), format_threads(comparison), "", format_table(comparison.results)]
    notes = format_notes(comparison)
    if notes:
        blocks += ["", notes]
    return "\n".join(blocks)


def run_bench(configs=tuple(CONFIGS), seconds=2.0, backend="numpy", log=print):
    """What ``vaecore bench`` does: warn about OpenBLAS overrides, compare, print the report."""
    backend = resolve_backend(backend)          # a missing GPU is an error before anything is timed
    warning = machine.override_warning()
    if warning:
        log(warning)
        log("")
    comparison = compare(configs, seconds=seconds, backend=backend, log=log)
    log("")
    log(format_report(comparison))
    return comparison
