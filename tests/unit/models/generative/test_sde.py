"""models/generative/sde.py: VP and VE SDEs on a 1-D Gaussian toy whose perturbed marginals have a closed-form score.

Toy: x_0 ~ N(MU, S^2), p_0t(x_t | x_0) = N(a(t) x_0, std(t)^2), so p_t = N(a MU, a^2 S^2 + std^2) and
grad log p_t(x) = -(x - a MU) / (a^2 S^2 + std^2). With it the reverse SDE, the PC sampler and the
probability-flow ODE must return N(MU, S^2) up to discretisation and Monte Carlo error.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.generative.ddpm import ClassifierFreeGuidance, ClassifierGuidance
from models.generative.sde import VESDE, VPSDE, SDEConfig, build_sde

MU, S = 1.5, 0.5
N = 20_000
MEAN_TOL = 5 * S / math.sqrt(N) + 0.005  # 5 standard errors + a discretisation allowance
VAR_TOL = 5 * math.sqrt(2 / (N - 1)) + 0.02  # on var / S^2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def exact_score(sde, mu: float = MU, s: float = S):
    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, std = sde.marginal_coeffs(t)
        a, std = a[:, None], std[:, None]  # (B, 1)
        return -(x - a * mu) / (a * a * s * s + std * std)

    return score


def _assert_target(x: torch.Tensor, var_slack: float = 0.0) -> None:
    assert abs(x.mean().item() - MU) < MEAN_TOL, x.mean().item()
    assert abs(x.var().item() / S**2 - 1) < VAR_TOL + var_slack, x.var().item()


@pytest.fixture(scope="module", params=["vp", "ve"])
def sde(request):
    return build_sde(SDEConfig(kind=request.param))


# ---------------------------------------------------------------------------------------- the SDEs


def test_marginals_match_the_sde():
    """d/dt of the marginal variance equals 2 f-coefficient * var + g^2 (the moment ODE of eq. 5)."""
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-5
    for sde in (build_sde(SDEConfig(kind="vp")), build_sde(SDEConfig(kind="ve"))):
        a, std = sde.marginal_coeffs(t)
        a_h, std_h = sde.marginal_coeffs(t + h)
        a_l, std_l = sde.marginal_coeffs(t - h)
        x = torch.ones(7, 1, dtype=torch.float64)
        f_coef = sde.drift(x, t)[:, 0]  # drift is linear in x: f(x, t) = f_coef(t) x
        torch.testing.assert_close((a_h - a_l) / (2 * h), f_coef * a, rtol=1e-5, atol=1e-8)
        dvar = (std_h**2 - std_l**2) / (2 * h)
        torch.testing.assert_close(dvar, 2 * f_coef * std**2 + sde.diffusion(t) ** 2, rtol=1e-5, atol=1e-8)


def test_schedules_of_the_paper():
    vp = VPSDE(SDEConfig(kind="vp"))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(vp.beta(t), torch.tensor([0.1, 10.05, 20.0], dtype=torch.float64))
    a1, std1 = vp.marginal_coeffs(torch.tensor([1.0], dtype=torch.float64))
    assert a1.item() == pytest.approx(math.exp(-0.25 * 19.9 - 0.05)) and std1.item() == pytest.approx(1.0, abs=1e-4)
    ve = VESDE(SDEConfig(kind="ve"))
    torch.testing.assert_close(ve.sigma(t), torch.tensor([0.01, math.sqrt(0.01 * 50), 50.0], dtype=torch.float64))
    assert vp.sample_eps == 1e-3 and ve.sample_eps == 1e-5
    assert ve.prior_sample((10_000,), torch.Generator().manual_seed(0)).std().item() == pytest.approx(50, rel=0.05)


def test_config_validation_names_the_field():
    for kwargs, field in [
        ({"kind": "subvp"}, "kind"),
        ({"beta_min": 30.0}, "beta_min"),
        ({"sigma_min": 0.0}, "sigma_min"),
        ({"num_steps": 0}, "num_steps"),
        ({"parameterization": "x0"}, "parameterization"),
        ({"snr": 0.0}, "snr"),
        ({"predictor": "ddim"}, "predictor"),
    ]:
        with pytest.raises(ValueError, match=field):
            SDEConfig(**kwargs)


# ---------------------------------------------------------------------------------------- samplers


def test_reverse_sde_euler_maruyama_recovers_target(sde):
    out = sde.sample_score(
        exact_score(sde), (N, 1), sampler="euler_maruyama", steps=500, generator=torch.Generator().manual_seed(0)
    )
    assert out.nfe == 500
    _assert_target(out.x)


def test_predictor_corrector_recovers_target(sde):
    # The Langevin corrector with the paper's snr = 0.16 inflates a Gaussian's variance by about
    # snr^2 = 2.6% (unadjusted Langevin, step 2 alpha snr^2 var): allowed for.
    out = sde.sample_score(
        exact_score(sde), (N, 1), sampler="pc", steps=200, generator=torch.Generator().manual_seed(1)
    )
    assert out.nfe == 200 * 2
    _assert_target(out.x, var_slack=0.03)


@pytest.mark.parametrize("predictor", ["reverse_diffusion", "euler_maruyama"])
def test_predictors_alone_recover_target(sde, predictor):
    # without the corrector (which would mask predictor errors) each predictor must be right on its own
    bare = type(sde)(SDEConfig(kind=sde.cfg.kind, corrector_steps=0, predictor=predictor))
    out = bare.sample_score(
        exact_score(bare), (N, 1), sampler="pc", steps=300, generator=torch.Generator().manual_seed(7)
    )
    assert out.nfe == 300
    _assert_target(out.x)


def test_probability_flow_ode_recovers_target_and_flow_map(sde):
    # The prior N(0, prior_std^2) is not exactly p_1 (its mean is a(1) MU, not 0); the deterministic flow
    # would carry that offset to t = eps, so start from the exact p_1 to test the solver itself.
    t1 = torch.ones(1, dtype=torch.float64)
    a1, std1 = sde.marginal_coeffs(t1)
    var1 = (a1**2 * S**2 + std1**2).item()
    g = torch.Generator().manual_seed(2)
    x_T = a1.item() * MU + math.sqrt(var1) * torch.randn(N, 1, generator=g, dtype=torch.float64)
    out = sde.sample_score(exact_score(sde), (N, 1), sampler="ode", x_T=x_T)
    assert out.nfe > 0 and out.x.dtype == torch.float64
    _assert_target(out.x)
    # the exact flow map of a Gaussian: standardised coordinates are preserved
    te = torch.full((1,), sde.sample_eps, dtype=torch.float64)
    ae, stde = sde.marginal_coeffs(te)
    vare = (ae**2 * S**2 + stde**2).item()
    expected = ae.item() * MU + (x_T - a1.item() * MU) * math.sqrt(vare / var1)
    torch.testing.assert_close(out.x, expected, atol=2e-3, rtol=0)
    # from the prior itself it still lands close
    prior = sde.sample_score(exact_score(sde), (N, 1), sampler="ode", generator=torch.Generator().manual_seed(3))
    assert abs(prior.x.mean().item() - MU) < 0.05


def test_wrong_score_is_detected(sde):
    """The recovery tests can fail: a score for the wrong data variance gives the wrong sample variance."""
    out = sde.sample_score(
        exact_score(sde, s=0.8), (N, 1), sampler="euler_maruyama", steps=200, generator=torch.Generator().manual_seed(4)
    )
    assert abs(out.x.var().item() / S**2 - 1) > 10 * VAR_TOL


# ---------------------------------------------------------------------------------------- with a network


class _ExactNoiseNet:
    """A 'network' in the noise parameterisation: predicts z = -std * score at the time input t * 999."""

    def __init__(self, sde, scale: float = 999.0):
        self.sde, self.scale, self.score = sde, scale, exact_score(sde)
        self.null_label = 2

    def __call__(self, x, t_in, y=None):
        t = t_in / self.scale
        std = self.sde.marginal_coeffs(t)[1][:, None]
        out = -std * self.score(x, t)
        if y is not None:  # a stand-in conditional branch: class 1 shifts the prediction
            out = out - (y == 1).to(x.dtype)[:, None] * 0.1
        return out


def test_network_sampling_interface_and_loss(sde):
    net = _ExactNoiseNet(sde)
    out = sde.sample(net, (N, 1), steps=300, generator=torch.Generator().manual_seed(5))
    _assert_target(out.x)
    # the noise-parameterised DSM loss of the exact predictor at fixed t is 1 - std^2 / var_t
    g = torch.Generator().manual_seed(6)
    x0 = MU + S * torch.randn(N, 1, generator=g, dtype=torch.float64)
    t = torch.full((N,), 0.3, dtype=torch.float64)
    loss = sde.training_losses(net, x0, t=t, generator=g)["loss"].item()
    a, std = sde.marginal_coeffs(t[:1])
    expected = (1 - std**2 / (a**2 * S**2 + std**2)).item()
    assert abs(loss - expected) < 5 * expected * math.sqrt(2 / N) + 1e-9


def test_score_parameterization_loss_equals_noise_one():
    vp_noise = build_sde(SDEConfig(kind="vp"))
    vp_score = build_sde(SDEConfig(kind="vp", parameterization="score"))
    net = _ExactNoiseNet(vp_noise)

    def score_net(x, t_in):
        std = vp_noise.marginal_coeffs(t_in / 999.0)[1][:, None]
        return -net(x, t_in) / std

    x0 = torch.randn(64, 1, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    noise = torch.randn(64, 1, dtype=torch.float64)
    a = vp_noise.training_losses(net, x0, t=t, noise=noise)["loss"]
    b = vp_score.training_losses(score_net, x0, t=t, noise=noise)["loss"]
    torch.testing.assert_close(a, b)


def test_guidance_through_the_score_fn():
    sde = build_sde(SDEConfig(kind="vp"))
    net = _ExactNoiseNet(sde)
    x = torch.randn(8, 1, dtype=torch.float64)
    t = torch.full((8,), 0.4, dtype=torch.float64)
    y = torch.ones(8, dtype=torch.long)
    plain = sde.score_fn(net)(x, t)
    cond = sde.score_fn(net, y=y)(x, t)
    torch.testing.assert_close(sde.score_fn(net, ClassifierFreeGuidance(y, 1.0))(x, t), cond)
    null = sde.score_fn(net, y=torch.full_like(y, 2))(x, t)
    torch.testing.assert_close(sde.score_fn(net, ClassifierFreeGuidance(y, 0.0))(x, t), null)

    def classifier(x_in, t_in):
        return torch.cat([-x_in, x_in], dim=1)  # d/dx log p(y=1 | x) = 2 sigmoid(-2x)

    guided = sde.score_fn(net, ClassifierGuidance(classifier, y, 3.0))(x, t)
    torch.testing.assert_close(guided - plain, 3.0 * 2 * torch.sigmoid(-2 * x))
    out = sde.sample(net, (4, 1), steps=5, sampler="euler_maruyama", guidance=ClassifierFreeGuidance(y[:4], 2.0))
    assert out.nfe == 10 and torch.isfinite(out.x).all()
