"""`guided_against_unguided`: the chosen guidance scale against no guidance on test, paired by seed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tasks.generative.fid import FIDConfig
from tasks.generative.guidance import guided_against_unguided


class FakeEvaluator:
    """FID is the images' single value: the draw below encodes (scale, seed) into it."""

    def fid(self, images: torch.Tensor):
        return SimpleNamespace(fid=float(images.flatten()[0]))


def draw_with(effect: float, noise: dict[int, float]):
    """FID = 1 + effect * scale + the seed's noise, shared by both scales of one seed (paired draws)."""
    return lambda scale, seed: torch.full((1,), 1.0 + effect * scale + noise[seed])


CFG = FIDConfig(samples=10, batch_size=10, inception_weights="", bound_draws=2, headline_draws=3)
NOISE = {2: 0.0, 102: 0.3, 202: -0.2}  # seeds seed + 2 + 100 k with seed 0


def test_a_scale_that_lowers_fid_on_every_draw_beats_unguided():
    out = guided_against_unguided("classifier", 2.0, 1.0 - 0.2, draw_with(-0.1, NOISE), FakeEvaluator(), 0, CFG)
    assert out["classifier_selected_test_fid_draws"] == 3
    assert out["classifier_minus_unguided_test_fid_mean"] == pytest.approx(-0.2)
    # Paired: the seeds' noise cancels, the difference has no spread, the interval is [-0.2, -0.2].
    assert out["classifier_minus_unguided_test_fid_ci_high"] == pytest.approx(-0.2)
    assert out["classifier_beats_unguided"] == 1.0


def test_noise_larger_than_the_effect_is_not_significant():
    effect = {2: 0.0, 102: 0.3, 202: -0.2}

    def draw(scale, seed):  # the guided draw's noise differs from the unguided one's: unpaired noise
        return torch.full((1,), 1.0 - 0.01 * scale + (effect[seed] if scale else -effect[seed]))

    first = float(draw(1.0, 2)[0])
    out = guided_against_unguided("classifier_free", 1.0, first, draw, FakeEvaluator(), 0, CFG)
    low, high = (
        out["classifier_free_minus_unguided_test_fid_ci_low"],
        out["classifier_free_minus_unguided_test_fid_ci_high"],
    )
    assert low < 0 < high and out["classifier_free_beats_unguided"] == 0.0


def test_scale_zero_is_the_unguided_model_itself():
    out = guided_against_unguided("classifier", 0.0, 1.0, draw_with(-0.1, NOISE), FakeEvaluator(), 0, CFG)
    assert out["classifier_minus_unguided_test_fid_mean"] == 0.0 and out["classifier_beats_unguided"] == 0.0
    assert np.isclose(out["classifier_selected_test_fid_mean"], out["classifier_unguided_test_fid_mean"])
