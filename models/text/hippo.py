"""HiPPO-LegS (Gu, Dao, Ermon, Rudra, Re 2020, "HiPPO: Recurrent Memory with Optimal Polynomial
Projections") and the diagonal S4D initialisations derived from it (Gu, Gupta, Goel, Re 2022, "On the
Parameterization and Initialization of Diagonal State Space Models").

HiPPO-LegS keeps, at every time t, the coefficients c(t) in R^N of the best approximation of the whole
history f(s), s in [0, t], by scaled Legendre polynomials under the uniform measure on [0, t]:

    g_n(s, t) = sqrt(2n + 1) P_n(2 s / t - 1),     c_n(t) = (1/t) int_0^t f(s) g_n(s, t) ds       (HiPPO eq. 19)

and those coefficients obey the linear ODE with the time-varying 1/t scaling

    d/dt c(t) = (1/t) A c(t) + (1/t) B f(t)                                                        (HiPPO eq. 3)

    A_nk = -sqrt(2n+1) sqrt(2k+1)  if n > k,   -(n+1)  if n == k,   0  if n < k,   B_n = sqrt(2n+1).

The paper writes the ODE as -(1/t) A c with a positive A; this module keeps the sign inside A, the
convention of the S4 papers, so the same A is the state matrix of the SSMs in s4d.py.

Everything here is double precision: the projection is a reference computation and the eigenvectors behind
S4D-LegS lose digits in float32 for large N.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------------
# The operator


def legs_matrices(N: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """HiPPO-LegS (A, B) with the sign convention of the module docstring: A (N, N), B (N,)."""
    if N < 1:
        raise ValueError(f"N must be >= 1, got {N}")
    r = torch.sqrt(2 * torch.arange(N, dtype=dtype) + 1)  # (N,) sqrt(2n+1)
    A = -torch.tril(r[:, None] * r[None, :], diagonal=-1)  # (N, N) strictly lower part
    A = A - torch.diag(torch.arange(1, N + 1, dtype=dtype))  # diagonal -(n+1)
    return A, r.clone()


# ----------------------------------------------------------------------------------------------------
# Online projection: discretise the LegS ODE (HiPPO Section 3.4 and Appendix B.3)


def legs_transitions(
    N: int, num_steps: int, method: Literal["bilinear", "forward", "backward"] = "bilinear", alpha: float | None = None
) -> tuple[Tensor, Tensor]:
    """Per-step (A_k, B_k) of the discretised LegS recurrence c_k = A_k c_{k-1} + B_k f_k, k = 1..num_steps.

    With step size dt = 1/num_steps on [0, 1] the ODE matrices at time t_k = k dt are A/t_k and B/t_k, so
    dt * A/t_k = A/k: the recurrence does not depend on dt (LegS is timescale invariant, HiPPO Prop. 3).
    The generalised bilinear transform (GBT, HiPPO eq. 26) with parameter alpha gives

        A_k = (I - alpha A/k)^{-1} (I + (1 - alpha) A/k),     B_k = (I - alpha A/k)^{-1} B/k

    alpha = 0 is forward Euler (HiPPO eq. 4 for LegS), 1/2 bilinear (the paper's choice), 1 backward Euler.
    `alpha` overrides `method` when given. Returns A_k (num_steps, N, N) and B_k (num_steps, N).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if alpha is None:
        alpha = {"forward": 0.0, "bilinear": 0.5, "backward": 1.0}[method]
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    A, B = legs_matrices(N)
    k = torch.arange(1, num_steps + 1, dtype=A.dtype)[:, None, None]  # (K, 1, 1)
    eye = torch.eye(N, dtype=A.dtype)
    lhs = eye - alpha * A / k  # (K, N, N) lower triangular: cheap, exact solves
    A_k = torch.linalg.solve_triangular(lhs, eye + (1 - alpha) * A / k, upper=False)  # (K, N, N)
    B_k = torch.linalg.solve_triangular(lhs, (B[:, None] / k), upper=False)[..., 0]  # (K, N)
    return A_k, B_k


def legs_project(
    f: Tensor, N: int, method: Literal["bilinear", "forward", "backward"] = "bilinear", return_all: bool = False
) -> Tensor:
    """Online LegS projection of samples f (..., L), f[..., k-1] = f(k/L), onto N coefficients.

    Returns the coefficients after the last sample (..., N), or after every sample (..., L, N) with
    `return_all`. The loop is the recurrence itself: this is a reference, not a training path.
    """
    L = f.shape[-1]
    A_k, B_k = legs_transitions(N, L, method)
    f = f.to(torch.float64)
    c = f.new_zeros(*f.shape[:-1], N)  # (..., N) c_0 = 0: nothing seen yet
    out = []
    for k in range(L):
        c = c @ A_k[k].T + B_k[k] * f[..., k, None]  # (..., N)
        if return_all:
            out.append(c)
    return torch.stack(out, dim=-2) if return_all else c


def legendre(n_max: int, x: Tensor) -> Tensor:
    """Legendre polynomials P_0..P_{n_max-1} at x (...,) -> (..., n_max), by Bonnet's recurrence
    (n+1) P_{n+1} = (2n+1) x P_n - n P_{n-1}, stable on [-1, 1]."""
    P = [torch.ones_like(x), x]
    for n in range(1, n_max - 1):
        P.append(((2 * n + 1) * x * P[n] - n * P[n - 1]) / (n + 1))
    return torch.stack(P[:n_max], dim=-1)


def legs_reconstruct(c: Tensor, s: Tensor) -> Tensor:
    """The signal a LegS state c (..., N) at time t represents, at relative positions s = time / t in [0, 1]
    (M,): f(s t) ~ sum_n c_n sqrt(2n+1) P_n(2s - 1) (HiPPO eq. 19 read backwards). Returns (..., M)."""
    N = c.shape[-1]
    s = s.to(c.dtype)
    scale = torch.sqrt(2 * torch.arange(N, dtype=c.dtype) + 1)  # (N,)
    G = legendre(N, 2 * s - 1) * scale  # (M, N) scaled Legendre basis g_n
    return c @ G.T  # (..., M)


# ----------------------------------------------------------------------------------------------------
# S4D initialisations (S4D paper Section 4)


def legs_nplr(N: int) -> tuple[Tensor, Tensor, Tensor]:
    """Normal-plus-low-rank form of LegS (S4 paper Section 3.3, S4D paper eq. 7): A = A_N - P P^T with

        P_n = sqrt(n + 1/2),    A_N = A + P P^T = -1/2 I + S,   S skew-symmetric.

    Returns A_N (N, N), P (N,), and the unitary eigendecomposition A_N = V diag(w) V^* as (w, V):
    S is skew-symmetric, so -iS is Hermitian and its real eigenvalues lambda give w = -1/2 + i lambda
    exactly; the real part is not a numerical estimate.
    """
    A, _ = legs_matrices(N)
    P = torch.sqrt(torch.arange(N, dtype=A.dtype) + 0.5)  # (N,)
    A_N = A + P[:, None] * P[None, :]  # (N, N)
    S = A_N + 0.5 * torch.eye(N, dtype=A.dtype)  # skew-symmetric part
    lam, V = torch.linalg.eigh(-1j * S.to(torch.complex128))  # (N,), (N, N): -iS V = V diag(lam)
    w = torch.complex(torch.full_like(lam, -0.5), lam)  # (N,) eigenvalues of A_N
    return A_N, P, (w, V)


def s4d_legs(N: int) -> tuple[Tensor, Tensor]:
    """S4D-LegS: the diagonal part of LegS's normal-plus-low-rank form (S4D paper Section 4.1).

    Diagonalise A_N = V diag(w) V^* and drop the low-rank term: A = diag(w), B = V^* B_LegS. Eigenvalues of
    a real matrix come in conjugate pairs; a diagonal SSM with output 2 Re(C x) only needs one of each, so
    this keeps the N/2 with positive imaginary part. Returns A (N/2,) complex with Re A = -1/2, B (N/2,).
    """
    if N < 2 or N % 2:
        raise ValueError(f"N must be even and >= 2 (conjugate pairs), got {N}")
    _, _, (w, V) = legs_nplr(N)
    _, B = legs_matrices(N)
    keep = w.imag > 0  # exactly N/2: S is non-singular for even N, eigenvalues come in +-lambda pairs
    A = w[keep]  # (N/2,)
    B = V[:, keep].conj().T @ B.to(V.dtype)  # (N/2,) V^* B
    return A, B


def s4d_lin(N: int) -> tuple[Tensor, Tensor]:
    """S4D-Lin (S4D paper eq. 9): A_n = -1/2 + i pi n, n < N/2, B_n = 1. The imaginary parts approximate
    those of S4D-LegS spread linearly, as Fourier frequencies."""
    if N < 2 or N % 2:
        raise ValueError(f"N must be even and >= 2 (conjugate pairs), got {N}")
    n = torch.arange(N // 2, dtype=torch.float64)
    A = torch.complex(torch.full_like(n, -0.5), math.pi * n)  # (N/2,)
    return A, torch.ones_like(A)


S4D_INITS = {"legs": s4d_legs, "lin": s4d_lin}
"""Named S4D initialisations; s4d.py defaults to "legs" (S4D-LegS)."""
