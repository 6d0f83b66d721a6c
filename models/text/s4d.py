"""S4D (Gu, Gupta, Goel, Re 2022, "On the Parameterization and Initialization of Diagonal State Space Models")
as a language model.

Reads like the paper: config; discretisation (Section 3.1, zero-order hold); the convolution kernel by a
Vandermonde product (Section 3.2, eq. 6); the layer, with its convolution (FFT, training) and recurrent
(step by step, generation) modes; the residual block; the LM.

Per channel h (H = d_model independent SSMs), with a diagonal complex state of N/2 modes:

    x'(t) = A x(t) + B u(t),   y(t) = 2 Re(C x(t)) + D u(t)          A = diag(-exp(log_A_real) + i A_imag)

The "2 Re" keeps one mode of each conjugate pair of a real N-dimensional SSM (S4D paper Section 3.2), so
`d_state` N is the real state size and the layer stores N/2 complex modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.text.hippo import S4D_INITS

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class S4DConfig:
    vocab_size: int
    context_length: int = 256  # training window; the model itself accepts any length
    d_model: int = 128  # H
    n_layer: int = 4
    d_state: int = 64  # N, even: N/2 complex modes
    init: Literal["legs", "lin"] = "legs"  # S4D-LegS (default) or S4D-Lin, see models/text/hippo.py
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    mlp_ratio: int = 4  # hidden size of the MLP sublayer / d_model; 0: no MLP sublayer
    dropout: float = 0.1
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "n_layer", "d_state"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_state % 2:
            raise ValueError(f"d_state must be even (conjugate pairs of modes), got {self.d_state}")
        if self.init not in S4D_INITS:
            raise ValueError(f"init must be one of {sorted(S4D_INITS)}, got {self.init!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min must be in (0, dt_max], got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be >= 0, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


# ----------------------------------------------------------------------------------------------------
# Discretisation and kernel


def discretize_zoh(A: Tensor, B: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-order hold for a diagonal system (S4D paper eq. 4 / Section 3.1):

        dA = exp(dt A),    dB = (dt A)^{-1} (exp(dt A) - 1) dt B = (dA - 1) / A * B

    the exact solution over one step when u is constant across it. A, B (..., N/2) complex, dt broadcastable.
    """
    dA = torch.exp(dt * A)
    return dA, (dA - 1) / A * B


def vandermonde_kernel(dtA: Tensor, CB: Tensor, L: int) -> Tensor:
    """K_l = 2 Re(sum_n CB_n exp(dtA_n)^l), l < L (S4D paper eq. 6): the SSM's impulse response.

    The powers come from exp(l dtA) rather than repeated products (a "log-Vandermonde" matrix): no error
    accumulates along l, and Re(dtA) < 0 keeps every entry bounded by 1.
    dtA, CB (H, N/2) complex -> K (H, L) real.
    """
    V = torch.exp(dtA[..., None] * torch.arange(L, device=dtA.device, dtype=dtA.real.dtype))  # (H, N/2, L)
    return 2 * torch.einsum("hn,hnl->hl", CB, V).real  # (H, L)


def fft_conv(u: Tensor, K: Tensor) -> Tensor:
    """Causal convolution y_t = sum_{l<=t} K_l u_{t-l} by FFT. u (B, H, L), K (H, L) -> (B, H, L).

    Zero-padding to 2L turns the FFT's circular convolution into a linear one, so no output sees the future.
    """
    L = u.shape[-1]
    dtype = torch.float64 if torch.float64 in (u.dtype, K.dtype) else torch.float32  # no half-precision FFTs
    k_f = torch.fft.rfft(K.to(dtype), n=2 * L)  # (H, L+1)
    u_f = torch.fft.rfft(u.to(dtype), n=2 * L)  # (B, H, L+1)
    return torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L].to(u.dtype)  # (B, H, L)


# ----------------------------------------------------------------------------------------------------
# S4D layer


class S4DLayer(nn.Module):
    """H independent diagonal SSMs, D skip, GELU, then a GLU output projection (the S4D reference layer).

    Parameters are real tensors (complex ones stored with `view_as_real`) so optimisers and state_dicts
    need no complex support. A is stored as log of -Re(A) (Re(A) stays negative: the SSM is stable for any
    parameter value) and Im(A); the step as log_dt, initialised log-uniform in [dt_min, dt_max].
    """

    def __init__(self, cfg: S4DConfig):
        super().__init__()
        H, N2 = cfg.d_model, cfg.d_state // 2
        A, B = S4D_INITS[cfg.init](cfg.d_state)  # (N/2,) complex128
        A, B = A.expand(H, N2), B.expand(H, N2)
        self.log_A_real = nn.Parameter(torch.log(-A.real).float())  # (H, N/2)
        self.A_imag = nn.Parameter(A.imag.float().clone())  # (H, N/2)
        self.B = nn.Parameter(torch.view_as_real(B.to(torch.complex64)).clone())  # (H, N/2, 2)
        # C ~ CN(0, 1) as in the paper's code: unit variance per mode
        self.C = nn.Parameter(torch.view_as_real(torch.randn(H, N2, dtype=torch.complex64)).clone())  # (H, N/2, 2)
        log_dt = torch.rand(H) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)
        self.log_dt = nn.Parameter(log_dt)  # (H,)
        self.D = nn.Parameter(torch.randn(H))
        for p in (self.log_A_real, self.A_imag, self.B, self.log_dt):
            p._no_weight_decay = True  # the SSM parameters are not weight-decayed in the S4 papers
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(cfg.dropout)
        self.output_linear = nn.Linear(H, 2 * H)  # followed by GLU

    def ssm_params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """dt A, the discretised (dA, dB), and C: each (H, N/2) complex."""
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)  # (H, N/2)
        dt = torch.exp(self.log_dt)[:, None]  # (H, 1)
        dA, dB = discretize_zoh(A, torch.view_as_complex(self.B), dt)
        return A * dt, dA, dB, torch.view_as_complex(self.C)

    def kernel(self, L: int) -> Tensor:
        """Convolution kernel K (H, L) of the discretised SSM."""
        dtA, _, dB, C = self.ssm_params()
        return vandermonde_kernel(dtA, C * dB, L)  # (H, L)

    def _output(self, y: Tensor, u: Tensor) -> Tensor:
        y = y + u * self.D  # (..., H) D skip
        y = self.dropout(self.activation(y))
        return F.glu(self.output_linear(y), dim=-1)  # (..., H)

    def forward(self, u: Tensor) -> Tensor:
        """Convolution mode. u (B, L, H) -> (B, L, H)."""
        L = u.shape[1]
        y = fft_conv(u.transpose(1, 2), self.kernel(L)).transpose(1, 2)  # (B, L, H)
        return self._output(y, u)

    def init_state(self, batch_size: int, device=None, dtype=torch.complex64) -> Tensor:
        return torch.zeros(batch_size, self.log_dt.shape[0], self.C.shape[1], device=device, dtype=dtype)  # (B, H, N/2)

    def step(self, u_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Recurrent mode, one step: x_t = dA x_{t-1} + dB u_t, y_t = 2 Re(C x_t). u_t (B, H), state (B, H, N/2)."""
        _, dA, dB, C = self.ssm_params()
        state = dA * state + dB * u_t[..., None]  # (B, H, N/2)
        y = 2 * (state * C).sum(-1).real  # (B, H)
        return self._output(y, u_t), state

    def forward_recurrent(self, u: Tensor) -> Tensor:
        """The recurrent twin of `forward`, one step at a time. u (B, L, H) -> (B, L, H)."""
        state = self.init_state(u.shape[0], u.device, torch.complex128 if u.dtype == torch.float64 else torch.complex64)
        ys = []
        for u_t in u.unbind(1):
            y_t, state = self.step(u_t, state)
            ys.append(y_t)
        return torch.stack(ys, dim=1)  # (B, L, H)


# ----------------------------------------------------------------------------------------------------
# Residual block and LM


class MLP(nn.Module):
    def __init__(self, d_model: int, ratio: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, ratio * d_model)
        self.proj = nn.Linear(ratio * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (..., C)


class S4DBlock(nn.Module):
    """Pre-norm residual: h + S4D(LN(h)), then h + MLP(LN(h)) when mlp_ratio > 0."""

    def __init__(self, cfg: S4DConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.s4d = S4DLayer(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.d_model) if cfg.mlp_ratio else None
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio, cfg.dropout) if cfg.mlp_ratio else None

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.drop(self.s4d(self.ln_1(h)))  # (B, T, C)
        if self.mlp is not None:
            h = h + self.mlp(self.ln_2(h))
        return h

    def step(self, h: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        y, state = self.s4d.step(self.ln_1(h), state)
        h = h + self.drop(y)  # (B, C)
        if self.mlp is not None:
            h = h + self.mlp(self.ln_2(h))
        return h, state


class S4DLM(nn.Module):
    """Token embedding, S4D blocks, final LayerNorm, head tied to the embedding. No position embedding: the
    recurrence itself knows the order."""

    def __init__(self, cfg: S4DConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(S4DBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        h = self.drop(self.tok_emb(idx))  # (B, T, C)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln_f(h))  # (B, T, V)

    def init_state(self, batch_size: int, device=None) -> list[Tensor]:
        dtype = torch.complex128 if self.tok_emb.weight.dtype == torch.float64 else torch.complex64
        return [b.s4d.init_state(batch_size, device, dtype) for b in self.blocks]

    def step(self, idx_t: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Recurrent inference: token ids (B,) -> logits (B, V) and the new per-layer states."""
        h = self.drop(self.tok_emb(idx_t))  # (B, C)
        new_state = []
        for block, s in zip(self.blocks, state):
            h, s = block.step(h, s)
            new_state.append(s)
        return self.lm_head(self.ln_f(h)), new_state  # (B, V)
