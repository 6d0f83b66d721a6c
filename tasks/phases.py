"""Where a stage's seconds go: data loading, training steps, evaluation, sampling, scoring (FID, mAP, class
accuracy) and tracking/IO, the split `benchmarks/bench_stages.py` reports per stage.

A stage's code marks a span with `with phase("sampling"):`; `open_stage` (tasks/stage.py) opens one clock per
stage run and logs its totals as `phase_<name>_seconds` beside `stage_seconds`, so any finished run in the
tracking store carries its own profile. Spans nest and the time is exclusive: while an inner span runs the
outer one is paused, so `scoring` that reads images inside a `loading` span (or a training loop that
evaluates inside `training`) counts each second once and the phases add up to at most the stage's seconds.
Time in no span is the stage's `other` (parameters, set-up, what no helper marks).

Outside an open stage (a test calling a helper, `kiln sample`) `phase` does nothing. The clock is one per
process, not per thread: a stage's tasks run one after another, and a Prefect task that runs in a worker
thread still belongs to its stage.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

PHASES = ("loading", "training", "evaluation", "sampling", "scoring", "io")
P = ParamSpec("P")
R = TypeVar("R")


class PhaseClock:
    """Exclusive seconds per phase: a stack of open spans, only the innermost one accruing."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._open: list[str] = []
        self._since = time.perf_counter()

    def _accrue(self) -> None:
        now = time.perf_counter()
        if self._open:
            self.seconds[self._open[-1]] += now - self._since
        self._since = now

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; one of {', '.join(PHASES)}")
        self._accrue()
        self._open.append(name)
        try:
            yield
        finally:
            self._accrue()
            self._open.pop()

    def metrics(self) -> dict[str, float]:
        """`phase_<name>_seconds` for every phase (0 where the stage has none), as the run logs them."""
        return {f"phase_{name}_seconds": seconds for name, seconds in self.seconds.items()}


_clock: PhaseClock | None = None  # the open stage's, while `clocked` holds it


@contextmanager
def clocked() -> Iterator[PhaseClock]:
    """A fresh clock that `phase` spans report to until the block ends (the previous one is restored)."""
    global _clock
    outer, _clock = _clock, PhaseClock()
    try:
        yield _clock
    finally:
        _clock = outer


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the block's seconds to phase `name` of the open stage's clock (nothing when none is open)."""
    if _clock is None:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; one of {', '.join(PHASES)}")
        yield
        return
    with _clock.span(name):
        yield


def in_phase(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a helper whose every call is phase `name` (`read_images` is loading, `write_json` is io)."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; one of {', '.join(PHASES)}")

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            with phase(name):
                return fn(*args, **kwargs)

        return timed

    return decorate
