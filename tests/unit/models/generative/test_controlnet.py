"""ControlNet on a tiny UNet: exact identity at initialisation, only the ControlNet trains, the edge operator
finds a square's border and nothing else, F1 of edge maps, config validation."""

from __future__ import annotations

import pytest
import torch

from models.generative.controlnet import ControlledUNet, ControlNet, ControlNetConfig, canny_edges, edge_f1
from models.generative.ddpm import DiffusionConfig, GaussianDiffusion
from models.generative.unet import UNet, UNetConfig
from tasks.training import TrainConfig, train


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    base = UNet(
        UNetConfig(
            in_channels=1,
            image_size=8,
            base_channels=8,
            channel_mult=[1, 2],
            num_res_blocks=1,
            attention_resolutions=[4],
            num_heads=2,
            dropout=0.0,
            num_groups=4,
            num_classes=3,
        )
    )
    # A trained base has nonzero output convs; randomise every parameter so the identity is not trivial.
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)
    return base


def square(size: int = 16, lo: int = 4, hi: int = 12) -> torch.Tensor:
    x = -torch.ones(1, 1, size, size)
    x[..., lo:hi, lo:hi] = 1.0
    return x


def test_controlled_model_equals_the_base_at_initialisation():
    base = tiny_unet()
    model = ControlledUNet(base, ControlNet(base, ControlNetConfig(hint_channels=[4])))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 999]), torch.tensor([0, 2, 3])
    cond = (torch.rand(3, 1, 8, 8) > 0.5).float()
    with torch.no_grad():
        assert torch.equal(model(x, t, y=y, cond=cond), base(x, t, y))
        assert torch.equal(model(x, t, y=y), base(x, t, y))  # cond=None: the base alone
        assert torch.equal(base(x, t, y, residuals=None), base(x, t, y))


def test_training_changes_only_the_controlnet():
    base = tiny_unet()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    controlnet = ControlNet(base, ControlNetConfig(hint_channels=[4]))
    start = {k: v.clone() for k, v in controlnet.state_dict().items()}
    model = ControlledUNet(base, controlnet)
    assert all(not p.requires_grad for p in base.parameters())
    process = GaussianDiffusion(DiffusionConfig(num_timesteps=50, p_uncond=0.1))
    x0, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randint(0, 3, (16,))
    edges = canny_edges(x0)
    cfg = TrainConfig(
        steps=4,
        batch_size=8,
        lr=1e-2,
        min_lr_ratio=1.0,
        warmup_steps=0,
        weight_decay=0.0,
        beta1=0.9,
        beta2=0.999,
        grad_clip=1.0,
        eval_every=4,
        checkpoint_every=4,
        log_every=1,
        precision="fp32",
    )

    def next_batch(g):
        i = torch.randint(0, 16, (8,), generator=g)
        return x0[i], y[i], edges[i]

    train(
        model,
        cfg,
        next_batch=next_batch,
        loss_fn=lambda m, b: process.training_losses(m, b[0], y=b[1], cond=b[2])["loss"],
        evaluate=lambda m: {},
        items_per_batch=8,
        seed=0,
        device=torch.device("cpu"),
    )
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = [k for k, v in controlnet.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.startswith("zero_convs") for k in changed) and any(k.startswith("hint") for k in changed)
    # the zero convolutions have moved: the condition now changes the output
    c = torch.zeros(2, 1, 8, 8)
    with torch.no_grad():
        assert not torch.equal(
            model(x0[:2], torch.tensor([5, 5]), y=y[:2], cond=c), model(x0[:2], torch.tensor([5, 5]), y=y[:2])
        )


def test_edges_of_a_square_lie_on_its_border_only():
    edges = canny_edges(square())[0, 0]
    assert edges.sum() > 0 and set(edges.unique().tolist()) <= {0.0, 1.0}
    rows, cols = torch.nonzero(edges, as_tuple=True)
    # every edge pixel is on the border ring: one pixel either side of the step
    on_ring = (
        (rows >= 3)
        & (rows <= 12)
        & (cols >= 3)
        & (cols <= 12)
        & ((rows <= 4) | (rows >= 11) | (cols <= 4) | (cols >= 11))
    )
    assert bool(on_ring.all())
    # all four sides are found, one pixel thick (non-maximum suppression)
    for side in (edges[3:5, 6:10], edges[11:13, 6:10], edges[6:10, 3:5], edges[6:10, 11:13]):
        assert side.sum() == 4
    assert canny_edges(torch.zeros(2, 1, 16, 16)).sum() == 0  # a flat image has none


def test_edge_f1():
    e = canny_edges(square())
    assert edge_f1(e, e).item() == pytest.approx(1.0)
    shifted = torch.roll(e, 1, dims=-1)
    assert edge_f1(shifted, e, tolerance=1).item() == pytest.approx(1.0)
    assert edge_f1(shifted, e, tolerance=0).item() < 0.6
    assert edge_f1(torch.zeros_like(e), e).item() == 0.0
    assert edge_f1(torch.zeros_like(e), torch.zeros_like(e)).item() == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hint_channels": []},
        {"hint_channels": [0]},
        {"edge_low": 0.5, "edge_high": 0.2},
        {"edge_low": 0.0},
        {"conditioning_scale": -1.0},
        {"cond_channels": 0},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        ControlNetConfig(**kwargs)


def test_residual_count_and_condition_shape_are_checked():
    base = tiny_unet()
    net = ControlNet(base, ControlNetConfig(hint_channels=[4]))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="residuals"):
        base(x, t, residuals=[torch.zeros(1)])
    with pytest.raises(ValueError, match="cond"):
        net(x, t, None, torch.zeros(2, 1, 4, 4))
