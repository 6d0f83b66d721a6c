"""models/generative/dit.py and models/generative/rectified_flow.py: adaLN-Zero identity at init, patches, position
embeddings,
QK-norm, config validation, the flow-matching target, logit-normal timesteps, Euler sampling of a Gaussian toy
with its exact velocity field, classifier-free guidance, a few training steps.

Toy: x_0 ~ N(MU, S^2), z_t = (1 - t) x_0 + t eps. (z_t, v = eps - x_0) is jointly Gaussian, so the marginal
velocity E[v | z_t = z] = -MU + (t - (1 - t) S^2) / ((1 - t)^2 S^2 + t^2) (z - (1 - t) MU), and integrating it
from N(0, 1) at t = 1 to t = 0 must return N(MU, S^2) up to discretisation and Monte Carlo error.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.generative.ddpm import ClassifierFreeGuidance, ClassifierGuidance
from models.generative.dit import DiT, DiTBlock, DiTConfig, patchify, position_embedding, unpatchify
from models.generative.rectified_flow import RectifiedFlow, RectifiedFlowConfig, shift_timesteps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MU, S = 1.5, 0.5
N = 20_000
MEAN_TOL = 5 * S / math.sqrt(N) + 0.01  # 5 standard errors + a discretisation allowance
VAR_TOL = 5 * math.sqrt(2 / (N - 1)) + 0.03  # on var / S^2


def tiny_dit_config(**overrides) -> DiTConfig:
    kwargs = dict(in_channels=2, image_size=4, num_classes=3, patch_size=2, hidden_size=32, depth=2, num_heads=2)
    return DiTConfig(**{**kwargs, **overrides})


def _randomise(model: DiT) -> None:
    """adaLN-Zero makes every output 0; perturb the zeroed layers so comparisons mean something."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def exact_velocity(scale: float = 1000.0, mu: float = MU, s: float = S):
    def velocity(z: torch.Tensor, t_in: torch.Tensor, **_) -> torch.Tensor:
        t = (t_in / scale).double()[:, None]  # (B, 1)
        var = (1 - t) ** 2 * s * s + t * t
        return (-mu + (t - (1 - t) * s * s) / var * (z.double() - (1 - t) * mu)).to(z.dtype)

    return velocity


# ---------------------------------------------------------------------------------------- the DiT


def test_dit_block_is_identity_and_dit_outputs_zero_at_init():
    torch.manual_seed(0)
    cfg = tiny_dit_config(out_channels=3)
    model = DiT(cfg)
    x, c = torch.randn(5, cfg.num_patches, cfg.hidden_size), torch.randn(5, cfg.hidden_size)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    standalone = DiTBlock(32, 2, 4.0, qk_norm=False)
    torch.nn.init.zeros_(standalone.adaLN_modulation[-1].weight)
    torch.nn.init.zeros_(standalone.adaLN_modulation[-1].bias)
    assert torch.equal(standalone(x, c), x)
    out = model(torch.randn(5, 2, 4, 4), torch.rand(5) * 1000, torch.tensor([0, 1, 2, 3, 0]))
    assert out.shape == (5, 3, 4, 4) and torch.equal(out, torch.zeros_like(out))
    # the final linear gets a gradient at init, so training can leave the zero point
    loss = (model(torch.randn(5, 2, 4, 4), torch.rand(5)) - 1).pow(2).mean()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_dit_labels_null_label_and_shapes():
    torch.manual_seed(0)
    model = DiT(tiny_dit_config())
    _randomise(model)
    x, t = torch.randn(4, 2, 4, 4), torch.rand(4) * 1000
    assert model.null_label == 3
    null = torch.full((4,), 3, dtype=torch.long)
    torch.testing.assert_close(model(x, t), model(x, t, null))
    assert not torch.allclose(model(x, t, torch.zeros(4, dtype=torch.long)), model(x, t, null))
    torch.testing.assert_close(model(x, torch.tensor(5.0)), model(x, torch.full((4,), 5.0)))
    with pytest.raises(ValueError, match="expected x of shape"):
        model(torch.randn(4, 2, 8, 8), t)
    with pytest.raises(ValueError, match="expected t of shape"):
        model(x, torch.rand(3))
    uncond = DiT(tiny_dit_config(num_classes=0))
    with pytest.raises(AttributeError, match="null_label"):  # nn.Module re-raises it by name
        _ = uncond.null_label
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, torch.zeros(4, dtype=torch.long))
    # the fixed position table is rebuilt from the config, not stored
    assert "pos_embed" not in model.state_dict() and not any("pos_embed" in n for n, _ in model.named_parameters())
    clone = DiT(tiny_dit_config())
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone(x, t), model(x, t), rtol=0, atol=0)


def test_patchify_round_trip_and_patch_embedding_order():
    x = torch.randn(3, 5, 8, 8)
    tokens = patchify(x, 2)  # (3, 16, 20)
    assert tokens.shape == (3, 16, 2 * 2 * 5)
    assert torch.equal(unpatchify(tokens, 2, 5), x)
    # token 1 is the patch at (row 0, col 1), flattened as (p_row, p_col, channel)
    assert torch.equal(tokens[:, 1].reshape(3, 2, 2, 5), x[:, :, 0:2, 2:4].permute(0, 2, 3, 1))
    # the stride-p conv is a linear map of exactly these tokens
    model = DiT(tiny_dit_config(in_channels=5, image_size=8))
    w = model.x_embedder.weight  # (D, C, p, p)
    linear = tokens @ w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T + model.x_embedder.bias  # (3, 16, D)
    torch.testing.assert_close(model.x_embedder(x).flatten(2).transpose(1, 2), linear, rtol=1e-5, atol=1e-5)


def test_position_embeddings_1d_and_2d():
    D, g = 16, 4
    pe2, pe1 = position_embedding("2d", D, g), position_embedding("1d", D, g)
    assert pe2.shape == pe1.shape == (1, g * g, D)
    assert not torch.allclose(pe2, pe1)
    rows = pe2[0].reshape(g, g, D)  # (row, col, D)
    # 2D: the first half encodes the row only, the second half the column only
    assert torch.allclose(rows[:, 0, : D // 2], rows[:, 3, : D // 2]) and torch.allclose(
        rows[0, :, D // 2 :], rows[3, :, D // 2 :]
    )
    assert not torch.allclose(rows[0, 0, : D // 2], rows[1, 0, : D // 2])
    # 1D: one sinusoid over the flattened patch index, so patch 0 is [sin 0, cos 0] = [0, 1]
    torch.testing.assert_close(pe1[0, 0], torch.cat([torch.zeros(D // 2), torch.ones(D // 2)]))
    assert (pe1[0, 1:] != pe1[0, :-1]).any(dim=1).all()
    model = DiT(tiny_dit_config(pos_embed="1d"))
    assert torch.equal(model.pos_embed, position_embedding("1d", 32, 2))


def test_qk_norm_makes_attention_invariant_to_query_scale():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    for qk_norm in (True, False):
        torch.manual_seed(1)
        block = DiTBlock(32, 2, 4.0, qk_norm=qk_norm)
        attn = block.attn
        out = attn(x)
        with torch.no_grad():
            attn.qkv.weight[:32] *= 10.0  # the query rows
            attn.qkv.bias[:32] *= 10.0
        scaled = attn(x)
        if qk_norm:
            assert isinstance(attn.q_norm, torch.nn.RMSNorm) and isinstance(attn.k_norm, torch.nn.RMSNorm)
            torch.testing.assert_close(scaled, out, rtol=1e-4, atol=1e-5)
            q, k, _ = attn.qk(x)  # (B, nh, N, hd): unit RMS per head
            torch.testing.assert_close(q.pow(2).mean(-1), torch.ones(2, 2, 6), rtol=1e-3, atol=1e-3)
        else:
            assert not torch.allclose(scaled, out, atol=1e-3)
    for qk_norm in (True, False):
        model = DiT(tiny_dit_config(qk_norm=qk_norm))
        _randomise(model)
        assert model(torch.randn(2, 2, 4, 4), torch.rand(2)).isfinite().all()


def test_dit_config_validation_names_the_field():
    for kwargs, field in [
        ({"patch_size": 3}, "patch_size"),
        ({"num_heads": 5}, "num_heads"),
        ({"hidden_size": 34}, "hidden_size"),  # not divisible by 4 for the 2D table
        ({"pos_embed": "3d"}, "pos_embed"),
        ({"depth": 0}, "depth"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"out_channels": -1}, "out_channels"),
        ({"num_classes": -1}, "num_classes"),
        ({"max_period": 1.0}, "max_period"),
        ({"qk_norm": "yes"}, "qk_norm"),
        ({"in_channels": 0}, "in_channels"),
    ]:
        with pytest.raises(ValueError, match=field):
            tiny_dit_config(**kwargs)
    assert DiTConfig(hidden_size=34, num_heads=2, pos_embed="1d").hidden_size == 34
    assert DiTConfig().in_channels == 4 and DiTConfig().image_size == 8 and DiTConfig().num_classes == 10


def test_rf_config_validation_names_the_field():
    for kwargs, field in [
        ({"timestep_sampling": "cosine"}, "timestep_sampling"),
        ({"logit_std": 0.0}, "logit_std"),
        ({"time_input_scale": 0.0}, "time_input_scale"),
        ({"p_uncond": 1.0}, "p_uncond"),
        ({"num_steps": 0}, "num_steps"),
        ({"sample_shift": 0.0}, "sample_shift"),
    ]:
        with pytest.raises(ValueError, match=field):
            RectifiedFlowConfig(**kwargs)


# ---------------------------------------------------------------------------------------- the loss


def test_loss_target_is_the_straight_path_velocity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 2, 4, 4, generator=g), torch.randn(6, 2, 4, 4, generator=g)
    t = torch.rand(6, generator=g)
    rf = RectifiedFlow(RectifiedFlowConfig(p_uncond=0.0))
    seen = {}

    def oracle(z: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        seen["z"], seen["t_in"] = z, t_in
        return noise - x0

    out = rf.training_losses(oracle, x0, t=t, noise=noise)
    assert out["loss"].item() == 0.0 and out["mse_per_sample"].shape == (6,)
    tb = t[:, None, None, None]
    torch.testing.assert_close(seen["z"], (1 - tb) * x0 + tb * noise)
    torch.testing.assert_close(seen["t_in"], t * 1000)
    zero = rf.training_losses(lambda z, t_in: torch.zeros_like(z), x0, t=t, noise=noise)
    by_hand = ((noise - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(zero["mse_per_sample"], by_hand)
    torch.testing.assert_close(zero["loss"], by_hand.mean())
    # endpoints: z_0 is the data, z_1 the noise
    torch.testing.assert_close(rf.interpolate(x0, torch.zeros(6), noise), x0)
    torch.testing.assert_close(rf.interpolate(x0, torch.ones(6), noise), noise)


def test_label_dropout_uses_the_null_label():
    class Recorder(torch.nn.Module):
        null_label = 7

        def forward(self, z, t_in, y=None):
            self.y = y
            return torch.zeros_like(z)

    model, y = Recorder(), torch.zeros(2000, dtype=torch.long)
    x0 = torch.zeros(2000, 1)
    RectifiedFlow(RectifiedFlowConfig(p_uncond=0.25)).training_losses(
        model, x0, y=y, generator=torch.Generator().manual_seed(0)
    )
    assert set(model.y.tolist()) == {0, 7} and (model.y == 7).float().mean().item() == pytest.approx(0.25, abs=0.04)
    RectifiedFlow(RectifiedFlowConfig(p_uncond=0.0)).training_losses(model, x0, y=y)
    assert torch.equal(model.y, y)
    RectifiedFlow(RectifiedFlowConfig(p_uncond=0.5)).training_losses(model, x0)
    assert model.y is None


def test_timestep_samplers_distribution():
    n = 200_000
    g = torch.Generator().manual_seed(0)
    rf = RectifiedFlow(RectifiedFlowConfig(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8))
    t = rf.sample_timesteps(n, g)
    assert t.shape == (n,) and (t > 0).all() and (t < 1).all()
    logit = torch.logit(t.double())
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.005)  # sigmoid(m)
    u = RectifiedFlow(RectifiedFlowConfig(timestep_sampling="uniform")).sample_timesteps(n, g)
    assert (u >= 0).all() and (u < 1).all()
    assert u.mean().item() == pytest.approx(0.5, abs=0.005) and u.var().item() == pytest.approx(1 / 12, abs=0.002)
    # the default draws from the logit-normal in training_losses
    seen = {}

    def record(z: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        seen["t"] = t_in
        return torch.zeros_like(z)

    RectifiedFlow(RectifiedFlowConfig(time_input_scale=1.0)).training_losses(record, torch.zeros(n, 1), generator=g)
    assert torch.logit(seen["t"].double()).std().item() == pytest.approx(1.0, abs=0.01)


# ---------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_with_exact_velocity_recovers_the_gaussian(shift: float):
    rf = RectifiedFlow(RectifiedFlowConfig(sample_shift=shift))
    out = rf.sample(exact_velocity(), (N, 1), steps=200, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 200 and out.x.shape == (N, 1)
    assert abs(out.x.mean().item() - MU) < MEAN_TOL, out.x.mean().item()
    assert abs(out.x.var().item() / S**2 - 1) < VAR_TOL, out.x.var().item()
    # too few steps is visibly off (the check has power)
    coarse = rf.sample(exact_velocity(), (N, 1), steps=2, generator=torch.Generator().manual_seed(0)).x
    assert abs(coarse.var().item() / S**2 - 1) > VAR_TOL


def test_time_grid_and_shift():
    rf = RectifiedFlow(RectifiedFlowConfig(sample_shift=3.0))
    grid = rf.time_grid(10)
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0 and (grid[1:] < grid[:-1]).all()
    assert (grid[1:-1] > torch.linspace(1, 0, 11, dtype=torch.float64)[1:-1]).all()  # shifted towards noise
    torch.testing.assert_close(shift_timesteps(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    assert RectifiedFlow(RectifiedFlowConfig()).sample(exact_velocity(), (3, 1)).nfe == 50  # num_steps default


def test_sample_rejects_other_samplers_and_classifier_guidance():
    rf = RectifiedFlow(RectifiedFlowConfig())
    with pytest.raises(ValueError, match="euler"):
        rf.sample(exact_velocity(), (2, 1), sampler="ddim")
    with pytest.raises(ValueError, match="classifier guidance"):
        rf.sample(exact_velocity(), (2, 1), guidance=ClassifierGuidance(lambda x, t: x, torch.zeros(2).long(), 1.0))
    with pytest.raises(ValueError, match="steps"):
        rf.sample(exact_velocity(), (2, 1), steps=0)


def test_classifier_free_guidance_scale_zero_is_unconditional_and_only_guidance_doubles_nfe():
    torch.manual_seed(0)
    model = DiT(tiny_dit_config()).eval()
    _randomise(model)
    rf = RectifiedFlow(RectifiedFlowConfig())
    x_T = torch.randn(4, 2, 4, 4)
    y = torch.tensor([0, 1, 2, 0])
    uncond = rf.sample(model, (4, 2, 4, 4), steps=3, x_T=x_T)
    guided0 = rf.sample(model, (4, 2, 4, 4), steps=3, x_T=x_T, guidance=ClassifierFreeGuidance(y=y, scale=0.0))
    cond = rf.sample(model, (4, 2, 4, 4), steps=3, x_T=x_T, y=y)
    guided1 = rf.sample(model, (4, 2, 4, 4), steps=3, x_T=x_T, guidance=ClassifierFreeGuidance(y=y, scale=1.0))
    guided2 = rf.sample(model, (4, 2, 4, 4), steps=3, x_T=x_T, guidance=ClassifierFreeGuidance(y=y, scale=2.0))
    # At scale 0 and 1 one half of the guided batch has weight zero and is not evaluated.
    assert uncond.nfe == cond.nfe == guided0.nfe == guided1.nfe == 3 and guided2.nfe == 6
    torch.testing.assert_close(guided0.x, uncond.x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided1.x, cond.x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(uncond.x, cond.x)


# ---------------------------------------------------------------------------------------- training


def test_a_few_steps_of_a_tiny_dit_reduce_the_loss():
    torch.manual_seed(0)
    model = DiT(tiny_dit_config(in_channels=1, num_classes=2, depth=1))
    rf = RectifiedFlow(RectifiedFlowConfig(p_uncond=0.1))
    # two classes: a constant +1 or -1 image, so the velocity depends on y
    y = torch.arange(64) % 2
    x0 = (2.0 * y - 1).float()[:, None, None, None].expand(64, 1, 4, 4).contiguous()

    def val_loss() -> float:
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return rf.training_losses(model, x0, y=y, generator=g)["loss"].item()

    before = val_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss = rf.training_losses(model, x0, y=y, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_loss()
    assert after < 0.6 * before, (before, after)
