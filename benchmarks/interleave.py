"""Timing against a baseline under the same machine load (imported by the bench_*.py files).

On a shared machine the load, and with it the clock rate and the cache and memory bandwidth a
process gets, changes from one minute to the next: two tests run one after the other can differ
by more than the effect measured. So a benchmark that is compared with a baseline runs one
baseline call before each of its rounds (pytest-benchmark's setup, outside the timed call),
timed apart, and records the median of those calls in
``extra_info["baseline_interleaved_median_s"]`` and ``extra_info["speedup_vs_baseline"]``
(baseline median / median, the convention of ratios.py): the ratio of two medians of calls made
under the same load.
"""
import statistics
import time
from typing import Callable, Optional


def time_interleaved(benchmark, step: Callable[[], object],
                     baseline_step: Optional[Callable[[], object]], rounds: int,
                     warmup_rounds: int = 1) -> Optional[float]:
    """Times `step` with benchmark.pedantic (one call per round). With `baseline_step`, one
    baseline call runs before each round, warm-up rounds included; returns the median of those
    before the `rounds` timed rounds in seconds, also recorded with the speedup (module
    docstring). Without, None."""
    interleaved = []

    def setup():
        start = time.perf_counter()
        baseline_step()
        interleaved.append(time.perf_counter() - start)

    if baseline_step is not None and warmup_rounds == 0:
        baseline_step()  # its own warm-up
    benchmark.pedantic(step, setup=setup if baseline_step is not None else None, rounds=rounds,
                       iterations=1, warmup_rounds=warmup_rounds)
    if baseline_step is None:
        return None
    baseline_s = statistics.median(interleaved[-rounds:])  # (setup also runs before warm-ups)
    benchmark.extra_info["baseline_interleaved_median_s"] = baseline_s
    benchmark.extra_info["speedup_vs_baseline"] = baseline_s / benchmark.stats.stats.median
    return baseline_s
