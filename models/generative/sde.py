"""Score-based generative modelling through SDEs (Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole 2021,
"Score-Based Generative Modeling through Stochastic Differential Equations").

Forward SDE, t in [0, 1]:           dx = f(x, t) dt + g(t) dw                                     (Song eq. 5)
Reverse-time SDE:                   dx = [f(x, t) - g(t)^2 grad_x log p_t(x)] dt + g(t) dw_bar     (Song eq. 6)
Probability-flow ODE:               dx/dt = f(x, t) - 1/2 g(t)^2 grad_x log p_t(x)                 (Song eq. 13)

VE SDE (Song eq. 9, the continuous SMLD): f = 0,  g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)),
    sigma(t) = sigma_min (sigma_max / sigma_min)^t;  p_0t(x_t | x_0) = N(x_0, sigma(t)^2 I)          (Appendix B, C)
VP SDE (Song eq. 11, the continuous DDPM): f = -1/2 beta(t) x,  g(t) = sqrt(beta(t)),
    beta(t) = beta_min + t (beta_max - beta_min);  p_0t(x_t | x_0) = N(x_0 e^{c(t)}, (1 - e^{2 c(t)}) I),
    c(t) = -1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min                                            (Appendix B, C)

Training is denoising score matching (Song eq. 7) with lambda(t) = std(t)^2. Parameterisation (config
`parameterization`): "noise" (default, what the paper's VP code does): the network predicts the noise z in
x_t = mean + std z, the loss is ||net - z||^2 and the score is -net / std; "score": the network output is the
score itself, the loss ||std * net + z||^2 (the same objective, worse conditioned at small std).
The network's time input is t * time_input_scale (t in [eps, 1]), so a UNet built for integer DDPM steps
sees the same range.

Samplers take `score_fn(x, t) -> score` with t (B,) in [eps, 1], so an exact score can be plugged in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from models.generative.ddpm import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    Guidance,
    SampleOutput,
    drop_labels,
    guided_output,
    infer_device,
)
from models.generative.process import broadcast_to

ScoreFn = Callable[[Tensor, Tensor], Tensor]

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class SDEConfig:
    kind: Literal["vp", "ve"] = "vp"
    beta_min: float = 0.1  # VP (paper's values)
    beta_max: float = 20.0
    sigma_min: float = 0.01  # VE (paper's CIFAR-10 values)
    sigma_max: float = 50.0
    num_steps: int = 1000  # N, discretisation of the EM and PC samplers
    train_eps: float = 1e-5  # t ~ U(train_eps, 1) in training
    sample_eps: float = 0.0  # sampling ends at t = sample_eps; 0: the paper's value (VP 1e-3, VE 1e-5)
    parameterization: Literal["noise", "score"] = "noise"
    time_input_scale: float = 999.0
    predictor: Literal["reverse_diffusion", "euler_maruyama"] = "reverse_diffusion"  # PC sampler
    snr: float = 0.16  # Langevin corrector signal-to-noise ratio r (Song Algorithm 4)
    corrector_steps: int = 1  # M
    ode_rtol: float = 1e-5
    ode_atol: float = 1e-5
    denoise: bool = True  # EM / PC: the last step returns the mean, without noise (the code's noise removal)
    p_uncond: float = 0.0  # classifier-free guidance training: probability of the null label

    def __post_init__(self) -> None:
        if self.kind not in SDES:
            raise ValueError(f"kind must be one of {sorted(SDES)}, got {self.kind!r}")
        if not 0 < self.beta_min < self.beta_max:
            raise ValueError(f"beta_min must be in (0, beta_max), got {self.beta_min}, beta_max={self.beta_max}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min must be in (0, sigma_max), got {self.sigma_min}, sigma_max={self.sigma_max}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 0 < self.train_eps < 1:
            raise ValueError(f"train_eps must be in (0, 1), got {self.train_eps}")
        if not 0 <= self.sample_eps < 1:
            raise ValueError(f"sample_eps must be in [0, 1) (0 = paper default), got {self.sample_eps}")
        if self.parameterization not in ("noise", "score"):
            raise ValueError(f"parameterization must be 'noise' or 'score', got {self.parameterization!r}")
        if self.time_input_scale <= 0:
            raise ValueError(f"time_input_scale must be > 0, got {self.time_input_scale}")
        if self.predictor not in ("reverse_diffusion", "euler_maruyama"):
            raise ValueError(f"predictor must be 'reverse_diffusion' or 'euler_maruyama', got {self.predictor!r}")
        if self.snr <= 0:
            raise ValueError(f"snr must be > 0, got {self.snr}")
        if self.corrector_steps < 0:
            raise ValueError(f"corrector_steps must be >= 0, got {self.corrector_steps}")
        if self.ode_rtol <= 0 or self.ode_atol <= 0:
            raise ValueError(f"ode_rtol and ode_atol must be > 0, got {self.ode_rtol}, {self.ode_atol}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")


# ----------------------------------------------------------------------------------------------------
# The SDEs


class SDE:
    """Common part: training loss, score function from a network, the sampling interface. VPSDE and VESDE
    implement models.generative.process.GenerativeProcess through it."""

    default_sample_eps = 1e-3

    def __init__(self, cfg: SDEConfig) -> None:
        self.cfg = cfg
        self.sample_eps = cfg.sample_eps or self.default_sample_eps

    # -- per-SDE pieces (t: (B,) tensors) ---------------------------------------------------------------

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def diffusion(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def marginal_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(a(t), std(t)), each (B,): p_0t(x_t | x_0) = N(a(t) x_0, std(t)^2 I)."""
        raise NotImplementedError

    def prior_std(self) -> float:
        raise NotImplementedError

    def discretize(self, x: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        """Forward step t_next -> t written as x_t = x + f + G z (f evaluated at x), for the reverse-diffusion
        predictor. Generic version: Euler-Maruyama of the forward SDE (Song Appendix E)."""
        dt = t - t_next  # (B,) > 0
        return self.drift(x, t) * broadcast_to(dt, x), self.diffusion(t) * dt.sqrt()

    def langevin_alpha(self, t: Tensor, t_next: Tensor) -> Tensor:
        return torch.ones_like(t)

    def marginal_prob(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        a, std = self.marginal_coeffs(t)
        return broadcast_to(a, x0) * x0, broadcast_to(std, x0)  # mean (B, ...), std (B, 1, ..., 1)

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> Tensor:
        return self.prior_std() * torch.randn(shape, generator=generator, device=device)  # (B, ...)

    def prior(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """x_1 ~ N(0, prior_std^2 I), the p_T the reverse SDE starts from (Song Section 3.1; GenerativeProcess)."""
        return self.prior_sample(shape, generator, device)  # (B, ...)

    # -- training ---------------------------------------------------------------------------------------

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
        """Denoising score matching with lambda(t) = std(t)^2 (Song eq. 7); see the module docstring."""
        B = x0.shape[0]
        if t is None:
            u = torch.rand((B,), generator=generator, device=x0.device)
            t = self.cfg.train_eps + (1 - self.cfg.train_eps) * u  # (B,) ~ U(eps, 1)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # (B, ...)
        if self.cfg.p_uncond > 0 and cond.get("y") is not None:
            null = model.null_label  # type: ignore[attr-defined]
            cond = {**cond, "y": drop_labels(cond["y"], self.cfg.p_uncond, null, generator)}
        mean, std = self.marginal_prob(x0, t)
        x_t = mean + std * noise  # (B, ...)
        out = model(x_t, t * self.cfg.time_input_scale, **cond)  # (B, ...)
        residual = out - noise if self.cfg.parameterization == "noise" else std * out + noise
        mse = residual.pow(2).flatten(1).mean(dim=1)  # (B,)
        return {"loss": mse.mean(), "mse_per_sample": mse.detach()}

    def score_fn(self, model: Callable[..., Tensor], guidance: Guidance | None = None, **cond) -> ScoreFn:
        """grad_x log p_t(x [| y]) from the network, with classifier-free or classifier guidance
        (Song Section 5: grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x), scaled)."""
        scale = self.cfg.time_input_scale

        def score(x: Tensor, t: Tensor) -> Tensor:
            t_in = t * scale  # (B,)
            out, _ = guided_output(model, x, t_in, guidance, cond)  # (B, ...)
            if self.cfg.parameterization == "noise":
                out = -out / broadcast_to(self.marginal_coeffs(t)[1], x)
            if isinstance(guidance, ClassifierGuidance):
                out = out + guidance.grad_log_prob(x, t_in)
            return out

        return score

    # -- sampling ---------------------------------------------------------------------------------------

    def sample(
        self,
        model: Callable[..., Tensor],
        shape: tuple[int, ...],
        *,
        steps: int | None = None,
        sampler: Literal["euler_maruyama", "pc", "ode"] = "euler_maruyama",
        guidance: Guidance | None = None,
        generator: torch.Generator | None = None,
        x_T: Tensor | None = None,
        device: torch.device | str | None = None,
        **cond,
    ) -> SampleOutput:
        """The same interface as GaussianDiffusion.sample; nfe counts network evaluations."""
        device = torch.device(device) if device is not None else infer_device(model)
        out = self.sample_score(
            self.score_fn(model, guidance, **cond),
            shape,
            steps=steps,
            sampler=sampler,
            generator=generator,
            x_T=x_T,
            device=device,
        )
        per_call = 2 if isinstance(guidance, ClassifierFreeGuidance) else 1
        return SampleOutput(x=out.x, nfe=out.nfe * per_call)

    def sample_score(
        self,
        score_fn: ScoreFn,
        shape: tuple[int, ...],
        *,
        steps: int | None = None,
        sampler: Literal["euler_maruyama", "pc", "ode"] = "euler_maruyama",
        generator: torch.Generator | None = None,
        x_T: Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> SampleOutput:
        """Sample with a given score function; nfe counts score evaluations. `steps` (default num_steps) is
        N for EM / PC and ignored by the adaptive ODE solver."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        x = self.prior_sample(shape, generator, device) if x_T is None else x_T.to(device)  # (B, ...)
        with torch.no_grad():
            return SAMPLERS[sampler](self, score_fn, x, steps or self.cfg.num_steps, generator)


class VPSDE(SDE):
    default_sample_eps = 1e-3

    def beta(self, t: Tensor) -> Tensor:
        return self.cfg.beta_min + t * (self.cfg.beta_max - self.cfg.beta_min)  # (B,)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return -0.5 * broadcast_to(self.beta(t), x) * x

    def diffusion(self, t: Tensor) -> Tensor:
        return self.beta(t).sqrt()

    def _log_mean_coeff(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.cfg.beta_max - self.cfg.beta_min) - 0.5 * t * self.cfg.beta_min  # (B,)

    def marginal_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lmc = self._log_mean_coeff(t)
        return lmc.exp(), (-torch.expm1(2 * lmc)).sqrt()  # expm1: std stays accurate at t ~ eps

    def prior_std(self) -> float:
        return 1.0

    def _step_alpha(self, t: Tensor, t_next: Tensor) -> Tensor:
        return torch.exp(2 * (self._log_mean_coeff(t) - self._log_mean_coeff(t_next)))  # (B,) 1 - beta_i

    def discretize(self, x: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        """DDPM step x_t = sqrt(1 - beta_i) x + sqrt(beta_i) z with beta_i exact for [t_next, t] (Appendix E)."""
        alpha = self._step_alpha(t, t_next)  # (B,)
        return (broadcast_to(alpha.sqrt(), x) - 1) * x, (1 - alpha).sqrt()

    def langevin_alpha(self, t: Tensor, t_next: Tensor) -> Tensor:
        return self._step_alpha(t, t_next)  # alpha_i of Song Algorithm 5


class VESDE(SDE):
    default_sample_eps = 1e-5

    def sigma(self, t: Tensor) -> Tensor:
        return self.cfg.sigma_min * (self.cfg.sigma_max / self.cfg.sigma_min) ** t  # (B,)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def diffusion(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.sqrt(2 * math.log(self.cfg.sigma_max / self.cfg.sigma_min))

    def marginal_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        # std is sigma(t), not sqrt(sigma(t)^2 - sigma_min^2): the paper treats the data as already carrying
        # sigma_min noise, so x_0 perturbed by sigma_min is the t = 0 marginal.
        return torch.ones_like(t), self.sigma(t)

    def prior_std(self) -> float:
        return self.cfg.sigma_max

    def discretize(self, x: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
        """SMLD step x_t = x + sqrt(sigma_t^2 - sigma_next^2) z (Song eq. 8, Appendix E)."""
        return torch.zeros_like(x), (self.sigma(t) ** 2 - self.sigma(t_next) ** 2).sqrt()


SDES: dict[str, type[SDE]] = {"vp": VPSDE, "ve": VESDE}


def build_sde(cfg: SDEConfig) -> SDE:
    return SDES[cfg.kind](cfg)


# ----------------------------------------------------------------------------------------------------
# Samplers. Each runs on the grid t_0 = 1 > t_1 > ... > t_N = eps (uniform) and returns a SampleOutput.


def _time_grid(sde: SDE, steps: int, x: Tensor) -> Tensor:
    return torch.linspace(1.0, sde.sample_eps, steps + 1, device=x.device, dtype=torch.float64)  # (N + 1,)


def _full(t: Tensor, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)  # (B,)


def euler_maruyama_sampler(
    sde: SDE, score_fn: ScoreFn, x: Tensor, steps: int, generator: torch.Generator | None = None
) -> SampleOutput:
    """Euler-Maruyama on the reverse-time SDE (Song eq. 6), dt < 0."""
    grid = _time_grid(sde, steps, x)
    for i in range(steps):
        t, dt = _full(grid[i], x), float(grid[i + 1] - grid[i])  # (B,), scalar < 0
        # 1. reverse drift f(x, t) - g(t)^2 score(x, t)                                          (Song eq. 6)
        g = broadcast_to(sde.diffusion(t), x)  # (B, 1, ..., 1)
        x_mean = x + (sde.drift(x, t) - g**2 * score_fn(x, t)) * dt  # (B, ...)
        # 2. + g(t) sqrt(|dt|) z, except for the last step when denoising
        if i == steps - 1 and sde.cfg.denoise:
            x = x_mean
        else:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x_mean + g * math.sqrt(-dt) * z
    return SampleOutput(x=x, nfe=steps)


def langevin_corrector(
    sde: SDE, score_fn: ScoreFn, x: Tensor, t: Tensor, alpha: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Song Algorithm 4 / 5: x <- x + eps s + sqrt(2 eps) z with eps = 2 alpha (r ||z|| / ||s||)^2.

    The norms are per-sample norms averaged over the batch, as in the paper's code."""
    for _ in range(sde.cfg.corrector_steps):
        grad = score_fn(x, t)  # (B, ...)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        grad_norm = grad.flatten(1).norm(dim=1).mean()
        if grad_norm == 0:  # e.g. a zero-initialised network: the step size is undefined, skip
            continue
        noise_norm = z.flatten(1).norm(dim=1).mean()
        step = 2 * broadcast_to(alpha, x) * (sde.cfg.snr * noise_norm / grad_norm) ** 2  # (B, 1, ..., 1)
        x = x + step * grad + (2 * step).sqrt() * z
    return x


def pc_sampler(
    sde: SDE, score_fn: ScoreFn, x: Tensor, steps: int, generator: torch.Generator | None = None
) -> SampleOutput:
    """Predictor-corrector (Song Algorithm 1; 2 for VE, 3 for VP). Order as in the paper's code: the Langevin
    corrector at t_i, then the predictor t_i -> t_{i+1}, so the last update is the predictor's."""
    grid = _time_grid(sde, steps, x)
    nfe = 0
    for i in range(steps):
        t, t_next = _full(grid[i], x), _full(grid[i + 1], x)  # (B,) each
        # 1. corrector: M Langevin steps targeting p_{t_i}
        if sde.cfg.corrector_steps:
            x = langevin_corrector(sde, score_fn, x, t, sde.langevin_alpha(t, t_next), generator)
            nfe += sde.cfg.corrector_steps
        score = score_fn(x, t)  # (B, ...)
        nfe += 1
        if sde.cfg.predictor == "reverse_diffusion":
            # 2a. reverse diffusion: x_mean = x - f + G^2 s, then + G z                        (Song Appendix E)
            f, G = sde.discretize(x, t, t_next)
            G = broadcast_to(G, x)
            x_mean = x - f + G**2 * score
            noise_scale = G
        else:
            # 2b. Euler-Maruyama on the reverse SDE                                                (Song eq. 6)
            dt = float(grid[i + 1] - grid[i])
            g = broadcast_to(sde.diffusion(t), x)
            x_mean = x + (sde.drift(x, t) - g**2 * score) * dt
            noise_scale = g * math.sqrt(-dt)
        if i == steps - 1 and sde.cfg.denoise:
            x = x_mean
        else:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x_mean + noise_scale * z
    return SampleOutput(x=x, nfe=nfe)


def probability_flow_ode_sampler(
    sde: SDE, score_fn: ScoreFn, x: Tensor, steps: int = 0, generator: torch.Generator | None = None
) -> SampleOutput:
    """The probability-flow ODE (Song eq. 13) from t = 1 to eps with adaptive RK45 (scipy's solve_ivp, the
    paper's solver and tolerances); deterministic given x_T. `steps` and `generator` are unused."""
    shape, dtype, device = x.shape, x.dtype, x.device

    def ode_fn(t: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype)  # (B, ...)
        tt = torch.full((shape[0],), t, device=device, dtype=dtype)  # (B,)
        g = broadcast_to(sde.diffusion(tt), xt)
        dx = sde.drift(xt, tt) - 0.5 * g**2 * score_fn(xt, tt)  # (B, ...)
        return dx.detach().to("cpu", torch.float64).numpy().reshape(-1)

    y0 = x.detach().to("cpu", torch.float64).numpy().reshape(-1)
    sol = solve_ivp(ode_fn, (1.0, sde.sample_eps), y0, method="RK45", rtol=sde.cfg.ode_rtol, atol=sde.cfg.ode_atol)
    if not sol.success:
        raise RuntimeError(f"probability-flow ODE solver failed: {sol.message}")
    x = torch.from_numpy(sol.y[:, -1]).reshape(shape).to(device=device, dtype=dtype)
    return SampleOutput(x=x, nfe=int(sol.nfev))


SAMPLERS: dict[str, Callable[..., SampleOutput]] = {
    "euler_maruyama": euler_maruyama_sampler,
    "pc": pc_sampler,
    "ode": probability_flow_ode_sampler,
}
