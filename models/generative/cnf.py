"""A continuous normalizing flow (Chen et al. 2018, "Neural Ordinary Differential Equations"; Grathwohl et al.
2019, "FFJORD") trained by flow matching (Lipman, Chen, Ben-Hamu, Nickel, Le 2023, "Flow Matching for
Generative Modeling") on the conditional optimal-transport path.

Time runs from noise (t = 0, x_0 ~ N(0, I)) to data (t = 1). Conditional OT path (Lipman eq. 20-23):
    x_t = (1 - (1 - sigma_min) t) x_0 + t x_1,        u_t(x_t | x_1) = x_1 - (1 - sigma_min) x_0
    L_CFM = E_{t ~ U[0, 1], x_0, x_1} || v_theta(x_t, t) - u_t(x_t | x_1) ||^2                (Lipman eq. 9)
Sampling integrates dx/dt = v_theta(x, t) from t = 0 to 1. The exact log-likelihood integrates the
instantaneous change of variables backwards from the data (Chen eq. 4; FFJORD eq. 4):
    log p_1(x_1) = log p_0(x_0) - int_0^1 tr(dv/dx)(x_t, t) dt
with the trace exact (one backward pass per dimension: small D) or by Hutchinson's estimator
tr(A) = E_eps[eps^T A eps] with one Rademacher or Gaussian probe held fixed through the solve (FFJORD
Section 3.1). Solvers: fixed-step classical RK4, or adaptive RK45 (scipy's solve_ivp, Dormand-Prince); one
for sampling, one for the likelihood.

The process is independent of the network: `model(x, t_input)` is any callable returning v (B, ...), with
the time input t * time_input_scale (so a UNet built for DDPM's integer steps sees the same range).
Bits per dimension: the data are dequantised and mapped affinely to [-1, 1) (models/generative/realnvp.py has the
accounting, shared by every flow).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor, nn

from models.generative.realnvp import affine_preprocess, bits_per_dim, standard_normal_log_prob

VectorField = Callable[[Tensor, Tensor], Tensor]  # v(x (B, ...), t (B,) in [0, 1]) -> (B, ...)


@dataclass(frozen=True)
class CNFConfig:
    """`params/nflow.yaml: cnf`: the flow-matching process, its solvers and its likelihood."""

    sigma_min: float = 0.0001  # std of the path's end at x_1 (Lipman Section 4.1)
    time_input_scale: float = 999.0  # the network sees t * scale
    sample_solver: Literal["rk4", "rk45"] = "rk4"  # rk4: fixed steps; rk45: adaptive (scipy's solve_ivp)
    sample_steps: int = 10  # rk4 steps when sampling (4 network evaluations each)
    # The likelihood needs the adaptive solver: the divergence grows sharply as t -> 1 (the path narrows to
    # sigma_min), where equal RK4 steps under-integrate it and report too few bits.
    likelihood_solver: Literal["rk4", "rk45"] = "rk45"
    likelihood_steps: int = 10  # rk4 steps of the likelihood ODE
    rtol: float = 0.0001  # rk45 tolerances
    atol: float = 0.0001
    trace: Literal["exact", "hutchinson"] = "hutchinson"  # exact: D backward passes per evaluation
    probe: Literal["rademacher", "gaussian"] = "rademacher"

    def __post_init__(self) -> None:
        if not 0 <= self.sigma_min < 1:
            raise ValueError(f"sigma_min must be in [0, 1), got {self.sigma_min}")
        if self.time_input_scale <= 0:
            raise ValueError(f"time_input_scale must be > 0, got {self.time_input_scale}")
        if self.sample_steps < 1 or self.likelihood_steps < 1:
            raise ValueError("sample_steps and likelihood_steps must be >= 1")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError("rtol and atol must be > 0")


# ----------------------------------------------------------------------------------------------- solvers


State = tuple[Tensor, ...]


def rk4(f: Callable[[float, State], State], y0: State, t0: float, t1: float, steps: int) -> tuple[State, int]:
    """Classical fourth-order Runge-Kutta with `steps` equal steps from t0 to t1; the state and the number
    of evaluations of f."""
    h = (t1 - t0) / steps
    y = y0
    for i in range(steps):
        t = t0 + i * h
        k1 = f(t, y)
        k2 = f(t + h / 2, tuple(a + h / 2 * k for a, k in zip(y, k1)))
        k3 = f(t + h / 2, tuple(a + h / 2 * k for a, k in zip(y, k2)))
        k4 = f(t + h, tuple(a + h * k for a, k in zip(y, k3)))
        y = tuple(a + h / 6 * (p + 2 * q + 2 * r + s) for a, p, q, r, s in zip(y, k1, k2, k3, k4))
    return y, 4 * steps


def rk45(
    f: Callable[[float, State], State], y0: State, t0: float, t1: float, rtol: float, atol: float
) -> tuple[State, int]:
    """Adaptive Dormand-Prince RK45 (scipy's solve_ivp) on the flattened state, in float64."""
    shapes = [y.shape for y in y0]
    sizes = [y.numel() for y in y0]
    dtype, device = y0[0].dtype, y0[0].device

    def unflatten(flat: np.ndarray) -> State:
        parts = torch.from_numpy(flat).to(device=device, dtype=dtype).split(sizes)
        return tuple(p.reshape(s) for p, s in zip(parts, shapes))

    def fun(t: float, flat: np.ndarray) -> np.ndarray:
        return torch.cat([d.reshape(-1) for d in f(t, unflatten(flat))]).detach().double().cpu().numpy()

    start = torch.cat([y.reshape(-1) for y in y0]).detach().double().cpu().numpy()
    sol = solve_ivp(fun, (t0, t1), start, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"RK45 failed: {sol.message}")
    return unflatten(sol.y[:, -1]), int(sol.nfev)


# ------------------------------------------------------------------------------------------- divergence


def divergence_exact(v: Tensor, x: Tensor) -> Tensor:
    """tr(dv/dx) per row (B,), one backward pass per dimension. v must be computed from x with a graph."""
    v_flat, dims = v.flatten(1), v[0].numel()
    div = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for i in range(dims):
        (grad,) = torch.autograd.grad(v_flat[:, i].sum(), x, create_graph=True, retain_graph=True)
        div = div + grad.flatten(1)[:, i]
    return div


def divergence_hutchinson(v: Tensor, x: Tensor, eps: Tensor) -> Tensor:
    """eps^T (dv/dx) eps per row (B,): one vector-Jacobian product; unbiased for tr(dv/dx) when
    E[eps eps^T] = I."""
    (vjp,) = torch.autograd.grad((v * eps).sum(), x, create_graph=True)
    return (vjp * eps).flatten(1).sum(1)


def draw_probe(shape: tuple[int, ...], kind: str, generator: torch.Generator | None, device) -> Tensor:
    if kind == "rademacher":
        return (torch.randint(0, 2, shape, generator=generator).float() * 2 - 1).to(device)
    return torch.randn(shape, generator=generator).to(device)


# ----------------------------------------------------------------------------------------------- process


class FlowMatching:
    """The conditional-OT flow-matching process: loss, sampler and exact likelihood for any vector field."""

    def __init__(self, cfg: CNFConfig) -> None:
        self.cfg = cfg

    def velocity(self, model: nn.Module | Callable[..., Tensor]) -> VectorField:
        """The network as v(x, t) with t (B,) in [0, 1]."""
        scale = self.cfg.time_input_scale
        return lambda x, t: model(x, t * scale)

    def training_losses(self, model: nn.Module, x1: Tensor, generator: torch.Generator | None = None) -> dict:
        """L_CFM on a batch x1 (B, ...) of data in the model space (Lipman eq. 9 with eq. 20-23)."""
        B, s = x1.shape[0], self.cfg.sigma_min
        t = torch.rand((B,), generator=generator, device=x1.device)  # (B,)
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device)  # (B, ...)
        tb = t.view(B, *([1] * (x1.dim() - 1)))
        xt = (1 - (1 - s) * tb) * x0 + tb * x1  # (B, ...) Lipman eq. 22
        target = x1 - (1 - s) * x0  # Lipman eq. 23
        v = self.velocity(model)(xt, t)
        return {"loss": ((v - target) ** 2).mean()}

    def _solve(
        self, f: Callable[[float, State], State], y0: State, t0: float, t1: float, steps: int, solver: str
    ) -> tuple[State, int]:
        if solver == "rk4":
            return rk4(f, y0, t0, t1, steps)
        return rk45(f, y0, t0, t1, self.cfg.rtol, self.cfg.atol)

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module | VectorField,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device=None,
        steps: int | None = None,
        velocity: VectorField | None = None,
    ) -> tuple[Tensor, int]:
        """x_1 (shape) from x_0 ~ N(0, I) by integrating dx/dt = v from t = 0 to 1; and the evaluations."""
        v = velocity or self.velocity(model)
        x0 = torch.randn(shape, generator=generator).to(device)

        def f(t: float, y: State) -> State:
            return (v(y[0], torch.full((shape[0],), t, device=y[0].device)),)

        (x1,), nfe = self._solve(f, (x0,), 0.0, 1.0, steps or self.cfg.sample_steps, self.cfg.sample_solver)
        return x1, nfe

    def log_prob(
        self,
        model: nn.Module | None,
        x1: Tensor,
        generator: torch.Generator | None = None,
        velocity: VectorField | None = None,
        trace: str | None = None,
    ) -> tuple[Tensor, int]:
        """log p_1(x1) per row (B,) and the evaluations: the ODE with the divergence, integrated from t = 1
        back to 0 (Chen eq. 4), plus log N(x_0; 0, I)."""
        v = velocity or self.velocity(model)
        trace = trace or self.cfg.trace
        eps = draw_probe(tuple(x1.shape), self.cfg.probe, generator, x1.device) if trace == "hutchinson" else None

        def f(t: float, y: State) -> State:
            with torch.enable_grad():
                x = y[0].detach().requires_grad_(True)
                vx = v(x, torch.full((x.shape[0],), t, device=x.device))
                div = divergence_exact(vx, x) if eps is None else divergence_hutchinson(vx, x, eps)
            return vx.detach(), div.detach()

        # delta(t) = int_1^t div ds, so at t = 0 it is -int_0^1 div dt and log p_1 = log p_0(x_0) + delta(0)
        (x0, delta), nfe = self._solve(
            f, (x1, x1.new_zeros(x1.shape[0])), 1.0, 0.0, self.cfg.likelihood_steps, self.cfg.likelihood_solver
        )
        return standard_normal_log_prob(x0) + delta, nfe

    def bits_per_dim(self, model: nn.Module, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, int]:
        """bpd (B,) of dequantised images y in [0, 1)^D through x = 2y - 1; and the evaluations."""
        x, logdet_pre = affine_preprocess(y)
        log_px, nfe = self.log_prob(model, x, generator)
        return bits_per_dim(log_px, logdet_pre, y[0].numel()), nfe


def gaussian_ot_velocity(mean: Tensor, std: float, sigma_min: float) -> VectorField:
    """The exact marginal vector field of the conditional OT path when the data are N(mean, std^2 I):
    x_t ~ N(t mean, V_t I), V_t = a_t^2 + t^2 std^2, a_t = 1 - (1 - sigma_min) t, and
    v(x, t) = E[u_t | x_t = x] = mean + (t std^2 - (1 - sigma_min) a_t) / V_t (x - t mean).
    Its flow ends at N(mean, (sigma_min^2 + std^2) I): a reference with a closed-form likelihood."""

    def v(x: Tensor, t: Tensor) -> Tensor:
        tb = t.view(-1, *([1] * (x.dim() - 1)))
        a = 1 - (1 - sigma_min) * tb
        var = a**2 + tb**2 * std**2
        return mean + (tb * std**2 - (1 - sigma_min) * a) / var * (x - tb * mean)

    return v


class MLPVectorField(nn.Module):
    """A small vector field for flat data (B, D): an MLP on [x, sin/cos(t)] (toy problems and tests)."""

    def __init__(self, dims: int, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = dims + 2
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*blocks, nn.Linear(width, dims))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.view(-1, 1).to(x.dtype) * (math.pi / 2)
        return self.net(torch.cat([x, torch.sin(t).expand(len(x), 1), torch.cos(t).expand(len(x), 1)], dim=1))
