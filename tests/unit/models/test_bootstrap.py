"""models/bootstrap.py: the paired bootstrap against its plain-loop twins, and cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from models.bootstrap import (
    BootstrapConfig,
    Interval,
    interval,
    percentile_interval,
    percentile_interval_ref,
    ratio_resamples,
    ratio_resamples_ref,
    resample_counts,
    resample_indices,
)


def test_indices_are_seeded_and_counts_add_up():
    a, b = resample_indices(7, 50, seed=3), resample_indices(7, 50, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (50, 7) and a.min() >= 0 and a.max() < 7
    assert not np.array_equal(a, resample_indices(7, 50, seed=4))
    counts = resample_counts(a, 7)
    assert (counts.sum(1) == 7).all()
    for row, c in zip(a, counts):
        np.testing.assert_array_equal(np.bincount(row, minlength=7), c)


@pytest.mark.parametrize("models", [None, 3])
def test_ratio_resamples_equal_the_loop(models):
    rng = np.random.default_rng(0)
    n = 23
    num = rng.gamma(2.0, 3.0, size=(models, n) if models else n)
    den = rng.integers(1, 30, size=n).astype(float)
    idx = resample_indices(n, 40, seed=1)
    fast, ref = ratio_resamples(num, den, idx), ratio_resamples_ref(num, den, idx)
    assert fast.shape == ref.shape == ((40, models) if models else (40,))
    np.testing.assert_allclose(fast, ref, rtol=1e-12)


def test_a_resample_of_every_item_once_is_the_point_estimate():
    num, den = np.array([1.0, 2.0, 6.0]), np.array([1.0, 1.0, 2.0])
    every = np.array([[0, 1, 2], [2, 1, 0]])
    np.testing.assert_allclose(ratio_resamples(num, den, every), [9 / 4, 9 / 4])
    np.testing.assert_allclose(ratio_resamples(num, den, np.array([[2, 2, 2]])), [3.0])  # item 2 alone


@pytest.mark.parametrize("level", [0.95, 0.9, 0.5])
def test_percentile_interval_equals_the_written_out_quantiles(level):
    samples = np.random.default_rng(2).normal(size=(137, 4))
    low, high = percentile_interval(samples, level)
    for m in range(4):
        assert (low[m], high[m]) == pytest.approx(percentile_interval_ref(samples[:, m], level), abs=1e-12)


def test_percentile_interval_known_values():
    # 0..100: the 2.5 % and 97.5 % quantiles at positions 2.5 and 97.5 of the order statistics
    assert percentile_interval_ref(np.arange(101), 0.95) == pytest.approx((2.5, 97.5))
    assert tuple(percentile_interval(np.arange(101.0), 0.95)) == pytest.approx((2.5, 97.5))
    assert percentile_interval_ref(np.arange(5), 0.5) == pytest.approx((1.0, 3.0))


def test_identical_models_differ_by_exactly_zero_and_are_not_significant():
    rng = np.random.default_rng(5)
    nll, tokens = rng.gamma(3.0, 5.0, size=40), rng.integers(2, 20, size=40).astype(float)
    idx = resample_indices(40, 200, seed=0)
    diff = ratio_resamples(nll - nll, tokens, idx)
    result = interval(0.0, diff)
    assert (result.low, result.high) == (0.0, 0.0)
    assert not result.significant


def test_a_model_worse_on_every_item_is_significantly_worse():
    rng = np.random.default_rng(6)
    tokens = rng.integers(2, 20, size=30).astype(float)
    better = rng.gamma(3.0, 5.0, size=30)
    worse = better + rng.uniform(0.01, 0.5, size=30) * tokens  # a little worse on every sentence
    idx = resample_indices(30, 500, seed=0)
    diff = ratio_resamples(worse - better, tokens, idx)
    result = interval((worse - better).sum() / tokens.sum(), diff)
    assert result.low > 0 and result.significant
    assert result.low <= result.point <= result.high


def test_noise_alone_is_not_significant():
    # Two models that trade wins item by item, equal on average: the interval straddles 0.
    rng = np.random.default_rng(7)
    tokens = np.full(200, 10.0)
    a = rng.normal(30.0, 3.0, size=200)
    b = a + rng.choice([-1.0, 1.0], size=200)
    idx = resample_indices(200, 1000, seed=1)
    diff = ratio_resamples(a - b, tokens, idx)
    result = interval((a - b).sum() / tokens.sum(), diff)
    assert result.low < 0 < result.high and not result.significant


def test_interval_significance():
    assert Interval(1.0, 0.5, 1.5).significant and Interval(-1.0, -1.5, -0.1).significant
    assert not Interval(0.2, -0.1, 0.5).significant and not Interval(0.0, 0.0, 0.0).significant


def test_config_is_checked():
    assert BootstrapConfig(resamples=1000).level == 0.95
    for bad in ({"resamples": 5}, {"resamples": 1000, "level": 1.0}, {"resamples": True}):
        with pytest.raises(ValueError):
            BootstrapConfig(**bad)
