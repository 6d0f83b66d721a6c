"""Intervals over training seeds: a model trained with several seeds (the main stage and its replicates) is
summarised by the mean of its test figure and the 95 % Student-t interval of that mean.

With n seeds the interval is mean ± t_{0.975, n-1} · s / sqrt(n), s the sample standard deviation (ddof 1).
It covers what a rerun with another seed would change (initialisation, batch order, dropout), which the
bootstrap over the evaluation set (models/bootstrap.py) does not. With n = 3, t = 4.30: a wide interval, as
three seeds warrant. One seed has no spread; its interval is NaN, never a zero-width one.

Two models' seeds are independent (there is no pairing between an LSTM's seed and a Transformer's), so two
models are ranked over seeds only when their intervals do not overlap, a conservative test for independent
estimates. A model without seed variance (the Kneser-Ney estimate is deterministic) is a point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SeedSummary:
    """One model's figure over its seeds."""

    values: tuple[float, ...]  # one per seed, the main stage's first
    mean: float
    std: float  # sample std (ddof 1); NaN for one seed
    low: float  # the 95 % Student-t interval of the mean; NaN for one seed
    high: float
    deterministic: bool = False  # the figure does not depend on the seed (a Kneser-Ney estimate)

    @property
    def n(self) -> int:
        return len(self.values)


def seed_summary(values: list[float] | np.ndarray, level: float = 0.95, deterministic: bool = False) -> SeedSummary:
    """Mean, std and the Student-t interval of the mean of one figure over independent seeds. A
    `deterministic` figure (one value, no seed in it) is its own point: std and interval 0."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"expected one value per seed, got shape {x.shape}")
    mean = float(x.mean())
    if deterministic:
        if len(x) != 1:
            raise ValueError("a deterministic figure has one value")
        return SeedSummary((mean,), mean, 0.0, mean, mean, deterministic=True)
    if len(x) == 1:
        return SeedSummary((mean,), mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return SeedSummary(tuple(float(v) for v in x), mean, std, mean - half, mean + half)


def separated(a: SeedSummary, b: SeedSummary) -> bool | None:
    """Whether two models' seed intervals do not overlap (a ranking over seeds may stand); None when either
    is a single seed of a seeded model, or both are deterministic: nothing is known about seed variance."""
    if any(s.n < 2 and not s.deterministic for s in (a, b)) or (a.deterministic and b.deterministic):
        return None
    return a.high < b.low or b.high < a.low
