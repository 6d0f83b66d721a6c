"""models/generative/fid.py: Fréchet distance against scipy's sqrtm and torchmetrics, edge cases, the FID
InceptionV3."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from models.generative.fid import (
    FeatureStats,
    InceptionV3Pool3,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_stats,
)
from tests.conftest import reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook computation (pytorch-fid's): np.cov and scipy.linalg.sqrtm of the product."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def features() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    d = 16
    mix = rng.normal(size=(d, d))
    a = rng.normal(size=(200, d)) @ mix  # correlated features
    b = rng.normal(size=(150, d)) @ (mix + 0.3 * rng.normal(size=(d, d))) + 0.5
    return a, b


def test_matches_direct_sqrtm(features):
    a, b = features
    expected = _direct_fid(a, b)
    assert expected > 1.0  # the sets differ: a non-trivial value
    result = frechet_distance(a, b)
    assert result.fid == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, b, method="sqrtm").fid == pytest.approx(expected, rel=1e-6)
    assert (result.n_a, result.n_b, result.feature_dim) == (200, 150, 16)
    assert result.imaginary_residue < 1e-6
    assert not result.few_samples


def test_accepts_tensors_and_is_symmetric(features):
    a, b = features
    ab = frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()).fid
    ba = frechet_distance(b, a).fid
    assert ab == pytest.approx(ba, rel=1e-5)  # float32 input, float64 maths


def test_identical_sets_give_zero(features):
    a, _ = features
    assert abs(frechet_distance(a, a.copy()).fid) < 1e-6
    # rank-deficient covariances (features on a 4-d subspace): the singular-value route stays at 0, where
    # square roots of rounding-level eigenvalues (scipy's sqrtm) leave ~1e-5; both stay finite
    low_rank = a[:, :4] @ np.random.default_rng(1).normal(size=(4, 16))
    result = frechet_distance(low_rank, low_rank.copy())
    assert abs(result.fid) < 1e-6 and np.isfinite(result.imaginary_residue)
    reference = frechet_distance(low_rank, low_rank.copy(), method="sqrtm")
    assert abs(reference.fid) < 1e-6 * np.trace(np.cov(low_rank, rowvar=False))


def test_mean_shift_only_gives_squared_distance(features):
    a, _ = features
    shift = np.linspace(-1, 1, a.shape[1])
    assert frechet_distance(a, a + shift).fid == pytest.approx(float(shift @ shift), rel=1e-8)


def test_too_few_samples_raise_and_few_samples_flag():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="need n > dim"):
        frechet_distance(rng.normal(size=(16, 16)), rng.normal(size=(100, 16)))
    with pytest.raises(ValueError, match="need n > dim"):
        frechet_distance(rng.normal(size=(100, 16)), rng.normal(size=(10, 16)))
    with pytest.raises(ValueError, match="feature dims differ"):
        frechet_distance(rng.normal(size=(100, 16)), rng.normal(size=(100, 8)))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(rng.normal(size=(100, 4)), rng.normal(size=(100, 4)), method="eig")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        feature_statistics(rng.normal(size=(100,)))
    flagged = frechet_distance(rng.normal(size=(20, 16)), rng.normal(size=(100, 16)))
    assert flagged.few_samples


def test_stats_are_float64_and_cached_stats_reproduce(features):
    a, b = features
    sa = feature_statistics(torch.from_numpy(a).float())
    assert isinstance(sa, FeatureStats) and sa.mean.dtype == np.float64 and sa.cov.dtype == np.float64
    np.testing.assert_allclose(feature_statistics(a).cov, np.cov(a, rowvar=False), rtol=1e-12)
    assert frechet_distance_from_stats(feature_statistics(a), feature_statistics(b)).fid == pytest.approx(
        frechet_distance(a, b).fid, rel=1e-12
    )


class _FixedFeatures(nn.Module):
    """A small fixed extractor: uint8 images -> (N, 8) float64 features through a seeded random projection."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 8 * 8, 8, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float64).flatten(1) / 255.0  # (N, 192)
        return torch.tanh(h @ self.proj / 4)  # (N, 8)


def test_matches_torchmetrics_with_custom_extractor():
    tm_fid = reference("torchmetrics.image.fid")  # a test-only dependency
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    fake = (real.float() * 0.7 + 40).clamp(0, 255).to(torch.uint8)
    fake[:, 0] = torch.randint(0, 256, (64, 8, 8), generator=g, dtype=torch.uint8)
    extractor = _FixedFeatures()
    metric = tm_fid.FrechetInceptionDistance(feature=extractor)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = float(metric.compute())
    with torch.no_grad():
        ours = frechet_distance(extractor(real), extractor(fake)).fid
    assert expected > 0.01
    assert ours == pytest.approx(expected, rel=1e-3)


# ----------------------------------------------------------------------------------- InceptionV3Pool3


@pytest.fixture(scope="module")
def inception() -> InceptionV3Pool3:
    torch.manual_seed(0)
    return InceptionV3Pool3()


def test_inception_pool3_shape_channels_and_eval_mode(inception):
    g = torch.Generator().manual_seed(0)
    gray = torch.rand(2, 1, 12, 12, generator=g)
    with torch.no_grad():
        f_gray = inception(gray)
        f_rgb = inception(gray.repeat(1, 3, 1, 1))
    assert f_gray.shape == (2, 2048) and f_gray.dtype == torch.float32
    assert torch.isfinite(f_gray).all() and f_gray.std() > 1e-3  # a random init still gives O(1) features
    torch.testing.assert_close(f_gray, f_rgb)  # 1 channel is repeated to RGB
    inception.train()
    assert not inception.training  # a fixed extractor: BatchNorm statistics never update
    with pytest.raises(ValueError, match="expected"):
        inception(torch.rand(2, 2, 8, 8))


def test_inception_state_dict_round_trip(inception):
    buf = io.BytesIO()
    torch.save(inception.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    # a full Inception state dict carries a classifier head; it is ignored
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    loaded = InceptionV3Pool3.from_state_dict(state)
    x = torch.rand(2, 3, 20, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(inception(x), loaded(x))
    assert sum(p.numel() for p in loaded.parameters()) == 21_785_568  # torchvision's Inception3 minus heads
    state.pop("Mixed_7c.branch_pool.conv.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        InceptionV3Pool3.from_state_dict(state)
