"""ControlNet (Zhang, Rao, Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models") on a
frozen, trained UNet (models/generative/unet.py), with an edge map as the spatial condition, and the edge operator
itself (Canny 1986: Sobel gradients, non-maximum suppression, double threshold with hysteresis) in pure torch.

    base UNet (frozen):   x_t -> encoder (input blocks, middle) -> decoder with skips -> eps
    ControlNet:           a trainable copy of the base's time/label embedding, input blocks and middle block;
                          h_0 = conv_in(x_t) + E_c(c)  with E_c a small conv encoder of the condition c   (Sec. 3.2)
                          residual_i = Z_i(h_i) for every skip h_i and the middle output, Z_i zero-initialised
                          1x1 convolutions ("zero convolutions", Sec. 3.1)
    ControlledUNet:       the base with residual_i added to its skips and middle output.

The zero convolutions make the controlled model equal to the base exactly at initialisation, so training
starts from the base's samples and no noise reaches the frozen network. The process (models/generative/ddpm.py)
drives a ControlledUNet like any network: `model(x_t, t, y=labels, cond=edges)`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.generative.unet import UNet, _check_input, zero_module

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class ControlNetConfig:
    hint_channels: list[int] = field(default_factory=lambda: [16, 16])  # condition encoder conv widths
    cond_channels: int = 1  # channels of the condition (an edge map: 1)
    conditioning_scale: float = 1.0  # multiplies every residual at sampling and training time
    edge_low: float = 0.1  # Canny double threshold on the Sobel magnitude (a full black-white step is 1)
    edge_high: float = 0.3

    def __post_init__(self) -> None:
        self.hint_channels = list(self.hint_channels)
        if not self.hint_channels or any(not isinstance(c, int) or c < 1 for c in self.hint_channels):
            raise ValueError(f"hint_channels must be a non-empty list of ints >= 1, got {self.hint_channels}")
        if self.cond_channels < 1:
            raise ValueError(f"cond_channels must be >= 1, got {self.cond_channels}")
        if self.conditioning_scale < 0:
            raise ValueError(f"conditioning_scale must be >= 0, got {self.conditioning_scale}")
        if not 0 < self.edge_low <= self.edge_high:
            raise ValueError(f"need 0 < edge_low <= edge_high, got {self.edge_low}, {self.edge_high}")


# ----------------------------------------------------------------------------------------------------
# Edge operator (Canny 1986)

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel(x: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients (gx along columns, gy along rows, down) of (B, 1, H, W) images, replicate-padded."""
    k = torch.stack([_SOBEL_X, _SOBEL_X.T]).unsqueeze(1).to(x)  # (2, 1, 3, 3)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)  # (B, 2, H, W)
    return g[:, :1], g[:, 1:]


def _shift(x: Tensor, dr: int, dc: int) -> Tensor:
    """out[..., r, c] = x[..., r + dr, c + dc], zero outside."""
    H, W = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1))
    return p[..., 1 + dr : 1 + dr + H, 1 + dc : 1 + dc + W]


def canny_edges(images: Tensor, low: float = 0.1, high: float = 0.3) -> Tensor:
    """Binary edge maps (B, 1, H, W) in {0, 1} of images (B, C, H, W) in [-1, 1] (channels averaged).

    1. Sobel gradient magnitude, scaled so a full -1 -> 1 step scores 1.
    2. Non-maximum suppression across the edge: the gradient direction quantised to 0/45/90/135 degrees; a
       pixel stays if it beats its forward neighbour and ties or beats its backward one (a two-pixel plateau
       of a step edge keeps one pixel).
    3. Double threshold: pixels >= high are edges, pixels >= low are edges when connected to one (hysteresis).
    """
    gray = (images.float().mean(dim=1, keepdim=True) + 1) / 2  # (B, 1, H, W) in [0, 1]
    gx, gy = sobel(gray)
    mag = torch.hypot(gx, gy) / 4  # (B, 1, H, W)
    angle = torch.atan2(gy, gx) % math.pi
    sector = torch.round(angle / (math.pi / 4)).long() % 4  # 0: along columns, 1: 45 deg, 2: along rows, 3: 135
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for s, (dr, dc) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        local = (mag > _shift(mag, dr, dc)) & (mag >= _shift(mag, -dr, -dc))
        keep |= (sector == s) & local
    thin = torch.where(keep, mag, torch.zeros_like(mag))
    weak = thin >= low
    strong = thin >= high
    while True:  # grow the strong edges along the weak ones until nothing changes
        grown = weak & (F.max_pool2d(strong.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, strong):
            break
        strong = grown
    return strong.float()


def edge_f1(pred: Tensor, target: Tensor, tolerance: int = 1) -> Tensor:
    """Per-image F1 (B,) of binary edge maps (B, 1, H, W): a pixel counts as matched when the other map has
    an edge within `tolerance` pixels (Chebyshev), as in the BSDS boundary benchmark's distance tolerance.
    Two empty maps agree (F1 = 1)."""
    k = 2 * tolerance + 1

    def dilate(m: Tensor) -> Tensor:
        return F.max_pool2d(m.float(), k, stride=1, padding=tolerance) if tolerance else m.float()

    p, t = pred.float().flatten(1), target.float().flatten(1)  # (B, HW)
    hit_p = (pred.float() * dilate(target)).flatten(1).sum(1)  # predicted edges near a target edge
    hit_t = (target.float() * dilate(pred)).flatten(1).sum(1)  # target edges near a predicted edge
    precision = torch.where(p.sum(1) > 0, hit_p / p.sum(1).clamp_min(1), (t.sum(1) == 0).float())
    recall = torch.where(t.sum(1) > 0, hit_t / t.sum(1).clamp_min(1), (p.sum(1) == 0).float())
    return torch.where(
        precision + recall > 0,
        2 * precision * recall / (precision + recall).clamp_min(1e-12),
        torch.zeros_like(precision),
    )


# ----------------------------------------------------------------------------------------------------
# Modules


class ControlNet(nn.Module):
    """The trainable copy of `base`'s encoder half; returns one residual per skip, then one for the middle."""

    def __init__(self, base: UNet, cfg: ControlNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.base_cfg = base.cfg
        self.encoder = copy.deepcopy(base.encoder)  # time embedding, input blocks, middle block (Sec. 3.2)
        self.label_embed = copy.deepcopy(base.label_embed)
        for p in self.parameters():
            p.requires_grad_(True)
        layers: list[nn.Module] = []
        ch = cfg.cond_channels
        for width in cfg.hint_channels:
            layers += [nn.Conv2d(ch, width, 3, padding=1), nn.SiLU()]
            ch = width
        layers.append(zero_module(nn.Conv2d(ch, base.cfg.base_channels, 3, padding=1)))
        self.hint = nn.Sequential(*layers)
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(c, c, 1)) for c in self.encoder.skip_channels)
        self.middle_out = zero_module(nn.Conv2d(self.encoder.out_channels, self.encoder.out_channels, 1))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None, cond: Tensor) -> list[Tensor]:
        t = _check_input(self.base_cfg, x, t)
        if cond.shape != (x.shape[0], self.cfg.cond_channels, *x.shape[2:]):
            raise ValueError(
                f"expected cond of shape ({x.shape[0]}, {self.cfg.cond_channels}, "
                f"{x.shape[2]}, {x.shape[3]}), got {tuple(cond.shape)}"
            )
        emb = self.encoder.embed_time(t)  # (B, E)
        if self.label_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.base_cfg.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(y)
        residuals = []
        h = x
        for i, block in enumerate(self.encoder.input_blocks):
            h = block(h, emb)  # (B, C_i, H_i, W_i)
            if i == 0:
                h = h + self.hint(cond.to(h.dtype))  # the condition joins the copy's first features
            residuals.append(self.zero_convs[i](h))
        h = self.encoder.middle_block(h, emb)  # (B, C_top, H_low, W_low)
        residuals.append(self.middle_out(h))
        return residuals


class ControlledUNet(nn.Module):
    """A frozen `base` UNet steered by a trainable `controlnet`; `cond=None` runs the base alone."""

    def __init__(self, base: UNet, controlnet: ControlNet) -> None:
        super().__init__()
        self.base = base
        self.controlnet = controlnet
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.base.eval()

    @property
    def null_label(self) -> int:
        return self.base.null_label

    def train(self, mode: bool = True) -> ControlledUNet:
        super().train(mode)
        self.base.eval()  # frozen: its dropout stays off too
        return self

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            return self.base(x, t, y)
        scale = self.controlnet.cfg.conditioning_scale
        residuals = [r * scale for r in self.controlnet(x, t, y, cond)]
        return self.base(x, t, y, residuals=residuals)  # (B, C, H, W)
