"""A small, dependency-free timer for ``vaecore bench`` (the pytest suite uses pytest-benchmark).

Implementations are timed *interleaved*: short rounds of each in turn until every one has had its
share of the time, so a burst of load from elsewhere on the machine hits all of them alike. Each call
is timed alone and the median over calls is reported, which ignores the occasional pre-empted call.

Before each round the timer sleeps briefly (``SETTLE_SECONDS``): after a matmul OpenBLAS's worker
threads keep spinning for about 0.1 s (and OpenMP's and XLA's pools for less), and a spinning thread of
the previous implementation would steal a core from the next one.
"""

import math
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    median: float        # seconds per call
    q1: float
    q3: float
    calls: int

    @property
    def per_second(self):
        return 1.0 / self.median if self.median > 0 else math.inf

    @property
    def iqr(self):
        return self.q3 - self.q1


def summarize(times):
    ordered = sorted(times)
    n = len(ordered)

    def quantile(q):
        pos = q * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return Timing(quantile(0.5), quantile(0.25), quantile(0.75), n)


def warm(fn, seconds=0.2, min_calls=3):
    """Calls ``fn`` until ``seconds`` have passed and at least ``min_calls`` calls were made
    (compilation, caches, thread pools waking up); returns the last call's duration."""
    start = last = time.perf_counter()
    calls = 0
    while calls < min_calls or last - start < seconds:
        t0 = time.perf_counter()
        fn()
        last = time.perf_counter()
        calls += 1
    return last - t0


SETTLE_SECONDS = 0.15


def measure_each(fns, seconds, rounds=4, warmup=0.2, settle=SETTLE_SECONDS):
    """{name: Timing} for each callable in ``fns``, about ``seconds`` of calls each, in ``rounds``
    interleaved rounds; each round starts after ``settle`` seconds of sleep and with one untimed call."""
    for fn in fns.values():
        warm(fn, warmup)
    times = {name: [] for name in fns}
    per_round = seconds / rounds
    perf_counter = time.perf_counter
    for _ in range(rounds):
        for name, fn in fns.items():
            if settle and len(fns) > 1:
                time.sleep(settle)
            fn()
            spent, samples = 0.0, times[name]
            while spent < per_round or not samples:
                t0 = perf_counter()
                fn()
                dt = perf_counter() - t0
                samples.append(dt)
                spent += dt
    return {name: summarize(samples) for name, samples in times.items()}
