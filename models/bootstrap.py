"""Paired percentile bootstrap over an evaluation set (Efron & Tibshirani 1993, ch. 13 and 16).

Shared by every family (the text family resamples test sentences, detection test images), so it lives at
the root of `models/`: pure numpy, no I/O, and it imports no family.

The resampling is *paired*: every model is scored on the same resampled items in each resample (one index
matrix for all), so an item that is hard for every model moves all of them together and the interval of a
difference is much narrower than the two intervals side by side suggest. An interval is the percentile
interval: the (1 - level) / 2 and (1 + level) / 2 quantiles of the B resampled values, with numpy's default
linear interpolation between order statistics. A difference is "significant" when its interval excludes 0.

What the intervals cover is the evaluation set's sampling: how much the figure would move with another
test set of the same size from the same source. They do not cover training-seed variance (another seed gives
another model), which needs replicates.

`ratio_resamples` and `percentile_interval` have plain-loop twins (`*_ref`) that the tests hold them to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BootstrapConfig:
    """A params section (`lm_compare`, `map`): how many resamples, and the interval's coverage."""

    resamples: int  # B: resamples of the evaluation set, drawn with replacement
    level: float = 0.95  # coverage of the percentile interval

    def __post_init__(self) -> None:
        # Below ~20 resamples the 2.5 % and 97.5 % quantiles are the extremes themselves.
        if isinstance(self.resamples, bool) or not isinstance(self.resamples, int) or self.resamples < 20:
            raise ValueError(f"resamples must be an integer >= 20, got {self.resamples!r}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {self.level!r}")


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(B, n) int64: row b holds the n item indices of resample b, drawn uniformly with replacement."""
    if n < 1:
        raise ValueError("cannot resample an empty evaluation set")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n), dtype=np.int64)


def resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(B, n) int64: how many times each of the n items is drawn in each resample (row sums are n)."""
    B = len(indices)
    flat = (np.arange(B, dtype=np.int64)[:, None] * n + indices).ravel()
    return np.bincount(flat, minlength=B * n).reshape(B, n)


def ratio_resamples(numerator: np.ndarray, denominator: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The ratio of sums over each resample: sum_i w_bi num_i / sum_i w_bi den_i, w_bi how often item i is drawn.

    numerator (n,) or (M, n), denominator (n,), indices (B, n) -> (B,) or (B, M). With per-sentence NLL over
    per-sentence token counts this is the resampled log-perplexity; with the per-sentence difference of two
    models' NLL it is the resampled difference of their log-perplexities (both counted on the same tokens).
    """
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    if num.shape[-1] != len(den) or den.ndim != 1:
        raise ValueError(f"numerator {num.shape} and denominator {den.shape} must share the item axis")
    w = resample_counts(indices, len(den)).astype(np.float64)  # (B, n); counts are exact in float64
    return (w @ num.T) / (w @ den)[(...,) + (None,) * (num.ndim - 1)]


def ratio_resamples_ref(numerator: np.ndarray, denominator: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """`ratio_resamples` as a loop over the drawn items: sum the numerator and denominator of each draw."""
    num = np.atleast_2d(np.asarray(numerator, dtype=np.float64))
    out = np.zeros((len(indices), len(num)))
    for b, row in enumerate(indices):
        for m in range(len(num)):
            top = bottom = 0.0
            for i in row:
                top += num[m, i]
                bottom += float(denominator[i])
            out[b, m] = top / bottom
    return out if np.ndim(numerator) == 2 else out[:, 0]


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) percentile interval of resampled values `samples` (B, ...) along the resample axis."""
    low, high = np.percentile(np.asarray(samples, dtype=np.float64), [50 * (1 - level), 50 * (1 + level)], axis=0)
    return low, high


def percentile_interval_ref(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """`percentile_interval` of one series (B,), written out: sort, then interpolate linearly between the order
    statistics at positions q (B - 1) (Hyndman & Fan's definition 7, numpy's default)."""
    ordered = sorted(float(s) for s in samples)

    def quantile(q: float) -> float:
        position = q * (len(ordered) - 1)
        lo = int(np.floor(position))
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (position - lo) * (ordered[hi] - ordered[lo])

    return quantile((1 - level) / 2), quantile((1 + level) / 2)


@dataclass(frozen=True)
class Interval:
    """A point estimate on the whole evaluation set and its bootstrap percentile interval."""

    point: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """For a difference: its interval excludes 0, so the sign of the difference is not a resampling accident."""
        return not self.low <= 0.0 <= self.high


def interval(point: float, samples: np.ndarray, level: float = 0.95) -> Interval:
    """`point` with the percentile interval of its resampled values `samples` (B,)."""
    low, high = percentile_interval(samples, level)
    return Interval(float(point), float(low), float(high))
