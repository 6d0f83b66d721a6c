"""Rectified flow (Liu, Gong, Liu 2023, "Flow Straight and Fast"; Lipman et al. 2023, "Flow Matching") in the
convention and with the timestep sampling of SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis").

Path, t in [0, 1] (t = 0 data, t = 1 noise; SD3 Section 2 and 3.1):
    z_t = (1 - t) x_0 + t eps,   eps ~ N(0, I)                                                     (SD3 eq. 2, 13)
    the conditional velocity dz_t/dt = eps - x_0 is the regression target v                        (SD3 Section 2)
    L = E_{t, x_0, eps} || v_theta(z_t, t) - (eps - x_0) ||^2        (conditional flow matching, SD3 Section 2)
Timestep sampling pi(t) (SD3 Section 3.1): "uniform", or "logit_normal" (SD3 eq. 19):
    t = sigmoid(u), u ~ N(logit_mean, logit_std^2); the best setting in SD3's sweep is (0, 1).
Sampling integrates the ODE dz/dt = v_theta(z, t) from t = 1 (z_1 ~ N(0, I)) down to t = 0 with Euler steps on
a uniform grid, optionally shifted towards t = 1 for higher resolutions (SD3 eq. 23):
    t' = s t / (1 + (s - 1) t).

The network's time input is t * time_input_scale, so a network built for integer DDPM steps sees 0..1000.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from models.generative.ddpm import ClassifierGuidance, Guidance, SampleOutput, drop_labels, guided_output, infer_device
from models.generative.process import broadcast_to

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class RectifiedFlowConfig:
    timestep_sampling: Literal["uniform", "logit_normal"] = "logit_normal"  # pi(t) in training
    logit_mean: float = 0.0  # logit-normal location m (SD3's best: 0)
    logit_std: float = 1.0  # logit-normal scale s (SD3's best: 1)
    time_input_scale: float = 1000.0  # the network sees t * scale
    p_uncond: float = 0.1  # classifier-free guidance training: probability of the null label
    num_steps: int = 50  # Euler steps when `sample(steps=None)`
    sample_shift: float = 1.0  # SD3 eq. 23 timestep shift of the sampling grid; 1 = uniform

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLERS:
            raise ValueError(
                f"timestep_sampling must be one of {sorted(TIMESTEP_SAMPLERS)}, got {self.timestep_sampling!r}"
            )
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if not self.time_input_scale > 0:
            raise ValueError(f"time_input_scale must be > 0, got {self.time_input_scale}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not self.sample_shift > 0:
            raise ValueError(f"sample_shift must be > 0, got {self.sample_shift}")


# ----------------------------------------------------------------------------------------------------
# Timestep sampling pi(t)


def uniform_timesteps(cfg: RectifiedFlowConfig, n: int, generator: torch.Generator | None, device) -> Tensor:
    return torch.rand((n,), generator=generator, device=device)  # (n,) ~ U(0, 1)


def logit_normal_timesteps(cfg: RectifiedFlowConfig, n: int, generator: torch.Generator | None, device) -> Tensor:
    u = torch.randn((n,), generator=generator, device=device)  # (n,) ~ N(0, 1)
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * u)  # (n,) in (0, 1)                    (SD3 eq. 19)


TIMESTEP_SAMPLERS: dict[str, Callable[[RectifiedFlowConfig, int, torch.Generator | None, object], Tensor]] = {
    "uniform": uniform_timesteps,
    "logit_normal": logit_normal_timesteps,
}


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """t' = s t / (1 + (s - 1) t): keeps 0 and 1, spends more of the grid near t = 1 for s > 1 (SD3 eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


# ----------------------------------------------------------------------------------------------------
# The process


class RectifiedFlow:
    """Rectified flow with SD3's recipe; implements models.generative.process.GenerativeProcess."""

    def __init__(self, cfg: RectifiedFlowConfig) -> None:
        self.cfg = cfg

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        return TIMESTEP_SAMPLERS[self.cfg.timestep_sampling](self.cfg, n, generator, device)  # (n,)

    # -- forward process ------------------------------------------------------------------------------

    def interpolate(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """z_t = (1 - t) x_0 + t eps                                                             (SD3 eq. 13)"""
        tb = broadcast_to(t, x0)  # (B, 1, ..., 1)
        return (1 - tb) * x0 + tb * noise

    def training_losses(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        **cond,
    ) -> dict[str, Tensor]:
        """Conditional flow matching (SD3 Section 2, L_CFM) at t ~ pi(t): mean squared error of the velocity.

        `t` (B,) floats in [0, 1]. With `p_uncond > 0` and `y` in cond, labels are dropped to the model's null
        label first. Returns {"loss": scalar, "mse_per_sample": (B,) detached}.
        """
        B = x0.shape[0]
        # 1. t ~ pi(t): uniform or logit-normal                                                  (SD3 eq. 19)
        if t is None:
            t = self.sample_timesteps(B, generator, x0.device)  # (B,)
        # 2. eps ~ N(0, I)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # (B, ...)
        # 3. classifier-free guidance training: some labels become the null label (Ho & Salimans 2022)
        if self.cfg.p_uncond > 0 and cond.get("y") is not None:
            null = model.null_label  # type: ignore[attr-defined]
            cond = {**cond, "y": drop_labels(cond["y"], self.cfg.p_uncond, null, generator)}
        # 4. z_t on the straight path                                                            (SD3 eq. 13)
        z_t = self.interpolate(x0, t, noise)  # (B, ...)
        # 5. regress the network's velocity on v = eps - x_0                            (SD3 Section 2, L_CFM)
        v_pred = model(z_t, t * self.cfg.time_input_scale, **cond)  # (B, ...)
        mse = (v_pred - (noise - x0)).pow(2).flatten(1).mean(dim=1)  # (B,)
        return {"loss": mse.mean(), "mse_per_sample": mse.detach()}

    # -- sampling -------------------------------------------------------------------------------------

    def prior(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """z_1 ~ N(0, I): the t = 1 end of the path is pure noise                            (SD3 eq. 2)"""
        return torch.randn(shape, generator=generator, device=device)  # (B, ...)

    def time_grid(self, steps: int, device=None) -> Tensor:
        """1 = t_0 > t_1 > ... > t_N = 0: uniform, then shifted (SD3 eq. 23)."""
        grid = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)  # (N + 1,)
        return shift_timesteps(grid, self.cfg.sample_shift)

    def sample(
        self,
        model: Callable[..., Tensor],
        shape: tuple[int, ...],
        *,
        steps: int | None = None,
        sampler: Literal["euler"] = "euler",
        guidance: Guidance | None = None,
        generator: torch.Generator | None = None,
        x_T: Tensor | None = None,
        device: torch.device | str | None = None,
        **cond,
    ) -> SampleOutput:
        """Integrate dz/dt = v_theta(z, t) from z_1 ~ N(0, I) at t = 1 to t = 0 with `steps` Euler steps
        (default num_steps). The same interface as GaussianDiffusion.sample; classifier-free guidance combines
        the velocities, and nfe counts 2 per step when guided."""
        if sampler != "euler":
            raise ValueError(f"sampler must be 'euler' (the one rectified-flow sampler), got {sampler!r}")
        if isinstance(guidance, ClassifierGuidance):
            raise ValueError("classifier guidance is not implemented for rectified flow; use ClassifierFreeGuidance")
        steps = self.cfg.num_steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        device = torch.device(device) if device is not None else infer_device(model)
        x = self.prior(shape, generator, device) if x_T is None else x_T.to(device)  # (B, ...)
        grid = self.time_grid(steps, device)  # (N + 1,)
        nfe = 0
        with torch.no_grad():
            for i in range(steps):
                # 1. the velocity at (z_{t_i}, t_i), guided: v = v(null) + w (v(y) - v(null))  (Ho & Salimans)
                t = torch.full((shape[0],), float(grid[i]), device=device, dtype=x.dtype)  # (B,)
                v, n = guided_output(model, x, t * self.cfg.time_input_scale, guidance, cond)  # (B, ...)
                nfe += n
                # 2. Euler step of dz/dt = v towards the data, dt = t_{i+1} - t_i < 0              (SD3 eq. 1)
                x = x + float(grid[i + 1] - grid[i]) * v  # (B, ...)
        return SampleOutput(x=x, nfe=nfe)
