"""models/generative/ddpm.py: schedules, q(x_t | x_0), the loss, and both samplers on a 1-D Gaussian toy whose exact
noise predictor is known in closed form.

Toy: data x_0 ~ N(MU, S^2). Then x_t ~ N(sqrt(abar) MU, abar S^2 + 1 - abar) and the optimal predictor
E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar S^2 + 1 - abar). With it, a correct sampler
returns N(MU, S^2) up to discretisation (small at T = 1000) and Monte Carlo error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.generative.ddpm import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    DiffusionConfig,
    GaussianDiffusion,
    cosine_betas,
    drop_labels,
    linear_betas,
)
from models.generative.unet import UNet, UNetConfig

MU, S = 1.5, 0.5
N = 20_000
MEAN_TOL = 5 * S / math.sqrt(N) + 0.005  # 5 standard errors + a discretisation allowance
VAR_TOL = 5 * math.sqrt(2 / (N - 1)) + 0.02  # on var / S^2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def exact_eps_model(gd: GaussianDiffusion, mu: float | torch.Tensor = MU, s: float = S):
    abar_all = gd.alphas_cumprod

    def model(x: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        abar = abar_all[t].to(x.dtype)[:, None]  # (B, 1)
        m = mu if isinstance(mu, float) else mu[:, None]
        return (1 - abar).sqrt() * (x - abar.sqrt() * m) / (abar * s * s + 1 - abar)  # (B, 1)

    return model


def _sample(gd, model, seed=0, n=N, **kwargs):
    return gd.sample(model, (n, 1), generator=torch.Generator().manual_seed(seed), **kwargs).x.double()


def _assert_target(x: torch.Tensor, mu: float = MU, s: float = S) -> None:
    assert abs(x.mean().item() - mu) < MEAN_TOL, x.mean().item()
    assert abs(x.var().item() / s**2 - 1) < VAR_TOL, x.var().item()


# ---------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 50, 10])
def test_schedules_monotone_in_unit_interval(schedule, T):
    gd = GaussianDiffusion(DiffusionConfig(schedule=schedule, num_timesteps=T))
    abar = gd.alphas_cumprod.numpy()
    assert abar.shape == (T,)
    assert np.all((abar > 0) & (abar < 1))
    assert np.all(np.diff(abar) < 0)
    assert abar[-1] < 1e-2  # the chain ends near pure noise


def test_schedule_values():
    # Ho et al.: linear 1e-4 .. 0.02 over 1000 steps leaves abar_T ~ 4.0e-5
    assert np.cumprod(1 - linear_betas(1000))[-1] == pytest.approx(4.04e-5, rel=0.01)
    # Nichol & Dhariwal eq. 17: abar_t = f(t) / f(0) until the beta clip
    T, s = 1000, 0.008
    abar = np.cumprod(1 - cosine_betas(T, s))
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert abar[T // 2 - 1] == pytest.approx(f(0.5) / f(0.0), rel=1e-9)
    assert cosine_betas(T, s).max() <= 0.999


def test_config_validation_names_the_field():
    for kwargs, field in [
        ({"num_timesteps": 0}, "num_timesteps"),
        ({"schedule": "quadratic"}, "schedule"),
        ({"beta_start": 0.1, "beta_end": 0.01}, "beta_start"),
        ({"variance": "learned"}, "variance"),
        ({"p_uncond": 1.0}, "p_uncond"),
    ]:
        with pytest.raises(ValueError, match=field):
            DiffusionConfig(**kwargs)


# ---------------------------------------------------------------------------------- forward process


def test_q_sample_matches_closed_form():
    gd = GaussianDiffusion(DiffusionConfig())
    n, t_val, x0_val = 100_000, 300, 0.7
    x0 = torch.full((n, 1), x0_val, dtype=torch.float64)
    t = torch.full((n,), t_val, dtype=torch.long)
    torch.manual_seed(0)
    x_t = gd.q_sample(x0, t)
    abar = float(np.prod(1 - linear_betas(1000)[: t_val + 1]))  # t is 0-based: t_val + 1 factors
    mean, var = math.sqrt(abar) * x0_val, 1 - abar
    assert abs(x_t.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(x_t.var().item() - var) < 5 * var * math.sqrt(2 / (n - 1))
    # with a given noise tensor it is exactly eq. 4
    noise = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    x0s = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    ts = torch.tensor([0, 10, 500, 999])
    ab = gd.alphas_cumprod[ts][:, None, None, None]
    torch.testing.assert_close(gd.q_sample(x0s, ts, noise), ab.sqrt() * x0s + (1 - ab).sqrt() * noise)


def test_training_loss_of_exact_predictor_is_posterior_noise_variance():
    gd = GaussianDiffusion(DiffusionConfig())
    model = exact_eps_model(gd)
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(N, 1, generator=g, dtype=torch.float64)
    for t_val in (50, 500):
        t = torch.full((N,), t_val, dtype=torch.long)
        loss = gd.training_losses(model, x0, t=t, generator=g)["loss"].item()
        abar = gd.alphas_cumprod[t_val].item()
        expected = 1 - (1 - abar) / (abar * S**2 + 1 - abar)  # Var(eps | x_t)
        assert abs(loss - expected) < 5 * expected * math.sqrt(2 / N)
    # a worse predictor has a larger loss; losses carry gradients
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    out = gd.training_losses(lambda x, t: w * model(x, t), x0, generator=g)
    out["loss"].backward()
    assert w.grad is not None and out["mse_per_sample"].shape == (N,)


# ---------------------------------------------------------------------------------------- samplers


@pytest.fixture(scope="module")
def toy():
    gd = GaussianDiffusion(DiffusionConfig())
    return gd, exact_eps_model(gd)


def test_ancestral_and_ddim_recover_the_target(toy):
    gd, model = toy
    ancestral = _sample(gd, model, seed=0)
    ddim_eta1 = _sample(gd, model, seed=1, sampler="ddim", eta=1.0)
    ddim_eta0 = _sample(gd, model, seed=2, sampler="ddim", eta=0.0)
    for x in (ancestral, ddim_eta1, ddim_eta0):
        _assert_target(x)
    # DDIM with eta = 1 and all steps has the ancestral sampler's distribution: compare the two directly
    se_mean = S * math.sqrt(2 / N)
    assert abs(ancestral.mean().item() - ddim_eta1.mean().item()) < 5 * se_mean + 0.005
    assert abs(ancestral.var().item() - ddim_eta1.var().item()) / S**2 < 5 * math.sqrt(4 / N) + 0.03


def test_ddim_eta1_is_the_ancestral_sampler_with_beta_tilde():
    # Song eq. 16 with eta = 1 gives sigma^2 = beta~, and the mean coefficients coincide with Ho eq. 7,
    # so with the same random draws the two samplers agree path by path.
    gd = GaussianDiffusion(DiffusionConfig(num_timesteps=200, variance="beta_tilde"))
    model = exact_eps_model(gd)
    a = _sample(gd, model, seed=3, n=512)
    b = _sample(gd, model, seed=3, n=512, sampler="ddim", eta=1.0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    c = _sample(gd, model, seed=3, n=512, sampler="ddim", eta=0.0)
    assert (a - c).abs().max() > 0.1  # eta matters


def test_strided_sampling_and_timestep_sequence():
    gd = GaussianDiffusion(DiffusionConfig())
    tau = gd.timestep_sequence(50)
    assert len(tau) == 50 and tau[0] == 0 and tau[-1] == 999 and tau == sorted(tau)
    assert gd.timestep_sequence(None) == list(range(1000))
    out = gd.sample(exact_eps_model(gd), (N, 1), steps=100, generator=torch.Generator().manual_seed(4))
    assert out.nfe == 100
    assert abs(out.x.mean().item() - MU) < MEAN_TOL and abs(out.x.var().item() / S**2 - 1) < 0.1
    with pytest.raises(ValueError, match="sampler"):
        gd.sample(exact_eps_model(gd), (2, 1), sampler="euler")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- guidance


def _class_model(gd):
    """Class-conditional toy: class k has mean MEANS[k]; the null label (2) is the unconditional mean 0."""
    means = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)
    abar_all = gd.alphas_cumprod

    def model(x, t, y=None):
        y = torch.full((x.shape[0],), 2) if y is None else y
        abar = abar_all[t].to(x.dtype)[:, None]
        m = means[y][:, None].to(x.dtype)
        return (1 - abar).sqrt() * (x - abar.sqrt() * m) / (abar * S * S + 1 - abar)

    model.null_label = 2
    return model


def test_classifier_free_guidance_scales():
    gd = GaussianDiffusion(DiffusionConfig(num_timesteps=100))
    model = _class_model(gd)
    y = torch.tensor([0, 1] * 256)
    cond = _sample(gd, model, seed=5, n=512, y=y)
    cfg1 = _sample(gd, model, seed=5, n=512, guidance=ClassifierFreeGuidance(y=y, scale=1.0))
    torch.testing.assert_close(cfg1, cond, atol=1e-5, rtol=1e-5)  # scale 1: plain conditional
    cfg0 = _sample(gd, model, seed=5, n=512, guidance=ClassifierFreeGuidance(y=y, scale=0.0))
    uncond = _sample(gd, model, seed=5, n=512)
    torch.testing.assert_close(cfg0, uncond, atol=1e-5, rtol=1e-5)  # scale 0: unconditional
    cfg3 = _sample(gd, model, seed=5, n=512, sampler="ddim", guidance=ClassifierFreeGuidance(y=y, scale=3.0))
    sep = lambda x: (x[y == 1].mean() - x[y == 0].mean()).item()  # noqa: E731
    assert sep(cfg3) > sep(cond) + 0.5  # guidance pushes the classes apart
    out = gd.sample(model, (4, 1), guidance=ClassifierFreeGuidance(y=y[:4], scale=2.0))
    assert out.nfe == 2 * 100
    with pytest.raises(ValueError, match="guidance object"):
        gd.sample(model, (4, 1), guidance=ClassifierFreeGuidance(y=y[:4], scale=2.0), y=y[:4])


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_classifier_free_guidance_combine_equals_the_formula(scale):
    torch.manual_seed(0)
    model = UNet(
        UNetConfig(
            in_channels=1,
            image_size=8,
            base_channels=8,
            channel_mult=[1],
            num_res_blocks=1,
            attention_resolutions=[],
            num_groups=4,
            num_classes=3,
        )
    ).eval()
    for p in model.parameters():  # zero-initialised output layers would make every label look alike
        p.data.normal_(0, 0.2)
    x, t, y = torch.randn(6, 1, 8, 8), torch.randint(0, 100, (6,)), torch.tensor([0, 1, 2, 0, 1, 2])
    guidance = ClassifierFreeGuidance(y=y, scale=scale)
    with torch.no_grad():
        fast, ref = guidance.combine(model, x, t), guidance.combine_ref(model, x, t)
        cond, uncond = model(x, t, y=y), model(x, t, y=torch.full_like(y, model.null_label))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, uncond + scale * (cond - uncond), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the labels matter, so the check can fail
    assert guidance.evaluations == (1 if scale in (0.0, 1.0) else 2)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_classifier_guidance_moves_samples_towards_the_class(sampler):
    gd = GaussianDiffusion(DiffusionConfig(num_timesteps=100))
    model = exact_eps_model(gd)

    def classifier(x, t):  # p(y = 1 | x) = sigmoid(4 x): class 1 lives at large x
        return torch.cat([-2 * x, 2 * x], dim=1)  # (B, 2)

    y = torch.ones(2000, dtype=torch.long)
    plain = _sample(gd, model, seed=6, n=2000, sampler=sampler)
    zero = _sample(gd, model, seed=6, n=2000, sampler=sampler, guidance=ClassifierGuidance(classifier, y, 0.0))
    torch.testing.assert_close(zero, plain)
    guided = _sample(gd, model, seed=6, n=2000, sampler=sampler, guidance=ClassifierGuidance(classifier, y, 2.0))
    assert guided.mean().item() > plain.mean().item() + 0.05
    away = _sample(gd, model, seed=6, n=2000, sampler=sampler, guidance=ClassifierGuidance(classifier, 1 - y, 2.0))
    assert away.mean().item() < plain.mean().item() - 0.05


def test_drop_labels_and_label_dropout_in_training():
    y = torch.zeros(20_000, dtype=torch.long)
    dropped = drop_labels(y, 0.2, null_label=7, generator=torch.Generator().manual_seed(0))
    frac = (dropped == 7).float().mean().item()
    assert abs(frac - 0.2) < 5 * math.sqrt(0.2 * 0.8 / 20_000)
    assert set(dropped.unique().tolist()) == {0, 7}
    assert torch.equal(drop_labels(y, 0.0, 7), y)

    seen = {}

    def model(x, t, y=None):
        seen["y"] = y
        return torch.zeros_like(x)

    model.null_label = 7
    gd = GaussianDiffusion(DiffusionConfig(num_timesteps=50, p_uncond=0.5))
    gd.training_losses(model, torch.zeros(1000, 1), y=torch.zeros(1000, dtype=torch.long))
    assert 300 < (seen["y"] == 7).sum().item() < 700
