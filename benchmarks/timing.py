"""The benchmarks' one timer."""

from __future__ import annotations

import time
from collections.abc import Callable


def seconds(fn: Callable[[], object], repeats: int = 1) -> float:
    """The best wall-clock time of `repeats` calls of `fn` (the least disturbed by other work)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
