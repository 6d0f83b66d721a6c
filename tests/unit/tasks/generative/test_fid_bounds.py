"""`fid_bounds`: the FID floor and ceiling at the generators' sample size, mean and std over draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.generative.fid import feature_statistics, frechet_distance_from_stats
from tasks.generative.fid import FIDConfig, draw_spread, fid_bounds, stratified_rows


class Flatten(nn.Module):
    """Pixels as features: an extractor whose FID is the Frechet distance of the pixels themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # features_of reads the device from a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@pytest.fixture(scope="module")
def same_distribution():
    """Train and reference drawn from one Gaussian over 2x2 'images' (4 features): a perfect generator's FID
    is pure finite-sample error."""
    g = torch.Generator().manual_seed(0)
    train = torch.randn((600, 1, 2, 2), generator=g) * 0.1
    reference = torch.randn((300, 1, 2, 2), generator=g) * 0.1
    return train, feature_statistics(reference.flatten(1).double().numpy())


LABELS = np.arange(600) % 2  # two classes of 300 train images each


def config(samples: int, draws: int = 5) -> FIDConfig:
    return FIDConfig(samples=samples, batch_size=64, inception_weights="", bound_draws=draws, headline_draws=1)


def test_floor_at_small_n_is_above_the_floor_from_every_train_image(same_distribution):
    train, reference = same_distribution
    every = frechet_distance_from_stats(feature_statistics(train.flatten(1).double().numpy()), reference).fid
    small = fid_bounds(Flatten(), train, LABELS, 2, reference, config(20), seed=0)
    assert small.samples == 20 and small.draws == 5
    assert small.floor > 2 * every  # the finite-sample bias the old all-train floor hid
    assert small.floor_std > 0 and small.ceiling > 10 * small.floor  # uniform noise on [-1, 1] is far off


def test_bounds_are_the_mean_and_std_of_the_draws_and_seeded(same_distribution):
    train, reference = same_distribution
    a = fid_bounds(Flatten(), train, LABELS, 2, reference, config(50, draws=3), seed=7)
    assert a == fid_bounds(Flatten(), train, LABELS, 2, reference, config(50, draws=3), seed=7)
    # The same draws by hand: 25 train images of each class then 50 noise images per draw, one generator.
    g = torch.Generator().manual_seed(7)
    floors, ceilings = [], []
    for _ in range(3):
        rows = np.concatenate(
            [np.flatnonzero(LABELS == c)[torch.randperm(300, generator=g)[:25].numpy()] for c in (0, 1)]
        )
        floors.append(
            frechet_distance_from_stats(feature_statistics(train[rows].flatten(1).double().numpy()), reference).fid
        )
        noise = torch.rand((50, 1, 2, 2), generator=g) * 2 - 1
        ceilings.append(
            frechet_distance_from_stats(feature_statistics(noise.flatten(1).double().numpy()), reference).fid
        )
    assert a.floor == pytest.approx(np.mean(floors)) and a.floor_std == pytest.approx(np.std(floors, ddof=1))
    assert a.ceiling == pytest.approx(np.mean(ceilings)) and a.ceiling_std == pytest.approx(np.std(ceilings, ddof=1))


def test_sample_size_is_capped_by_the_train_split(same_distribution):
    train, reference = same_distribution
    assert fid_bounds(Flatten(), train[:30], LABELS[:30], 2, reference, config(100, draws=2), seed=0).samples == 30


def test_fewer_than_two_draws_is_refused():
    with pytest.raises(ValueError, match="bound_draws must be >= 2"):
        config(10, draws=1)


def test_draw_spread_is_the_t_interval_of_the_mean():
    spread = draw_spread([1.0, 2.0, 3.0])
    half = 4.302652729749464 / np.sqrt(3)  # t(0.975, 2 df) * std 1 / sqrt(3)
    assert spread == pytest.approx(
        {"fid_draws": 3.0, "fid_mean": 2.0, "fid_std": 1.0, "fid_ci_low": 2.0 - half, "fid_ci_high": 2.0 + half}
    )


def test_one_draw_reports_no_interval():
    spread = draw_spread([0.5])
    assert spread["fid_mean"] == 0.5 and np.isnan(spread["fid_std"]) and np.isnan(spread["fid_ci_low"])


def test_the_floor_draws_each_class_in_the_generators_counts():
    labels = np.array([0] * 5 + [1] * 7 + [2] * 4)
    rows = stratified_rows(labels, np.array([2, 3, 4]), torch.Generator().manual_seed(0))
    assert np.bincount(labels[rows], minlength=3).tolist() == [2, 3, 4] and len(set(rows.tolist())) == 9
    with pytest.raises(ValueError, match="needs 5 train images of class 2, the train split has 4"):
        stratified_rows(labels, np.array([1, 1, 5]), torch.Generator().manual_seed(0))
