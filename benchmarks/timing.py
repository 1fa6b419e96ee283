"""What the benchmarks share: the median wall time of a few runs.

>>> from timing import median_time  # benchmarks/ is on sys.path when a script runs
>>> seconds = median_time(lambda: model(tokens), repeats=3)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """The median of `repeats` wall-clock timings of `fn()`, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
