"""The interface the generative processes share (models/generative/process.py)."""

from __future__ import annotations

import pytest
import torch

from models.generative.ddpm import DiffusionConfig, GaussianDiffusion
from models.generative.process import GenerativeProcess, broadcast_to
from models.generative.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from models.generative.sde import VESDE, VPSDE, SDEConfig, build_sde

PROCESSES = {
    "ddpm": lambda: GaussianDiffusion(DiffusionConfig(num_timesteps=10)),
    "sde_vp": lambda: build_sde(SDEConfig(kind="vp")),
    "sde_ve": lambda: build_sde(SDEConfig(kind="ve", sigma_max=5.0)),
    "rectified_flow": lambda: RectifiedFlow(RectifiedFlowConfig()),
}


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_each_process_implements_the_protocol(name):
    assert isinstance(PROCESSES[name](), GenerativeProcess)


def test_the_protocol_rejects_an_object_without_prior():
    class NoPrior:
        def training_losses(self, model, x0, **cond): ...

        def sample(self, model, shape, **kw): ...

    assert not isinstance(NoPrior(), GenerativeProcess)


def test_broadcast_to_shapes_a_per_example_tensor_for_images():
    x = torch.zeros(3, 2, 4, 5, dtype=torch.float32)
    t = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    out = broadcast_to(t, x)
    assert out.shape == (3, 1, 1, 1)
    assert out.dtype == x.dtype
    assert torch.equal((out + x)[:, 1, 2, 3], t.float())  # example i gets value i, whatever the position
    assert broadcast_to(t, torch.zeros(3, 7)).shape == (3, 1)
    assert broadcast_to(t, torch.zeros(3)).shape == (3,)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_prior_has_the_shape_and_is_reproducible(name):
    process = PROCESSES[name]()
    shape = (4, 2, 3, 3)
    a = process.prior(shape, torch.Generator().manual_seed(0))
    b = process.prior(shape, torch.Generator().manual_seed(0))
    c = process.prior(shape, torch.Generator().manual_seed(1))
    assert a.shape == shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_prior_scale_is_each_process_noise_level():
    shape = (20_000,)
    unit = [
        GaussianDiffusion(DiffusionConfig(num_timesteps=10)),
        VPSDE(SDEConfig(kind="vp")),
        RectifiedFlow(RectifiedFlowConfig()),
    ]
    for process in unit:
        assert process.prior(shape, torch.Generator().manual_seed(0)).std().item() == pytest.approx(1.0, rel=0.05)
    ve = VESDE(SDEConfig(kind="ve", sigma_max=5.0))
    assert ve.prior(shape, torch.Generator().manual_seed(0)).std().item() == pytest.approx(5.0, rel=0.05)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_sample_starts_from_the_prior(name):
    """With the same seed, sample(x_T=prior(...)) and sample() take the same path: the samplers draw x_T
    through `prior`."""
    process = PROCESSES[name]()

    def model(x, t, **cond):
        return 0.1 * x

    sampler = {"ddpm": "ddim", "rectified_flow": "euler"}.get(name, "euler_maruyama")
    shape = (2, 1, 2, 2)
    g = torch.Generator().manual_seed(3)
    x_T = process.prior(shape, g, "cpu")
    explicit = process.sample(model, shape, steps=3, sampler=sampler, generator=g, x_T=x_T, device="cpu")
    implicit = process.sample(
        model, shape, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(3), device="cpu"
    )
    assert torch.equal(explicit.x, implicit.x)
