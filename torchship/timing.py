"""Wall-clock timing of a call, as median and 95th percentile (what `make bench` reports), and the stop rule of
export's measurements bounded in time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    p50_ms: float
    p95_ms: float
    iters: int


def time_call(fn: Callable[[], Any], *, min_time_s: float, min_iters: int, warmup: int) -> Timing:
    """Run fn `warmup` times untimed, then until both min_iters runs and min_time_s seconds are done."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_iters or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return Timing(statistics.median(samples), samples[min(len(samples) - 1, int(0.95 * len(samples)))], len(samples))


def enough_samples(count: int, spent_s: float, *, min_iters: int, max_iters: int, budget_s: float) -> bool:
    """The stop rule of a measurement bounded in time: max_iters timed calls, or fewer (min_iters at least) once the
    timed calls have taken budget_s. Slow calls (a 224x224 batch of 16: 0.2-0.7 s here) get a median of a few long
    samples, fast ones the full count."""
    return count >= max_iters or (count >= min_iters and spent_s >= budget_s)
