"""A small UNet in the DDPM / ADM style (Ho, Jain, Abbeel 2020, Appendix B; Dhariwal & Nichol 2021,
"Diffusion Models Beat GANs on Image Synthesis", Section 3), and its encoder half as a noise-conditional
classifier for classifier guidance (ADM's EncoderUNetModel).

The network predicts one tensor the shape of its input from (x, t[, y]); what that tensor means (noise,
score, velocity) and how t is scaled are decided by the process that drives it (diffusion.py, sde.py).

    t -> sinusoidal embedding (Transformer positional encoding) -> MLP -> emb      (B, 4C)
    y -> embedding table with num_classes + 1 rows (the last row: "no label", for classifier-free guidance)
    ResBlock:  h = conv(SiLU(GN(x)));  h = GN(h) * (1 + scale) + shift  with (scale, shift) = Linear(SiLU(emb))
               h = conv(dropout(SiLU(h)));  out = skip(x) + h            (ADM's adaptive GroupNorm)
    Attention: multi-head self-attention over the H*W positions at the configured resolutions.
    Cross-attention (context_dim > 0; Rombach et al. 2022, Section 3.3): after each self-attention, queries from
    the feature map, keys/values from (B, L, context_dim) context tokens (a caption), padded tokens masked.
    Encoder: [ResBlock (+Attn)] x num_res_blocks per level, stride-2 conv between levels; middle
    ResBlock-Attn-ResBlock; decoder mirrors it with skip concatenations and nearest-upsample + conv.
    The residual branches' last convs and the output conv start at zero: the network starts as the identity
    on its residual stream and outputs exactly 0 (ADM's zero_module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class UNetConfig:
    in_channels: int = 1
    out_channels: int = 0  # 0: same as in_channels
    image_size: int = 16  # H = W of the input; attention_resolutions are feature-map sizes below it
    base_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # one level per entry
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [8])
    num_heads: int = 4
    dropout: float = 0.1
    num_groups: int = 32  # GroupNorm groups; must divide every level's channels
    num_classes: int = 0  # 0: unconditional. UNet: label embedding (+1 null row). EncoderClassifier: logits
    max_period: float = 10000.0  # sinusoidal embedding; suits time inputs on the scale of 0..1000
    context_dim: int = 0  # > 0: cross-attention to context tokens after each self-attention; 0: none (unchanged)

    def __post_init__(self) -> None:
        self.channel_mult = list(self.channel_mult)
        self.attention_resolutions = list(self.attention_resolutions)
        for name in ("in_channels", "image_size", "base_channels", "num_res_blocks", "num_heads", "num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.out_channels < 0:
            raise ValueError(f"out_channels must be >= 0 (0 = in_channels), got {self.out_channels}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.context_dim < 0:
            raise ValueError(f"context_dim must be >= 0 (0 = no cross-attention), got {self.context_dim}")
        if not self.channel_mult or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of ints >= 1, got {self.channel_mult}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size must be divisible by 2**(len(channel_mult) - 1) = {factor}, got {self.image_size}"
            )
        resolutions = [self.image_size // 2**i for i in range(len(self.channel_mult))]
        bad = [r for r in self.attention_resolutions if r not in resolutions]
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not feature-map sizes of this UNet ({resolutions})")
        for m in self.channel_mult:
            ch = self.base_channels * m
            if ch % self.num_groups:
                raise ValueError(f"num_groups ({self.num_groups}) must divide every level's channels, not {ch}")
            if ch % self.num_heads:
                raise ValueError(f"num_heads ({self.num_heads}) must divide every level's channels, not {ch}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_period <= 1:
            raise ValueError(f"max_period must be > 1, got {self.max_period}")

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.base_channels


# ----------------------------------------------------------------------------------------------------
# Modules


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (B,) float or integer times (Vaswani et al. 2017, Section 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, num_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(num_groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift  # scale-shift injection of (t, y)
        h = self.conv2(self.dropout(F.silu(h)))  # (B, C_out, H, W)
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)  # (B, 3, nh, hd, HW)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, nh, HW, hd) each
        h = F.scaled_dot_product_attention(q, k, v)  # (B, nh, HW, hd)
        h = h.transpose(-1, -2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj(h)


class CrossAttentionBlock(nn.Module):
    """Queries from the feature map, keys and values from context tokens; `context_mask` (B, L) is True at
    padding, which no query attends to. Zero-initialised output: the block starts as the identity."""

    def __init__(self, channels: int, context_dim: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None = None) -> Tensor:
        if context is None:
            return x
        B, C, H, W = x.shape
        nh, L = self.num_heads, context.shape[1]
        q = self.q(self.norm(x)).reshape(B, nh, C // nh, H * W).transpose(-1, -2)  # (B, nh, HW, hd)
        k, v = self.kv(context).reshape(B, L, 2, nh, C // nh).permute(2, 0, 3, 1, 4)  # (B, nh, L, hd) each
        attend = None if context_mask is None else ~context_mask[:, None, None, :]  # (B, 1, 1, L) True: attend
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)  # (B, nh, HW, hd)
        h = h.transpose(-1, -2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class EmbedSequential(nn.Sequential):
    """A sequence of layers where ResBlocks also receive the embedding, cross-attention the context."""

    def forward(
        self,
        x: Tensor,
        emb: Tensor,
        context: Tensor | None = None,  # type: ignore[override]
        context_mask: Tensor | None = None,
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, CrossAttentionBlock):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


def _check_input(cfg: UNetConfig, x: Tensor, t: Tensor) -> Tensor:
    if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] != cfg.image_size or x.shape[3] != cfg.image_size:
        raise ValueError(
            f"expected x of shape (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}"
        )
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"expected t of shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


class _Encoder(nn.Module):
    """Time embedding, input blocks and middle block, shared by UNet and EncoderClassifier."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C, E, G = cfg.base_channels, cfg.time_embed_dim, cfg.num_groups
        self.time_embed = nn.Sequential(nn.Linear(C, E), nn.SiLU(), nn.Linear(E, E))
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(cfg.in_channels, C, 3, padding=1))])
        self.skip_channels = [C]
        ch, res = C, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, C * mult, E, cfg.dropout, G)]
                ch = C * mult
                if res in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg.num_heads, G))
                    if cfg.context_dim:
                        layers.append(CrossAttentionBlock(ch, cfg.context_dim, cfg.num_heads, G))
                self.input_blocks.append(EmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                self.skip_channels.append(ch)
                res //= 2
        cross = [CrossAttentionBlock(ch, cfg.context_dim, cfg.num_heads, G)] if cfg.context_dim else []
        self.middle_block = EmbedSequential(
            ResBlock(ch, ch, E, cfg.dropout, G),
            AttentionBlock(ch, cfg.num_heads, G),
            *cross,
            ResBlock(ch, ch, E, cfg.dropout, G),
        )
        self.out_channels = ch

    def embed_time(self, t: Tensor) -> Tensor:
        return self.time_embed(timestep_embedding(t, self.cfg.base_channels, self.cfg.max_period))  # (B, E)

    def forward(
        self, x: Tensor, emb: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context, context_mask)
            skips.append(h)
        return self.middle_block(
            h, emb, context, context_mask
        ), skips  # (B, C_top, H_low, W_low), one skip per input block


# ----------------------------------------------------------------------------------------------------
# The UNet


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C, E, G = cfg.base_channels, cfg.time_embed_dim, cfg.num_groups
        self.encoder = _Encoder(cfg)
        # num_classes + 1 rows: the last one is the null label of classifier-free guidance
        self.label_embed = nn.Embedding(cfg.num_classes + 1, E) if cfg.num_classes else None
        skip_channels = list(self.encoder.skip_channels)
        ch, res = self.encoder.out_channels, cfg.image_size // 2 ** (len(cfg.channel_mult) - 1)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + skip_channels.pop(), C * mult, E, cfg.dropout, G)]
                ch = C * mult
                if res in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg.num_heads, G))
                    if cfg.context_dim:
                        layers.append(CrossAttentionBlock(ch, cfg.context_dim, cfg.num_heads, G))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    res *= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(
            nn.GroupNorm(G, ch), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg.resolved_out_channels, 3, padding=1))
        )

    @property
    def null_label(self) -> int:
        """The label meaning "unconditional"; `y=None` uses it too."""
        if not self.cfg.num_classes:
            raise AttributeError("an unconditional UNet (num_classes=0) has no null label")
        return self.cfg.num_classes

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        residuals: list[Tensor] | None = None,
    ) -> Tensor:
        """x (B, C, H, W); t (B,) float or integer time input; y (B,) long in [0, num_classes], or None;
        context (B, L, context_dim) tokens for the cross-attention, context_mask (B, L) True at padding;
        residuals: a ControlNet's (models/generative/controlnet.py), one per skip then one for the middle output."""
        t = _check_input(self.cfg, x, t)
        emb = self.encoder.embed_time(t)  # (B, E)
        if self.label_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(y)  # (B, E)
        elif y is not None:
            raise ValueError("y given to an unconditional UNet (num_classes=0)")
        if context is not None and not self.cfg.context_dim:
            raise ValueError("context given to a UNet without cross-attention (context_dim=0)")
        h, skips = self.encoder(x, emb, context, context_mask)  # (B, C_top, H_low, W_low)
        if residuals is not None:
            if len(residuals) != len(skips) + 1:
                raise ValueError(f"expected {len(skips) + 1} residuals (skips, then middle), got {len(residuals)}")
            skips = [s + r for s, r in zip(skips, residuals)]
            h = h + residuals[-1]
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)  # (B, C_level, H_level, W_level)
        return self.out(h)  # (B, C_out, H, W)


# ----------------------------------------------------------------------------------------------------
# Noise-conditional classifier for classifier guidance (Dhariwal & Nichol 2021, Section 4.1)


class EncoderClassifier(nn.Module):
    """The UNet encoder half + GroupNorm-SiLU-global-average-pool-Linear head: logits p(y | x_t, t).

    Built from a UNetConfig whose num_classes is the number of logits (no label embedding); trained on noised
    images at random t with cross-entropy, with the same time input the diffusion model receives.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        if cfg.num_classes < 1:
            raise ValueError("num_classes must be >= 1 for an EncoderClassifier (it is the number of logits)")
        self.cfg = cfg
        self.encoder = _Encoder(cfg)
        ch = self.encoder.out_channels
        self.head = nn.Sequential(
            nn.GroupNorm(cfg.num_groups, ch),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(ch, cfg.num_classes),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = _check_input(self.cfg, x, t)
        h, _ = self.encoder(x, self.encoder.embed_time(t))  # (B, C_top, H_low, W_low)
        return self.head(h)  # (B, num_classes)
