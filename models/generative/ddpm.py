"""Denoising diffusion probabilistic models (Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic
Models") with the cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM"), the DDIM sampler (Song, Meng,
Ermon 2021, "Denoising Diffusion Implicit Models"), classifier guidance (Dhariwal & Nichol 2021, "Diffusion
Models Beat GANs", Algorithms 1 and 2) and classifier-free guidance (Ho & Salimans 2022).

The process is independent of the network: `model(x_t, t, **cond)` is any callable that predicts the noise
epsilon, (B, ...) from x_t (B, ...) and integer timesteps t (B,) in [0, T). Timesteps are 0-based: t = 0 is
the paper's t = 1, so x_t ~ q(x_t | x_0) has signal sqrt(alpha_bar[t]) with alpha_bar[0] = 1 - beta[0].

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)                                       (Ho eq. 4)
    q(x_{t-1} | x_t, x_0) = N(mu~_t(x_t, x_0), beta~_t I),                                      (Ho eq. 6-7)
        mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
    L_simple = E_{t, x_0, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2  (Ho eq. 14)

Sampling on a subsequence tau of the timesteps (all T by default) treats each pair (t, s = previous element of
tau) as one step with abar_t, abar_s, alpha = abar_t / abar_s and beta = 1 - alpha (Nichol & Dhariwal's
respacing), so the ancestral sampler and DDIM share one loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.generative.process import broadcast_to

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000  # T
    schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = 1e-4  # linear schedule at T = 1000 (Ho); scaled by 1000 / T for other T (Nichol)
    beta_end: float = 0.02
    cosine_s: float = 0.008  # cosine schedule offset (Nichol eq. 17)
    max_beta: float = 0.999  # clip of both schedules (Nichol's cosine clip; keeps a scaled linear one valid at tiny T)
    variance: Literal["beta", "beta_tilde"] = "beta"  # sigma_t^2 of the ancestral sampler (Ho Section 3.2)
    clip_x0: bool = False  # clip the predicted x_0 to [-1, 1] when sampling (pixel data in [-1, 1] only)
    p_uncond: float = 0.0  # classifier-free guidance training: probability of replacing y by the null label

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if not 0 < self.beta_start <= self.beta_end:
            raise ValueError(f"beta_start must be in (0, beta_end], got {self.beta_start}, beta_end={self.beta_end}")
        if self.cosine_s <= 0:
            raise ValueError(f"cosine_s must be > 0, got {self.cosine_s}")
        if not 0 < self.max_beta < 1:
            raise ValueError(f"max_beta must be in (0, 1), got {self.max_beta}")
        if self.variance not in ("beta", "beta_tilde"):
            raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {self.variance!r}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")


# ----------------------------------------------------------------------------------------------------
# Schedules (float64 numpy; cast per use)


def linear_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, max_beta: float = 0.999
) -> np.ndarray:
    """Ho's linear schedule, scaled by 1000 / T so abar_T stays ~4e-5 for any T (improved-diffusion's
    convention); clipped at max_beta, which binds only when T < 1000 beta_end / max_beta (T <= 20 by default)."""
    scale = 1000 / num_timesteps
    return np.minimum(np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64), max_beta)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """abar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2); beta_t = 1 - abar_t / abar_{t-1}
    clipped at max_beta (Nichol & Dhariwal eq. 17)."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return np.minimum(1 - abar[1:] / abar[:-1], max_beta)


SCHEDULES: dict[str, Callable[[DiffusionConfig], np.ndarray]] = {
    "linear": lambda c: linear_betas(c.num_timesteps, c.beta_start, c.beta_end, c.max_beta),
    "cosine": lambda c: cosine_betas(c.num_timesteps, c.cosine_s, c.max_beta),
}


# ----------------------------------------------------------------------------------------------------
# Guidance (both samplers; also used by the SDE samplers in sde.py)


def drop_labels(y: Tensor, p_uncond: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null label with probability p_uncond (classifier-free guidance training)."""
    if p_uncond <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond  # (B,)
    return torch.where(drop, torch.full_like(y, null_label), y)


@dataclass
class ClassifierFreeGuidance:
    """eps = eps(x, t, null) + scale * (eps(x, t, y) - eps(x, t, null)).

    scale = 0: unconditional, 1: conditional, > 1: guided. Ho & Salimans' w is scale - 1. The null label is
    `null_label`, or the model's `null_label` attribute when None. Both halves run as one batch (`combine_ref`);
    at scale 0 and 1 one half has weight zero, so `combine` evaluates only the other (half the work; equal to
    `combine_ref` up to float rounding, which tests/unit hold it to).
    """

    y: Tensor  # (B,) long target labels
    scale: float
    null_label: int | None = None

    @property
    def evaluations(self) -> int:
        """Network evaluations per sample and step: 1 where one half has weight zero, else 2."""
        return 1 if self.scale in (0.0, 1.0) else 2

    def _check(self, cond: dict) -> None:
        if "y" in cond:
            raise ValueError("pass the labels in the guidance object, not also as y=")

    def _null(self, model: Callable[..., Tensor]) -> Tensor:
        null = self.null_label if self.null_label is not None else model.null_label  # type: ignore[attr-defined]
        return torch.full_like(self.y, null)  # (B,)

    def combine(self, model: Callable[..., Tensor], x: Tensor, t: Tensor, **cond) -> Tensor:
        self._check(cond)
        if self.scale == 0.0:
            return model(x, t, y=self._null(model), **cond)  # eps(x, t, null)
        if self.scale == 1.0:
            return model(x, t, y=self.y, **cond)  # eps(x, t, y)
        return self.combine_ref(model, x, t, **cond)

    def combine_ref(self, model: Callable[..., Tensor], x: Tensor, t: Tensor, **cond) -> Tensor:
        """The formula as written, both halves at every scale."""
        self._check(cond)
        out = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([self.y, self._null(model)]), **cond)  # (2B, ...)
        out_cond, out_uncond = out.chunk(2)  # (B, ...) each
        return out_uncond + self.scale * (out_cond - out_uncond)


@dataclass
class ClassifierGuidance:
    """Gradient of log p(y | x_t, t) from a noise-conditional classifier `classifier(x_t, t) -> logits`,
    times `scale` (Dhariwal & Nichol's s). The samplers add it where their algorithm says."""

    classifier: Callable[[Tensor, Tensor], Tensor]
    y: Tensor  # (B,) long target labels
    scale: float

    def grad_log_prob(self, x: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(self.classifier(x_in, t), dim=-1)  # (B, K)
            selected = log_probs[torch.arange(x.shape[0], device=x.device), self.y]  # (B,)
            (grad,) = torch.autograd.grad(selected.sum(), x_in)  # (B, ...)
        return self.scale * grad


Guidance = ClassifierFreeGuidance | ClassifierGuidance


def guided_output(
    model: Callable[..., Tensor], x: Tensor, t: Tensor, guidance: Guidance | None, cond: dict
) -> tuple[Tensor, int]:
    """The network output under classifier-free guidance (or plain), and the number of network evaluations."""
    if isinstance(guidance, ClassifierFreeGuidance):
        return guidance.combine(model, x, t, **cond), guidance.evaluations
    return model(x, t, **cond), 1


@dataclass
class SampleOutput:
    x: Tensor  # (B, ...) samples
    nfe: int  # network (or score function) evaluations per sample; a guided batch of 2 counts 2


# ----------------------------------------------------------------------------------------------------
# The process


def infer_device(model: object) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


class GaussianDiffusion:
    """DDPM / DDIM; implements models.generative.process.GenerativeProcess."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg
        self.num_timesteps = cfg.num_timesteps
        betas = SCHEDULES[cfg.schedule](cfg)  # (T,) float64
        self.betas = torch.from_numpy(betas)
        self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))  # (T,) abar_t

    # -- forward process ------------------------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                                      (Ho eq. 4)"""
        if noise is None:
            noise = torch.randn_like(x0)
        abar = broadcast_to(self.alphas_cumprod.to(x0.device)[t], x0)  # (B, 1, ..., 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

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
        """L_simple (Ho eq. 14, Algorithm 1): mean squared error of the predicted noise at a uniform t.

        With `p_uncond > 0` and `y` in cond, labels are dropped to the model's null label first.
        Returns {"loss": scalar, "mse_per_sample": (B,) detached}.
        """
        B = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (B,), generator=generator, device=x0.device)  # (B,)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # (B, ...)
        if self.cfg.p_uncond > 0 and cond.get("y") is not None:
            null = model.null_label  # type: ignore[attr-defined]
            cond = {**cond, "y": drop_labels(cond["y"], self.cfg.p_uncond, null, generator)}
        x_t = self.q_sample(x0, t, noise)  # (B, ...)
        eps = model(x_t, t, **cond)  # (B, ...)
        mse = (eps - noise).pow(2).flatten(1).mean(dim=1)  # (B,)
        return {"loss": mse.mean(), "mse_per_sample": mse.detach()}

    # -- reverse process ------------------------------------------------------------------------------

    def prior(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """x_T ~ N(0, I): abar_T ~ 0, so q(x_T | x_0) is the standard normal                  (Ho Section 2)"""
        return torch.randn(shape, generator=generator, device=device)  # (B, ...)

    def timestep_sequence(self, steps: int | None = None) -> list[int]:
        """Increasing subsequence tau of [0, T): all of them, or `steps` evenly spaced (first 0, last T-1)."""
        T = self.num_timesteps
        if steps is None or steps >= T:
            return list(range(T))
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return sorted({int(round(v)) for v in np.linspace(0, T - 1, steps)})

    def sample(
        self,
        model: Callable[..., Tensor],
        shape: tuple[int, ...],
        *,
        steps: int | None = None,
        sampler: Literal["ancestral", "ddim"] = "ancestral",
        eta: float = 0.0,
        guidance: Guidance | None = None,
        generator: torch.Generator | None = None,
        x_T: Tensor | None = None,
        device: torch.device | str | None = None,
        **cond,
    ) -> SampleOutput:
        """Draw samples of `shape` from x_T ~ N(0, I) down the timestep subsequence.

        sampler="ancestral": Ho Algorithm 2 (eta is ignored); "ddim": Song eq. 12 with eta (0: deterministic
        DDIM, 1: the ancestral sampler with sigma^2 = beta~). `guidance` applies to either.
        """
        if sampler not in ("ancestral", "ddim"):
            raise ValueError(f"sampler must be 'ancestral' or 'ddim', got {sampler!r}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        device = torch.device(device) if device is not None else infer_device(model)
        x = self.prior(shape, generator, device) if x_T is None else x_T.to(device)  # (B, ...)
        abar_all = self.alphas_cumprod.to(device)  # (T,) float64
        tau = self.timestep_sequence(steps)
        nfe = 0
        with torch.no_grad():
            for i in reversed(range(len(tau))):
                t_int = tau[i]
                t = torch.full((shape[0],), t_int, device=device, dtype=torch.long)  # (B,)
                abar_t = abar_all[t_int]
                abar_s = abar_all[tau[i - 1]] if i > 0 else torch.ones((), dtype=abar_t.dtype, device=device)
                eps, n = guided_output(model, x, t, guidance, cond)  # (B, ...)
                nfe += n
                step = self._ddim_step if sampler == "ddim" else self._ancestral_step
                x = step(x, eps, t, abar_t, abar_s, last=i == 0, eta=eta, guidance=guidance, generator=generator)
        return SampleOutput(x=x, nfe=nfe)

    def _predict_x0(self, x: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
        x0 = (x - (1 - abar_t).sqrt().to(x.dtype) * eps) / abar_t.sqrt().to(x.dtype)  # (B, ...) Ho eq. 4 solved for x_0
        return x0.clamp(-1, 1) if self.cfg.clip_x0 else x0

    def _ancestral_step(
        self,
        x: Tensor,
        eps: Tensor,
        t: Tensor,
        abar_t: Tensor,
        abar_s: Tensor,
        *,
        last: bool,
        eta: float,
        guidance: Guidance | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        alpha = abar_t / abar_s
        beta = 1 - alpha
        # 1. x_0 from the predicted noise; unclipped, steps 2-3 equal Ho eq. 11's
        #    mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
        x0 = self._predict_x0(x, eps, abar_t)  # (B, ...)
        # 2. posterior mean mu~_t(x_t, x_0)                                                   (Ho eq. 7)
        c0 = (abar_s.sqrt() * beta / (1 - abar_t)).to(x.dtype)
        ct = (alpha.sqrt() * (1 - abar_s) / (1 - abar_t)).to(x.dtype)
        mean = c0 * x0 + ct * x  # (B, ...)
        # 3. sigma_t^2 = beta_t or beta~_t                                                   (Ho Section 3.2)
        var = beta if self.cfg.variance == "beta" else beta * (1 - abar_s) / (1 - abar_t)
        # 4. classifier guidance: mu + s Sigma grad log p(y | x_t)                 (Dhariwal & Nichol Alg. 1)
        if isinstance(guidance, ClassifierGuidance):
            mean = mean + var.to(x.dtype) * guidance.grad_log_prob(x, t)
        if last:
            return mean  # Algorithm 2: z = 0 at the final step
        # 5. x_{t-1} = mu + sigma_t z                                                 (Ho Algorithm 2, line 4)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean + var.sqrt().to(x.dtype) * z

    def _ddim_step(
        self,
        x: Tensor,
        eps: Tensor,
        t: Tensor,
        abar_t: Tensor,
        abar_s: Tensor,
        *,
        last: bool,
        eta: float,
        guidance: Guidance | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        # 1. classifier guidance: eps^ = eps - sqrt(1 - abar_t) grad log p(y | x_t)    (Dhariwal & Nichol Alg. 2)
        if isinstance(guidance, ClassifierGuidance):
            eps = eps - (1 - abar_t).sqrt().to(x.dtype) * guidance.grad_log_prob(x, t)
        # 2. predicted x_0 ("predicted x_0" term of Song eq. 12)
        x0 = self._predict_x0(x, eps, abar_t)  # (B, ...)
        if self.cfg.clip_x0:  # keep eps consistent with the clipped x_0
            eps = (x - abar_t.sqrt().to(x.dtype) * x0) / (1 - abar_t).sqrt().to(x.dtype)
        # 3. sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)                 (Song eq. 16)
        sigma = eta * ((1 - abar_s) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_s).sqrt()
        # 4. x_s = sqrt(abar_s) x_0 + sqrt(1 - abar_s - sigma^2) eps + sigma z                     (Song eq. 12)
        direction = (1 - abar_s - sigma**2).clamp(min=0).sqrt().to(x.dtype) * eps
        x = abar_s.sqrt().to(x.dtype) * x0 + direction
        if last or eta == 0:
            return x
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + sigma.to(x.dtype) * z
