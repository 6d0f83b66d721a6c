"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") with the
adaLN-Zero block, plus the two SD3 options (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis"): RMSNorm on queries and keys per head (QK-normalisation, also ViT-22B) and
a choice between 2D and 1D sine-cosine position embeddings.

Like models/generative/unet.py, the network predicts one tensor the shape of its input from (x, t[, y]); what that
tensor means (noise, velocity) and how t is scaled are decided by the process that drives it.

    x (B, C, H, W) -> Conv2d(kernel p, stride p) -> tokens (B, N, D), N = (H / p) (W / p)     (DiT Fig. 4, "Patchify")
    tokens + fixed sine-cosine position embedding (2D as DiT / ViT-MAE, or 1D over the patch index)
    c = MLP(sinusoid(t)) + Embedding(y)   (B, D); the label table has num_classes + 1 rows, the last the null label
    DiT block (adaLN-Zero, DiT Section 3.2):
        (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c)), zero-initialised
        x = x + gate1 * Attn(LN(x) * (1 + scale1) + shift1)
        x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)
    final layer: LN(x) * (1 + scale) + shift -> Linear (zero-initialised) -> (B, N, p p C_out) -> unpatchify
With every adaLN modulation and the final linear at zero, each block is the identity and the network outputs
exactly 0 at initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.generative.unet import timestep_embedding

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class DiTConfig:
    in_channels: int = 4  # filled from the data by the pipeline (latent channels)
    image_size: int = 8  # H = W of the input; filled from the data
    num_classes: int = 10  # 0: unconditional; filled from the data
    out_channels: int = 0  # 0: same as in_channels
    patch_size: int = 2  # p; must divide image_size
    hidden_size: int = 128  # D
    depth: int = 4  # number of DiT blocks
    num_heads: int = 4  # must divide hidden_size
    mlp_ratio: float = 4.0
    pos_embed: Literal["2d", "1d"] = "2d"  # 2D sine-cosine over (row, col), or 1D over the flattened patch index
    qk_norm: bool = True  # RMSNorm on q and k per head (SD3, ViT-22B)
    max_period: float = 10000.0  # sinusoidal time embedding; suits time inputs on the scale of 0..1000
    frequency_embedding_size: int = 256  # width of the sinusoid fed to the time MLP (DiT's value)

    def __post_init__(self) -> None:
        for name in (
            "in_channels",
            "image_size",
            "patch_size",
            "hidden_size",
            "depth",
            "num_heads",
            "frequency_embedding_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.out_channels < 0:
            raise ValueError(f"out_channels must be >= 0 (0 = in_channels), got {self.out_channels}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.pos_embed not in ("2d", "1d"):
            raise ValueError(f"pos_embed must be '2d' or '1d', got {self.pos_embed!r}")
        # 2D: half of D per axis, each half split into sin and cos; 1D: D split into sin and cos.
        multiple = 4 if self.pos_embed == "2d" else 2
        if self.hidden_size % multiple:
            raise ValueError(
                f"hidden_size must be divisible by {multiple} for pos_embed={self.pos_embed!r}, got {self.hidden_size}"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"qk_norm must be a bool, got {self.qk_norm!r}")
        if self.max_period <= 1:
            raise ValueError(f"max_period must be > 1, got {self.max_period}")

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size  # patches per side

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# ----------------------------------------------------------------------------------------------------
# Fixed position embeddings (not learned; DiT and SD3 both use sine-cosine)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[sin(pos w_k), cos(pos w_k)], w_k = 10000^(-k / (dim / 2)) (Vaswani et al. 2017; ViT-MAE's helper)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))  # (dim/2,)
    args = positions.reshape(-1)[:, None] * omega[None]  # (N, dim/2)
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)  # (N, dim)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """Half of the dims encode the row, half the column, each as sincos_1d; patches in row-major order."""
    rows, cols = np.meshgrid(
        np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij"
    )  # (g, g) each
    return np.concatenate([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], axis=1)  # (g*g, dim)


def position_embedding(kind: Literal["2d", "1d"], dim: int, grid_size: int) -> Tensor:
    if kind == "2d":
        table = sincos_2d(dim, grid_size)
    else:
        table = sincos_1d(dim, np.arange(grid_size * grid_size, dtype=np.float64))
    return torch.from_numpy(table).float()[None]  # (1, N, dim)


# ----------------------------------------------------------------------------------------------------
# Patches


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p*C): row-major patches, each flattened as (p_row, p_col, channel)."""
    B, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)  # (B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)  # (B, N, p*p*C)


def unpatchify(x: Tensor, p: int, channels: int) -> Tensor:
    """(B, N, p*p*C) -> (B, C, H, W), the inverse of `patchify` (DiT's unpatchify)."""
    B, N, _ = x.shape
    h = w = int(math.isqrt(N))
    if h * w != N:
        raise ValueError(f"unpatchify needs a square number of patches, got {N}")
    x = x.reshape(B, h, w, p, p, channels)  # (B, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * p, w * p)  # (B, C, H, W)


# ----------------------------------------------------------------------------------------------------
# Modules


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, N, D) with (B, D) shift and scale


class TimestepEmbedder(nn.Module):
    """Sinusoid of the (B,) time input -> Linear-SiLU-Linear (DiT's TimestepEmbedder)."""

    def __init__(self, hidden_size: int, frequency_size: int, max_period: float) -> None:
        super().__init__()
        self.frequency_size, self.max_period = frequency_size, max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t, self.frequency_size, self.max_period)  # (B, F)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)


class Attention(nn.Module):
    """Multi-head self-attention; with qk_norm, RMSNorm (learned gain) over each head's q and k before the dot
    product, which bounds the attention logits (SD3 Section 5.3.2, ViT-22B)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def qk(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, hd) each
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qk(x)  # (B, nh, N, hd) each
        h = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd)
        return self.proj(h.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class DiTBlock(nn.Module):
    """adaLN-Zero block: LN without affine, modulated by (shift, scale) from c; each residual branch gated by a
    per-channel gate from c. The modulation Linear starts at zero, so the block starts as the identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        mods = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, D)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C_out)


# ----------------------------------------------------------------------------------------------------
# The DiT


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        # fixed, derived from the config: not a parameter and not stored in the state dict
        self.register_buffer("pos_embed", position_embedding(cfg.pos_embed, D, cfg.grid_size), persistent=False)
        self.t_embedder = TimestepEmbedder(D, cfg.frequency_embedding_size, cfg.max_period)
        # num_classes + 1 rows: the last one is the null label of classifier-free guidance
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, D) if cfg.num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, p, cfg.resolved_out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears (and the patch conv, viewed as a linear), N(0, 0.02) for
        the label table and time MLP, and zeros for every adaLN modulation and the final linear (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for module in [
            *(b.adaLN_modulation[-1] for b in self.blocks),
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def null_label(self) -> int:
        """The label meaning "unconditional"; `y=None` uses it too."""
        if not self.cfg.num_classes:
            raise AttributeError("an unconditional DiT (num_classes=0) has no null label")
        return self.cfg.num_classes

    def embed(self, x: Tensor) -> Tensor:
        return self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)

    def condition(self, t: Tensor, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full((batch,), self.null_label, dtype=torch.long, device=device)
            c = c + self.y_embedder(y)  # (B, D)
        elif y is not None:
            raise ValueError("y given to an unconditional DiT (num_classes=0)")
        return c

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x (B, C, H, W); t (B,) float time input; y (B,) long in [0, num_classes], or None (null label)."""
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] != cfg.image_size or x.shape[3] != cfg.image_size:
            raise ValueError(
                f"expected x of shape (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape ({x.shape[0]},), got {tuple(t.shape)}")
        h = self.embed(x)  # (B, N, D)
        c = self.condition(t, y, x.shape[0], x.device)  # (B, D)
        for block in self.blocks:
            h = block(h, c)  # (B, N, D)
        h = self.final_layer(h, c)  # (B, N, p*p*C_out)
        return unpatchify(h, cfg.patch_size, cfg.resolved_out_channels)  # (B, C_out, H, W)
