"""Normalizing flows: RealNVP's inverse and log-determinant, the CNF's likelihood on a Gaussian with a
closed form, exact trace against Hutchinson's estimator, and the bits-per-dimension accounting."""

import itertools
import math

import pytest
import torch

from models.generative.cnf import (
    CNFConfig,
    FlowMatching,
    MLPVectorField,
    divergence_exact,
    divergence_hutchinson,
    gaussian_ot_velocity,
)
from models.generative.realnvp import (
    RealNVP,
    RealNVPConfig,
    affine_preprocess,
    bits_per_dim,
    dequantize,
    logit_postprocess,
    logit_preprocess,
    quantize,
    realnvp_loss,
    squeeze,
    unsqueeze,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_realnvp(size: int = 4, channels: int = 1, num_scales: int = 1, spread: float = 0.3) -> RealNVP:
    """A RealNVP away from the identity: actnorm initialised on data, the zero output layers re-drawn."""
    torch.manual_seed(0)
    model = RealNVP(
        RealNVPConfig(in_channels=channels, image_size=size, num_scales=num_scales, hidden_channels=8, num_blocks=1)
    ).double()
    model.train()
    model(torch.randn(16, channels, size, size, dtype=torch.float64) * 2 + 0.5)  # data-dependent actnorm init
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".out." in name:
                p.normal_(0, spread)
    return model.eval()


def test_squeeze_inverts_and_keeps_patches_together():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    s = squeeze(x)
    assert s.shape == (2, 12, 2, 2)
    assert torch.equal(unsqueeze(s), x)
    assert sorted(s[0, :4, 0, 0].tolist()) == [0.0, 1.0, 4.0, 5.0]  # one 2x2 patch of channel 0


def test_realnvp_round_trip_x_z_x():
    model = tiny_realnvp(size=8, channels=1, num_scales=2)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    z, _ = model(x)
    assert z.shape == (5, 64)
    assert (model.inverse(z) - x).abs().max() < 1e-5
    # and in float32, the precision the stage trains in (at a trained model's scale of s and t)
    model32 = tiny_realnvp(size=8, channels=1, num_scales=2, spread=0.05).float()
    z32, _ = model32(x.float())
    assert (model32.inverse(z32) - x.float()).abs().max() < 1e-5


def test_realnvp_logdet_equals_autograd_jacobian():
    model = tiny_realnvp(size=4)
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    _, logdet = model(x)
    jac = torch.autograd.functional.jacobian(lambda v: model(v.reshape(1, 1, 4, 4))[0].reshape(-1), x.reshape(-1))
    sign, reference = torch.linalg.slogdet(jac)
    assert sign != 0
    assert logdet.item() == pytest.approx(reference.item(), abs=1e-8)


def test_realnvp_sample_shape_range_and_loss_decreases():
    torch.manual_seed(0)
    model = RealNVP(RealNVPConfig(in_channels=1, image_size=4, num_scales=1, hidden_channels=8, num_blocks=1))
    y = dequantize(torch.randint(0, 256, (32, 1, 4, 4)), torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(30):
        loss = realnvp_loss(model, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    s = model.sample(6, torch.Generator().manual_seed(1))
    assert s.shape == (6, 1, 4, 4) and s.min() >= 0 and s.max() <= 1


def test_actnorm_initialises_from_the_first_training_batch_and_inverts():
    from models.generative.realnvp import ActNorm

    norm = ActNorm(3)
    x = torch.randn(64, 3, 4, 4) * torch.tensor([2.0, 0.5, 3.0])[:, None, None] + 1.5
    y, logdet = norm(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
    assert logdet[0].item() == pytest.approx(16 * norm.log_scale.sum().item())
    assert torch.allclose(norm.inverse(y), x, atol=1e-5)
    assert int(norm.initialized) == 1 and "initialized" in norm.state_dict()  # a loaded model does not re-init


def test_realnvp_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        RealNVPConfig(image_size=12, num_scales=3)
    with pytest.raises(ValueError, match="logit_alpha"):
        RealNVPConfig(logit_alpha=0.5)


def test_bits_per_dim_of_the_uniform_density_is_8_bits():
    # A uniform density on [0, 1)^D puts 256^-D on every pixel cube: exactly 8 bits per dimension.
    # Through the affine map x = 2y - 1 the uniform density on [-1, 1)^D is 2^-D.
    D = 12
    y = torch.rand(3, D)
    x, logdet = affine_preprocess(y)
    assert bits_per_dim(torch.full((3,), -D * math.log(2.0)), logdet, D) == pytest.approx(torch.full((3,), 8.0))
    # Through the logit map, the density that pushes forward to uniform y is |dy/dx| = exp(-logdet).
    x, logdet = logit_preprocess(y, 0.05)
    assert torch.allclose(bits_per_dim(-logdet, logdet, D), torch.full((3,), 8.0), atol=1e-5)
    assert torch.allclose(logit_postprocess(x, 0.05), y, atol=1e-5)
    # logit log-det against autograd
    yy = y[0].double().requires_grad_(True)
    jac = torch.autograd.functional.jacobian(lambda v: logit_preprocess(v[None], 0.05)[0][0], yy)
    assert logit_preprocess(yy[None], 0.05)[1].item() == pytest.approx(torch.logdet(jac).item(), abs=1e-9)


def test_dequantize_and_quantize_invert():
    k = torch.randint(0, 256, (4, 1, 3, 3))
    y = dequantize(k, torch.Generator().manual_seed(0))
    assert y.min() >= 0 and y.max() < 1
    assert torch.equal(quantize(y), k.float())


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, var: float) -> torch.Tensor:
    d = x.shape[1]
    return -0.5 * ((x - mean) ** 2).sum(1) / var - 0.5 * d * math.log(2 * math.pi * var)


@pytest.mark.parametrize("solver, trace", [("rk4", "exact"), ("rk45", "exact"), ("rk4", "hutchinson")])
def test_cnf_log_likelihood_of_a_gaussian_is_analytic(solver, trace):
    mean, std, sigma_min = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.7, 0.01
    process = FlowMatching(
        CNFConfig(
            sigma_min=sigma_min,
            likelihood_solver=solver,
            likelihood_steps=40,
            sample_steps=40,
            rtol=0.0000001,
            atol=0.0000001,
            trace=trace,
        )
    )
    v = gaussian_ot_velocity(mean, std, sigma_min)
    x = mean + torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.3
    log_p, nfe = process.log_prob(None, x, velocity=v, generator=torch.Generator().manual_seed(0))
    expected = gaussian_log_prob(x, mean, sigma_min**2 + std**2)
    assert nfe > 0
    assert torch.allclose(log_p, expected, atol=1e-4)  # the divergence is constant in x: Hutchinson is exact


def test_cnf_samples_of_the_exact_field_have_the_target_moments():
    mean, std, sigma_min = torch.tensor([1.5, -0.5]), 0.7, 0.01
    process = FlowMatching(CNFConfig(sigma_min=sigma_min, sample_steps=20))
    x, nfe = process.sample(
        None, (4000, 2), torch.Generator().manual_seed(0), velocity=gaussian_ot_velocity(mean, std, sigma_min)
    )
    assert nfe == 80
    assert torch.allclose(x.mean(0), mean, atol=0.05)
    assert torch.allclose(x.std(0), torch.full((2,), math.hypot(std, sigma_min)), atol=0.05)


def test_hutchinson_is_unbiased_for_the_exact_trace():
    # Averaged over all 2^D Rademacher probes, eps^T J eps is exactly tr(J): the off-diagonal terms cancel.
    torch.manual_seed(0)
    net = MLPVectorField(3, hidden=16).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.full((5,), 0.3, dtype=torch.float64)
    v = net(x, t)
    exact = divergence_exact(v, x)
    probes = [torch.tensor(signs, dtype=torch.float64).expand(5, 3) for signs in itertools.product([-1, 1], repeat=3)]
    estimates = torch.stack([divergence_hutchinson(net(x, t), x, eps) for eps in probes])
    assert torch.allclose(estimates.mean(0), exact, atol=1e-10)
    assert estimates.std(0).max() > 1e-3  # a single probe is not exact: the test would notice a shortcut
    # ... and the exact trace is the Jacobian's
    jac = torch.autograd.functional.jacobian(lambda z: net(z[None], t[:1])[0], x[0].detach())
    assert exact[0].item() == pytest.approx(torch.trace(jac).item(), abs=1e-10)


def test_flow_matching_loss_is_positive_for_a_zero_field_and_trains_down():
    process = FlowMatching(CNFConfig(sigma_min=0.0, time_input_scale=1.0))
    x1 = torch.randn(8, 1, 4, 4)
    loss = process.training_losses(lambda x, t: torch.zeros_like(x), x1, generator=torch.Generator().manual_seed(0))
    assert loss["loss"] > 0.5
    net = MLPVectorField(2, hidden=32)
    x1 = torch.randn(256, 2) * 0.5 + 1
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    first = None
    for i in range(60):
        l = process.training_losses(net, x1, generator=torch.Generator().manual_seed(i))["loss"]
        first = first or l.item()
        opt.zero_grad()
        l.backward()
        opt.step()
    assert l.item() < first


def test_cnf_config_errors():
    with pytest.raises(ValueError, match="sigma_min"):
        CNFConfig(sigma_min=1.0)
    with pytest.raises(ValueError, match="steps"):
        CNFConfig(sample_steps=0)
