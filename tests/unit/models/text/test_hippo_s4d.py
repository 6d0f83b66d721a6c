"""HiPPO-LegS operator and projection, S4D initialisations, S4D discretisation and its two modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch

from models.text.hippo import (
    legendre,
    legs_matrices,
    legs_nplr,
    legs_project,
    legs_reconstruct,
    s4d_legs,
    s4d_lin,
)
from models.text.s4d import S4DConfig, S4DLayer, discretize_zoh

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_legs_matrices_by_hand_n3():
    A, B = legs_matrices(3)
    s3, s5, s15 = math.sqrt(3), math.sqrt(5), math.sqrt(15)
    expected_A = torch.tensor([[-1.0, 0.0, 0.0], [-s3, -2.0, 0.0], [-s5, -s15, -3.0]], dtype=torch.float64)
    torch.testing.assert_close(A, expected_A, rtol=0, atol=1e-15)
    torch.testing.assert_close(B, torch.tensor([1.0, s3, s5], dtype=torch.float64), rtol=0, atol=1e-15)


def test_legendre_matches_scipy():
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    expected = np.stack([scipy.special.eval_legendre(n, x.numpy()) for n in range(12)], axis=-1)
    np.testing.assert_allclose(legendre(12, x).numpy(), expected, atol=1e-12)


def _signal(t: torch.Tensor) -> torch.Tensor:
    return torch.sin(4 * math.pi * t) + 0.5 * t**2 - t


def _reconstruction_error(N: int, L: int, method: str) -> float:
    t = torch.arange(1, L + 1, dtype=torch.float64) / L  # f_k = f(k / L)
    c = legs_project(_signal(t), N, method)  # state at t = 1 summarises [0, 1]
    s = torch.linspace(0.5, 1.0, 501, dtype=torch.float64)  # second half of the history
    return (legs_reconstruct(c, s) - _signal(s)).abs().max().item()


def test_legs_online_projection_reconstructs_signal():
    # N = 32 scaled Legendre polynomials represent the signal to ~1e-6 (truncation); what remains is the
    # discretisation: the paper's GBT evaluates the 1/t factor at the step's end, so the error is first
    # order in the step, about max|f'| / (2L) for bilinear: 3.2e-3 at L = 2000.
    err_1000 = _reconstruction_error(32, 1000, "bilinear")
    err_2000 = _reconstruction_error(32, 2000, "bilinear")
    assert err_2000 < 4e-3
    assert 1.8 < err_1000 / err_2000 < 2.2  # converges, at first order
    assert _reconstruction_error(32, 2000, "forward") < 1.2e-2  # forward Euler (HiPPO eq. 4): ~3x worse


def test_legs_projection_of_constant():
    # A constant is the first basis function and e_0 is a fixed point of every step; only the first step,
    # from c = 0, errs, and LegS forgets it as 1/L
    errors = []
    for L in (1000, 2000):
        c = legs_project(torch.ones(L, dtype=torch.float64), 8)
        errors.append((c - torch.eye(8, dtype=torch.float64)[0]).abs().max().item())
    assert errors[1] < 1e-3
    assert 1.9 < errors[0] / errors[1] < 2.1


def test_s4d_legs_is_the_diagonal_of_the_nplr_form():
    N = 16
    A, _ = legs_matrices(N)
    A_N, P, (w, V) = legs_nplr(N)
    # A = V diag(w) V^* - P P^T, V unitary
    low_rank = P[:, None] * P[None, :]
    torch.testing.assert_close(V @ torch.diag(w) @ V.conj().T - low_rank, A.to(V.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(V.conj().T @ V, torch.eye(N, dtype=V.dtype), atol=1e-10, rtol=0)
    # independent check with a general eigensolver: every eigenvalue of the normal part has real part -1/2
    eig = torch.linalg.eigvals(A_N)
    assert (eig.real + 0.5).abs().max() < 1e-9
    A_diag, B_diag = s4d_legs(N)
    assert A_diag.shape == (N // 2,) and (A_diag.real + 0.5).abs().max() < 1e-12
    positive = torch.sort(eig.imag[eig.imag > 0]).values
    torch.testing.assert_close(torch.sort(A_diag.imag).values, positive, atol=1e-9, rtol=0)
    # B is LegS's B in the eigenbasis of the kept modes: the conjugate modes carry the conjugate
    # coefficients, so B = 2 Re(V_kept (V_kept^* B))
    _, B = legs_matrices(N)
    V_kept = V[:, w.imag > 0]
    torch.testing.assert_close(2 * (V_kept @ B_diag).real, B, atol=1e-10, rtol=0)


def test_s4d_lin():
    A, B = s4d_lin(8)
    expected = torch.tensor([complex(-0.5, math.pi * n) for n in range(4)], dtype=torch.complex128)
    torch.testing.assert_close(A, expected)
    assert torch.equal(B, torch.ones_like(B))
    with pytest.raises(ValueError, match="even"):
        s4d_lin(7)


def test_zoh_equals_matrix_exponential():
    # ZOH of x' = A x + B u over a step dt: [dA dB; 0 1] = expm(dt [A B; 0 0]) (Van Loan's block form)
    A = torch.tensor([-0.5 + 2.0j, -1.3 + 0.1j, -0.2 - 3.0j], dtype=torch.complex128)
    B = torch.tensor([1.0 - 0.5j, 0.3 + 0.0j, -2.0 + 1.0j], dtype=torch.complex128)
    dt = 0.37
    dA, dB = discretize_zoh(A, B, dt)
    M = np.zeros((4, 4), dtype=np.complex128)
    M[:3, :3] = np.diag(A.numpy())
    M[:3, 3] = B.numpy()
    E = scipy.linalg.expm(dt * M)
    np.testing.assert_allclose(np.diag(E[:3, :3]), dA.numpy(), atol=1e-12)
    np.testing.assert_allclose(E[:3, 3], dB.numpy(), atol=1e-12)


@pytest.mark.parametrize("init", ["legs", "lin"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_s4d_fft_convolution_equals_recurrence(init, dtype, tol):
    torch.manual_seed(0)
    cfg = S4DConfig(vocab_size=2, d_model=6, d_state=16, init=init, dt_min=0.01, dt_max=0.5)
    layer = S4DLayer(cfg).to(dtype).eval()
    u = torch.randn(3, 50, 6, dtype=dtype)
    with torch.no_grad():
        conv, rec = layer(u), layer.forward_recurrent(u)
    torch.testing.assert_close(conv, rec, rtol=tol, atol=tol)
