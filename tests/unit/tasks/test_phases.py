"""The stage phase clock (tasks/phases.py): exclusive spans that add up, and silence outside a stage."""

from __future__ import annotations

import time

import pytest

from tasks import phases
from tasks.phases import PHASES, clocked, in_phase, phase


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_nested_spans_count_each_second_once_to_the_innermost_phase():
    with clocked() as clock:
        start = time.perf_counter()
        with phase("scoring"):
            busy(0.05)
            with phase("loading"):  # the reference images read inside an FID evaluation
                busy(0.10)
            busy(0.05)
        busy(0.03)  # in no span: the stage's "other"
        total = time.perf_counter() - start
    s = clock.seconds
    assert s["loading"] == pytest.approx(0.10, abs=0.02)
    assert s["scoring"] == pytest.approx(0.10, abs=0.02)  # paused while loading ran
    assert sum(s.values()) <= total
    assert total - sum(s.values()) == pytest.approx(0.03, abs=0.02)
    assert set(clock.metrics()) == {f"phase_{p}_seconds" for p in PHASES}


def test_a_span_that_raises_still_counts_and_closes():
    with clocked() as clock:
        with pytest.raises(RuntimeError), phase("sampling"):
            busy(0.02)
            raise RuntimeError("boom")
        with phase("io"):
            busy(0.02)
    assert clock.seconds["sampling"] >= 0.02 and clock.seconds["io"] >= 0.02
    assert clock.seconds["io"] < 0.02 + 0.015  # the sampling span did not stay open underneath


def test_the_decorator_times_every_call_and_keeps_the_function():
    @in_phase("evaluation")
    def perplexity(x: float) -> float:
        """doc"""
        busy(0.02)
        return 2 * x

    with clocked() as clock:
        assert perplexity(3.0) == 6.0 and perplexity(1.0) == 2.0
    assert clock.seconds["evaluation"] >= 0.04 and perplexity.__name__ == "perplexity" and perplexity.__doc__ == "doc"


def test_outside_a_stage_nothing_is_counted_and_clocks_restore():
    assert phases._clock is None
    with phase("training"):  # a helper called from a test or `kiln sample`: no stage, no clock
        pass
    with clocked() as outer:
        with clocked() as inner, phase("io"):
            busy(0.01)
        with phase("loading"):
            busy(0.01)
    assert phases._clock is None
    assert inner.seconds["io"] > 0 and inner.seconds["loading"] == 0
    assert outer.seconds["loading"] > 0 and outer.seconds["io"] == 0


@pytest.mark.parametrize("use", ["span", "phase", "decorator"])
def test_an_unknown_phase_is_refused(use):
    with pytest.raises(ValueError, match="unknown phase 'fid'"):
        if use == "decorator":
            in_phase("fid")
        elif use == "phase":
            with phase("fid"):
                pass
        else:
            with clocked(), phase("fid"):
                pass
