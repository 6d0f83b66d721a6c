"""Intervals over training seeds (models/seeds.py): the Student-t interval of the mean beside scipy's, no
interval from one seed, deterministic figures as points, and the overlap rule for ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from models.seeds import seed_summary, separated


@pytest.mark.parametrize("values", [[14.4, 14.9, 14.6], [0.41, 0.45], [3.0, 1.0, 4.0, 1.0, 5.0]])
def test_the_interval_is_scipys_student_t_interval_of_the_mean(values):
    s = seed_summary(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (s.mean, s.low, s.high) == pytest.approx((np.mean(values), low, high))
    assert s.std == pytest.approx(np.std(values, ddof=1)) and s.n == len(values)
    assert s.values == tuple(values)


def test_three_seeds_use_t_with_two_degrees_of_freedom_not_the_normal_1_96():
    s = seed_summary([1.0, 2.0, 3.0])  # mean 2, std 1
    assert s.high - s.mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)


def test_one_seed_has_no_interval_and_a_deterministic_figure_is_a_point():
    one = seed_summary([14.7])
    assert one.n == 1 and math.isnan(one.low) and math.isnan(one.high) and math.isnan(one.std)
    point = seed_summary([14.7], deterministic=True)
    assert (point.low, point.mean, point.high, point.std) == (14.7, 14.7, 14.7, 0.0)
    with pytest.raises(ValueError, match="one value"):
        seed_summary([1.0, 2.0], deterministic=True)
    with pytest.raises(ValueError, match="one value per seed"):
        seed_summary([])


def test_separated_is_the_overlap_rule_and_unknown_without_replicates():
    a, b = seed_summary([10.0, 10.2, 10.1]), seed_summary([12.0, 12.3, 12.1])
    wide = seed_summary([10.0, 13.0, 11.0])
    assert separated(a, b) is True and separated(b, a) is True
    assert separated(a, wide) is False  # overlapping intervals: not ranked
    kn = seed_summary([11.5], deterministic=True)
    assert separated(kn, a) is True and separated(kn, wide) is False  # a point against an interval
    assert separated(seed_summary([10.0]), b) is None  # one seed of a seeded model: variance unknown
    assert separated(kn, seed_summary([11.0], deterministic=True)) is None
