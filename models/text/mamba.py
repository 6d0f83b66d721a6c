"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces") as a language model.

Reads like the paper: config; the selective scan (Algorithm 2, "S6") as a sequential reference and as a
chunked scan for training; the Mamba block (Figure 3); residual blocks with RMSNorm; the LM.

The selective SSM, per channel d and state n (Section 3.2, eq. 2a-2b with the discretisation of eq. 4):

    A = -exp(A_log)                           (D, N) real, S4D-Real init A_n = -(n+1)
    dt_t = softplus(dt_proj(x_t))             (B, L, D) input-dependent step ("selection")
    B_t, C_t = linear(x_t)                    (B, L, N) input-dependent, shared across channels
    dA_t = exp(dt_t A)                        zero-order hold for A
    dB_t = dt_t B_t                           simplified Euler for B (as the reference code does)
    h_t = dA_t * h_{t-1} + dB_t x_t           (B, D, N)
    y_t = C_t . h_t + D x_t                   (B, D)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class MambaConfig:
    vocab_size: int
    context_length: int = 256  # training window; the model itself accepts any length
    d_model: int = 128
    n_layer: int = 4
    d_state: int = 16  # N
    d_conv: int = 4
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int = 0  # 0: ceil(d_model / 16), the paper's "auto"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj
    norm_eps: float = 1e-5
    dropout: float = 0.0  # on the embedding output only; the paper uses none
    tie_weights: bool = True
    scan: Literal["parallel", "sequential"] = "parallel"
    chunk_size: int = 16  # parallel scan chunk length; tuned on CPU, see benchmarks/bench_scan.py

    def __post_init__(self) -> None:
        positive = ("vocab_size", "context_length", "d_model", "n_layer", "d_state", "d_conv", "expand", "chunk_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dt_rank < 0:
            raise ValueError(f"dt_rank must be >= 0 (0 = ceil(d_model / 16)), got {self.dt_rank}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min must be in (0, dt_max], got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.dt_init_floor <= 0:
            raise ValueError(f"dt_init_floor must be > 0, got {self.dt_init_floor}")
        if self.dt_scale <= 0:
            raise ValueError(f"dt_scale must be > 0, got {self.dt_scale}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.scan not in ("parallel", "sequential"):
            raise ValueError(f"scan must be 'parallel' or 'sequential', got {self.scan!r}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)


# ----------------------------------------------------------------------------------------------------
# Selective scan. Shapes: u, delta (B, L, D); A (D, N); B, C (B, L, N); D (D,); state (B, D, N).


def selective_scan_ref(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, return_last_state: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential reference (the paper's recurrence, one time step at a time; autograd gives the gradients).

    `delta` is the step after softplus. Iterates with `unbind` rather than indexing `dA[:, t]`: autograd's
    backward of an index scatters into a full-size zero tensor per step, quadratic in L.
    """
    dA = torch.exp(delta.unsqueeze(-1) * A)  # (B, L, D, N) ZOH for A
    dBu = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # (B, L, D, N) Euler for B, times the input
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])  # (B, D, N)
    ys = []
    for dA_t, dBu_t, C_t in zip(dA.unbind(1), dBu.unbind(1), C.unbind(1)):
        h = dA_t * h + dBu_t  # (B, D, N)
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))  # (B, D)
    y = torch.stack(ys, dim=1)  # (B, L, D)
    if D is not None:
        y = y + u * D
    return (y, h) if return_last_state else y


def selective_scan_parallel(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    return_last_state: bool = False,
    chunk_size: int = 16,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked selective scan, equal to `selective_scan_ref` in outputs and gradients; see `_ChunkedScan`."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if D is None:
        D = u.new_zeros(u.shape[-1])
    # The recurrence runs in float32 at least (as the reference CUDA kernel): under bf16 autocast, a long
    # product of decays in 8 mantissa bits would drift.
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        y, h_last = _ChunkedScan.apply(*(t.to(dtype) for t in (u, delta, A, B, C, D)), chunk_size)
    y = y.to(u.dtype)
    return (y, h_last) if return_last_state else y


# Working set of one block of chunks processed together (elements of a (B, G, Q, N, D) tensor): small
# enough to stay in cache on a laptop CPU, large enough that each vectorised step amortises Python overhead.
_BLOCK_ELEMENTS = 1 << 19


class _ChunkedScan(torch.autograd.Function):
    """The linear recurrence h_t = a_t h_{t-1} + b_t with a_t = exp(dt_t A), b_t = dt_t x_t B_t, by chunks.

    Split time into chunks of Q steps and process a block of G chunks at once, every operation acting on
    all G chunks together (that is the parallelism; G is set so a block stays in cache). The decay across
    a chunk has a closed form from the cumulative sum of log a: prod_t a_t = exp(A sum_t dt_t). Every
    exponent in this class is <= 0 (A < 0, dt >= 0): nothing overflows, whatever dt the model produces.

    Forward, per block:
      1. local scans with zero initial state, one step for all chunks at a time (Q steps): end states z_c;
      2. the short sequential loop over chunks: H_{c+1} = exp(A sum_{t in c} dt_t) H_c + z_c;
      3. rescan every chunk from its true initial state H_c, and contract with C.
    The closed forms inside a chunk lose on a CPU: h_t = exp(A S_t) cumsum_j(exp(-A S_j) b_j), S the
    running sum of dt, needs exp(-A S_j) > 1, which overflows float32 once |A| S passes ~88; the masked
    Q x Q decay matrix exp(A (S_t - S_j)) is stable but costs Q times the exps and memory of the scan.

    Backward is the adjoint recurrence, solved by the same chunked scheme in reverse time:
      g_t = C_t dy_t + a_{t+1} g_{t+1}      (g = dL/dh, seeded at t = L by dL/dh_L)
      dL/db_t = g_t,   dL/da_t = g_t h_{t-1}
    then the chain rule through a = exp(dt A) and b = dt x B. Only the chunk initial states H_c
    (B, L/Q, N, D) are saved; h is recomputed block by block, so the scan holds O(B L D N / Q) memory beyond
    its inputs where autograd through the reference holds several (B, L, D, N) tensors.
    The state is laid out (N, D) so the contractions over N are matrix products with a long last axis.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, chunk_size):  # noqa: D102 (documented on the class)
        Bsz, L, Dm = u.shape
        N = A.shape[1]
        Q = min(chunk_size, L)
        pad = (-L) % Q
        # Padding with dt = 0 gives a = 1, b = 0: the state passes through padded steps unchanged.
        u_, delta_, B_, C_ = (F.pad(t, (0, 0, 0, pad)).contiguous() for t in (u, delta, B, C))
        nc = (L + pad) // Q
        At = A.t().contiguous()  # (N, D)
        dl = delta_.view(Bsz, nc, Q, Dm)  # (B, nc, Q, D)
        du = (delta_ * u_).view(Bsz, nc, Q, Dm)  # (B, nc, Q, D)
        Bc, Cc = B_.view(Bsz, nc, Q, N), C_.view(Bsz, nc, Q, N)  # (B, nc, Q, N)
        G = max(1, min(nc, _BLOCK_ELEMENTS // (Bsz * Q * N * Dm)))  # chunks per block

        y = u.new_empty(Bsz, nc, Q, Dm)
        H_init = u.new_empty(Bsz, nc, N, Dm)  # state entering each chunk, saved for backward
        H = u.new_zeros(Bsz, N, Dm)  # (B, N, D) state carried between chunks
        a = u.new_empty(Bsz, G, Q, N, Dm)  # reused block buffers
        h = torch.empty_like(a)
        for c0 in range(0, nc, G):
            blk = slice(c0, min(c0 + G, nc))
            g = blk.stop - blk.start
            a_, h_ = a[:, :g], h[:, :g]
            torch.mul(dl[:, blk, :, None, :], At, out=a_).exp_()  # (B, g, Q, N, D) a_t = exp(dt_t A)
            torch.mul(du[:, blk, :, None, :], Bc[:, blk, :, :, None], out=h_)  # (B, g, Q, N, D) b_t
            a_q, h_q = a_.unbind(2), h_.unbind(2)  # per-step views (B, g, N, D)
            # 1. zero-initial-state end states of every chunk in the block
            z = h_q[0]
            for q in range(1, Q):
                z = torch.addcmul(h_q[q], a_q[q], z)
            # 2. carry the state across chunks with the closed-form chunk decay exp(A sum dt)
            decay = torch.exp(dl[:, blk].sum(2)[:, :, None, :] * At)  # (B, g, N, D)
            for c in range(g):
                H_init[:, c0 + c] = H
                H = torch.addcmul(z[:, c], decay[:, c], H)
            # 3. rescan from the true initial states, in place over b: h_t = a_t h_{t-1} + b_t
            h_q[0].addcmul_(a_q[0], H_init[:, blk])
            for q in range(1, Q):
                h_q[q].addcmul_(a_q[q], h_q[q - 1])
            torch.matmul(Cc[:, blk, :, None, :], h_, out=y[:, blk, :, None, :])  # (B, g, Q, 1, D) y = C . h
        ctx.save_for_backward(u_, delta_, A, B_, C_, D, H_init)
        ctx.L, ctx.Q, ctx.G = L, Q, G
        y = y.view(Bsz, L + pad, Dm)[:, :L] + u * D  # (B, L, D)
        return y, H.transpose(1, 2).contiguous()  # (B, L, D), (B, D, N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh_last):  # noqa: D102
        with torch.autocast(device_type=dy.device.type, enabled=False):
            return _ChunkedScan._backward(ctx, dy, dh_last)

    @staticmethod
    def _backward(ctx, dy, dh_last):
        u_, delta_, A, B_, C_, D, H_init = ctx.saved_tensors
        L, Q, G = ctx.L, ctx.Q, ctx.G
        Bsz, Lp, Dm = u_.shape
        N, nc = A.shape[1], Lp // Q
        At = A.t().contiguous()  # (N, D)
        dy_ = F.pad(dy, (0, 0, 0, Lp - L)).contiguous()  # (B, Lp, D) padded steps have no output
        dyc = dy_.view(Bsz, nc, Q, Dm)
        dl, uc = delta_.view(Bsz, nc, Q, Dm), u_.view(Bsz, nc, Q, Dm)
        du = (delta_ * u_).view(Bsz, nc, Q, Dm)
        Bc, Cc = B_.view(Bsz, nc, Q, N), C_.view(Bsz, nc, Q, N)

        g_delta, g_du = torch.empty_like(dl), torch.empty_like(dl)  # (B, nc, Q, D)
        g_B, g_C = torch.empty_like(Bc), torch.empty_like(Cc)  # (B, nc, Q, N)
        g_At = torch.zeros_like(At)  # (N, D)
        # X: adjoint arriving at a chunk's last step from the future, a_{t+1} g_{t+1}; seeded by dL/dh_L.
        X = dh_last.transpose(1, 2).contiguous() if dh_last is not None else u_.new_zeros(Bsz, N, Dm)
        a = u_.new_empty(Bsz, G, Q, N, Dm)
        gg = torch.empty_like(a)
        scratch = torch.empty_like(a)
        hp = u_.new_empty(Bsz, G, Q + 1, N, Dm)  # hp[:, :, q] = h_{q-1}: previous states, shifted by one
        for c0 in reversed(range(0, nc, G)):
            blk = slice(c0, min(c0 + G, nc))
            g = blk.stop - blk.start
            a_, gg_, hp_, scratch_ = a[:, :g], gg[:, :g], hp[:, :g], scratch[:, :g]
            a_q, gg_q, hp_q = a_.unbind(2), gg_.unbind(2), hp_.unbind(2)  # per-step views (B, g, N, D)
            # recompute a and the states of this block from the saved chunk initial states
            torch.mul(dl[:, blk, :, None, :], At, out=a_).exp_()  # (B, g, Q, N, D)
            torch.mul(du[:, blk, :, None, :], Bc[:, blk, :, :, None], out=hp_[:, :, 1:])  # b_t
            hp_q[0].copy_(H_init[:, blk])
            for q in range(Q):
                hp_q[q + 1].addcmul_(a_q[q], hp_q[q])
            # adjoint recurrence g_t = e_t + a_{t+1} g_{t+1} with e_t = C_t dy_t, by chunks in reverse
            torch.mul(dyc[:, blk, :, None, :], Cc[:, blk, :, :, None], out=gg_)  # (B, g, Q, N, D) e_t
            w = gg_q[Q - 1]  # 1. zero-terminal adjoint at each chunk's first step
            for q in range(Q - 2, -1, -1):
                w = torch.addcmul(gg_q[q], a_q[q + 1], w)
            # decay from a chunk's first step to its end, prod_{i=1}^{Q-1} a_i = exp(A sum_{i>=1} dt_i)
            decay = torch.exp(dl[:, blk, 1:].sum(2)[:, :, None, :] * At)  # (B, g, N, D)
            X_in = torch.empty_like(decay)
            for c in range(g - 1, -1, -1):  # 2. carry the adjoint backwards across chunks
                X_in[:, c] = X
                X = a_[:, c, 0] * torch.addcmul(w[:, c], decay[:, c], X)
            gg_q[Q - 1].add_(X_in)  # 3. rescan with the true terminal adjoints, in place over e
            for q in range(Q - 2, -1, -1):
                gg_q[q].addcmul_(a_q[q + 1], gg_q[q + 1])
            # chain rule through a = exp(dt A) and b = dt u B
            s = torch.matmul(Bc[:, blk, :, None, :], gg_).squeeze(-2)  # (B, g, Q, D) sum_n B_n g_n
            g_B[:, blk] = torch.mul(gg_, du[:, blk, :, None, :], out=scratch_).sum(-1)  # (B, g, Q, N)
            g_C[:, blk] = torch.mul(hp_[:, :, 1:], dyc[:, blk, :, None, :], out=scratch_).sum(-1)  # (B, g, Q, N)
            r = a_.mul_(gg_).mul_(hp_[:, :, :Q])  # (B, g, Q, N, D) dL/da_t * a_t
            g_At += torch.mul(r, dl[:, blk, :, None, :], out=scratch_).sum((0, 1, 2))  # (N, D)
            g_delta[:, blk] = r.mul_(At).sum(-2) + s * uc[:, blk]  # (B, g, Q, D)
            g_du[:, blk] = s
        g_du = g_du.view(Bsz, Lp, Dm)[:, :L]
        g_u = g_du * delta_[:, :L] + dy * D
        g_delta = g_delta.view(Bsz, Lp, Dm)[:, :L]
        g_D = (dy * u_[:, :L]).sum((0, 1))
        g_B, g_C = g_B.view(Bsz, Lp, N)[:, :L], g_C.view(Bsz, Lp, N)[:, :L]
        return g_u, g_delta, g_At.t(), g_B, g_C, g_D, None


# ----------------------------------------------------------------------------------------------------
# Mamba block (paper Figure 3): in_proj -> conv -> SiLU -> selective SSM, gated by SiLU(z) -> out_proj


class MambaMixer(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        d_inner, dt_rank, N = cfg.d_inner, cfg.resolved_dt_rank, cfg.d_state
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=cfg.bias)  # to x and the gate z
        self.conv1d = nn.Conv1d(
            d_inner, d_inner, cfg.d_conv, groups=d_inner, padding=cfg.d_conv - 1, bias=cfg.conv_bias
        )  # causal depthwise: pad both sides, keep the first L outputs
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * N, bias=False)  # selection: dt (low rank), B, C
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=cfg.bias)

        # dt init (paper Section 3.6 / reference code): weights so the projection keeps unit scale, bias so
        # softplus(bias) is log-uniform in [dt_min, dt_max]
        std = dt_rank**-0.5 * cfg.dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.dt_proj.bias._no_reinit = True

        # S4D-Real init A_n = -(n+1), stored as log(-A) so A stays negative
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(d_inner, 1)  # (D, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner))  # skip connection
        self.D._no_weight_decay = True

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dt, B, C = self.x_proj(x).split([self.cfg.resolved_dt_rank, self.cfg.d_state, self.cfg.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C  # dt (..., D), B (..., N), C (..., N)

    def forward(self, hidden: Tensor) -> Tensor:
        Bsz, L, _ = hidden.shape
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, L, D) each
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :L].transpose(1, 2))  # (B, L, D) causal conv
        dt, B, C = self._ssm_inputs(x)  # (B, L, D), (B, L, N), (B, L, N)
        A = -torch.exp(self.A_log)  # (D, N)
        if self.cfg.scan == "parallel":
            y = selective_scan_parallel(x, dt, A, B, C, self.D, chunk_size=self.cfg.chunk_size)
        else:
            y = selective_scan_ref(x, dt, A, B, C, self.D)
        return self.out_proj(y * F.silu(z))  # (B, L, d_model)

    def init_state(self, batch_size: int, device=None, dtype=None) -> tuple[Tensor, Tensor]:
        conv_state = torch.zeros(batch_size, self.cfg.d_inner, self.cfg.d_conv, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch_size, self.cfg.d_inner, self.cfg.d_state, device=device, dtype=dtype)
        return conv_state, ssm_state  # (B, D, d_conv), (B, D, N)

    def step(self, hidden: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One token: hidden (B, d_model) -> (B, d_model) and the new (conv_state, ssm_state)."""
        conv_state, ssm_state = state
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, D)
        conv_state = torch.cat([conv_state[:, :, 1:], x[:, :, None]], dim=-1)  # (B, D, d_conv) last inputs
        x = (conv_state * self.conv1d.weight[:, 0]).sum(-1)  # (B, D) the conv's last output
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, B, C = self._ssm_inputs(x)  # (B, D), (B, N), (B, N)
        A = -torch.exp(self.A_log)  # (D, N)
        dA = torch.exp(dt[:, :, None] * A)  # (B, D, N)
        ssm_state = dA * ssm_state + (dt * x)[:, :, None] * B[:, None, :]  # (B, D, N)
        y = torch.einsum("bdn,bn->bd", ssm_state, C) + self.D * x  # (B, D)
        return self.out_proj(y * F.silu(z)), (conv_state, ssm_state)


# ----------------------------------------------------------------------------------------------------
# Residual block and LM


class MambaBlock(nn.Module):
    """Pre-norm residual: h + Mixer(RMSNorm(h)), as the reference `Block`."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = MambaMixer(cfg)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.mixer(self.norm(h))  # (B, L, C)

    def step(self, h: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        out, state = self.mixer.step(self.norm(h), state)
        return h + out, state  # (B, C)


class MambaLM(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2 style rescaling of the residual output projections by 1/sqrt(n_layer) (reference code's
        # `rescale_prenorm_residual`, one residual per layer)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(cfg.n_layer)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.drop(self.tok_emb(idx))  # (B, T, C)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.norm_f(h))  # (B, T, V)

    def init_state(self, batch_size: int, device=None, dtype=None) -> list[tuple[Tensor, Tensor]]:
        dtype = dtype or self.tok_emb.weight.dtype
        return [b.mixer.init_state(batch_size, device, dtype) for b in self.blocks]

    def step(self, idx_t: Tensor, state: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Recurrent inference: token ids (B,) -> logits (B, V) and the new per-layer states."""
        h = self.tok_emb(idx_t)  # (B, C)
        new_state = []
        for block, s in zip(self.blocks, state):
            h, s = block.step(h, s)
            new_state.append(s)
        return self.lm_head(self.norm_f(h)), new_state  # (B, V)
