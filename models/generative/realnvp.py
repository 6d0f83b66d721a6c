"""Real NVP (Dinh, Sohl-Dickstein, Bengio 2017, "Density estimation using Real NVP"), with Glow's actnorm
(Kingma & Dhariwal 2018) in place of batch normalisation.

Change of variables, for a bijection f: x -> z with a standard normal prior:
    log p_X(x) = log p_Z(f(x)) + log |det df/dx|                                             (Dinh eq. 3)
Affine coupling with a binary mask b (checkerboard on pixels, or a split of the channels):
    y = b * x + (1 - b) * (x * exp(s(b * x)) + t(b * x));   log|det| = sum((1 - b) * s(b * x))   (Dinh eq. 9)
Multi-scale architecture (Dinh Section 3.6): at each scale 3 checkerboard couplings, a squeeze
(C, H, W) -> (4C, H/2, W/2), 3 channel couplings, then half of the channels are factored out as latent
(they go straight to z); the last scale has 4 checkerboard couplings.

Data and bits per dimension (Dinh Section 4.1; Papamakarios et al. 2017 Appendix E.2). Pixels k in
{0..255} are dequantised, y = (k + u) / 256 with u ~ U[0, 1), so the flow models a density on [0, 1)^D;
the discrete probability P(k) >= 256^-D p(y) integrates over the cube. The flow sees a preprocessed
x = g(y) (logit: x = logit(a + (1 - 2a) y); affine: x = 2y - 1), which the Jacobian accounts for:
    -log p(y) = -log p_X(g(y)) - log|det dg/dy|
    bpd = (-log p_X(x) - log|det dg/dy| + D log 256) / (D ln 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_256 = math.log(256.0)


@dataclass(frozen=True)
class RealNVPConfig:
    """`params/nflow.yaml: realnvp`."""

    in_channels: int = 1  # from the data
    image_size: int = 16  # from the data; divisible by 2^num_scales
    num_scales: int = 2  # scales with a squeeze and a factor-out; then one final scale
    hidden_channels: int = 32  # width of the s/t ResNets
    num_blocks: int = 2  # residual blocks per s/t ResNet
    logit_alpha: float = 0.05  # x = logit(a + (1 - 2a) y), Dinh Section 4.1
    sample_temperature: float = 1.0  # std of the prior when sampling; 1 is the model's own distribution

    def __post_init__(self) -> None:
        for name in ("in_channels", "image_size", "num_scales", "hidden_channels", "num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % 2**self.num_scales:
            raise ValueError(f"image_size {self.image_size} must be divisible by 2^num_scales = {2**self.num_scales}")
        if not 0 < self.logit_alpha < 0.5:
            raise ValueError(f"logit_alpha must be in (0, 0.5), got {self.logit_alpha}")
        if not self.sample_temperature > 0:
            raise ValueError(f"sample_temperature must be > 0, got {self.sample_temperature}")


# ----------------------------------------------------------------------------------- data and accounting


def dequantize(pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """uint8-valued pixels k -> y = (k + u) / 256, u ~ U[0, 1): a density on [0, 1)^D."""
    u = torch.rand(pixels.shape, generator=generator, device=pixels.device)
    return (pixels.float() + u) / 256.0


def quantize(y: Tensor) -> Tensor:
    """y in [0, 1) -> the pixel k whose cube holds it (the inverse of `dequantize`), as float 0..255."""
    return (y * 256.0).floor().clamp(0, 255)


def logit_preprocess(y: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """y -> x = logit(a + (1 - 2a) y) and log|det dx/dy| per image (B,)."""
    p = alpha + (1 - 2 * alpha) * y
    x = torch.log(p) - torch.log1p(-p)
    logdet = (math.log(1 - 2 * alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
    return x, logdet


def logit_postprocess(x: Tensor, alpha: float) -> Tensor:
    """The inverse of `logit_preprocess`: x -> y in [0, 1]."""
    return ((torch.sigmoid(x) - alpha) / (1 - 2 * alpha)).clamp(0, 1)


def affine_preprocess(y: Tensor) -> tuple[Tensor, Tensor]:
    """y -> x = 2y - 1 in [-1, 1) and log|det dx/dy| = D log 2 per image (B,)."""
    d = y[0].numel()
    return 2 * y - 1, torch.full((y.shape[0],), d * math.log(2.0), device=y.device)


def bits_per_dim(log_px: Tensor, logdet_pre: Tensor, dims: int) -> Tensor:
    """Bits per pixel value of the discrete data: (-log p_X(x) - log|det dg/dy| + D log 256) / (D ln 2)."""
    return (-log_px - logdet_pre + dims * LOG_256) / (dims * math.log(2.0))


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """sum over dims of log N(z; 0, 1), per row (B,)."""
    return -0.5 * (z.flatten(1) ** 2).sum(1) - 0.5 * z[0].numel() * math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------- modules


def squeeze(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch becomes 4 channels (Dinh Figure 3)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
    return x.reshape(B, 4 * C, H // 2, W // 2)


def unsqueeze(x: Tensor) -> Tensor:
    """The inverse of `squeeze`: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    B, C4, H, W = x.shape
    x = x.reshape(B, C4 // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3)  # (B, C, H, 2, W, 2)
    return x.reshape(B, C4 // 4, 2 * H, 2 * W)


def checkerboard(size: int, parity: int, device=None) -> Tensor:
    """(1, 1, size, size) mask b: 1 where (i + j) % 2 == parity (those pixels condition, the rest change)."""
    i = torch.arange(size, device=device)
    return ((i[:, None] + i[None, :]) % 2 == parity).float()[None, None]


class ActNorm(nn.Module):
    """y = (x + bias) * exp(log_scale) per channel (Glow Section 3.1), initialised from the first training
    batch to zero mean and unit variance per channel. log|det| = H W sum(log_scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _init(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self.initialized:
            self._init(x)
        y = (x + self.bias) * torch.exp(self.log_scale)  # (B, C, H, W)
        logdet = self.log_scale.sum() * x.shape[2] * x.shape[3]
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class STNet(nn.Module):
    """The s and t functions of a coupling: a small ResNet (Dinh Section 4.1) from the conditioning part to
    a log-scale and a shift for the changing part. The last convolution starts at zero: each coupling starts
    as the identity."""

    def __init__(self, c_in: int, c_out: int, hidden: int, num_blocks: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(c_in, hidden, 3, padding=1)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden) for _ in range(num_blocks)])
        self.out = nn.Conv2d(hidden, 2 * c_out, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.scale = nn.Parameter(torch.ones(1, c_out, 1, 1))  # s = scale * tanh(raw): bounded log-scales

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.out(F.relu(self.blocks(self.inp(x))))  # (B, 2 c_out, H, W)
        s, t = h.chunk(2, dim=1)
        return self.scale * torch.tanh(s), t  # (B, c_out, H, W) each


class CheckerboardCoupling(nn.Module):
    """Affine coupling with a spatial checkerboard mask (Dinh eq. 9); actnorm in front."""

    def __init__(self, channels: int, size: int, parity: int, hidden: int, num_blocks: int) -> None:
        super().__init__()
        self.norm = ActNorm(channels)
        self.register_buffer("mask", checkerboard(size, parity), persistent=False)
        self.st = STNet(channels + 1, channels, hidden, num_blocks)  # + the mask as an input channel

    def _st(self, x_cond: Tensor) -> tuple[Tensor, Tensor]:
        b = self.mask
        s, t = self.st(torch.cat([x_cond, b.expand(x_cond.shape[0], 1, -1, -1)], dim=1))
        return s * (1 - b), t * (1 - b)  # only the unmasked pixels change

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x, logdet = self.norm(x)
        s, t = self._st(x * self.mask)
        y = x * torch.exp(s) + t  # masked pixels: s = t = 0, unchanged
        return y, logdet + s.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        s, t = self._st(y * self.mask)  # the masked pixels are the same in x and y
        return self.norm.inverse((y - t) * torch.exp(-s))


class ChannelCoupling(nn.Module):
    """Affine coupling with a channel mask: the first half of the channels conditions the second (or the
    reverse with `flip`); actnorm in front."""

    def __init__(self, channels: int, flip: bool, hidden: int, num_blocks: int) -> None:
        super().__init__()
        self.norm = ActNorm(channels)
        self.flip = flip
        self.st = STNet(channels // 2, channels - channels // 2, hidden, num_blocks)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x.chunk(2, dim=1)
        return (b, a) if self.flip else (a, b)

    def _join(self, cond: Tensor, change: Tensor) -> Tensor:
        return torch.cat([change, cond] if self.flip else [cond, change], dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x, logdet = self.norm(x)
        cond, change = self._split(x)
        s, t = self.st(cond)
        return self._join(cond, change * torch.exp(s) + t), logdet + s.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        cond, change = self._split(y)
        s, t = self.st(cond)
        return self.norm.inverse(self._join(cond, (change - t) * torch.exp(-s)))


class Scale(nn.Module):
    """One scale of the multi-scale architecture: checkerboard couplings, then (unless last) squeeze,
    channel couplings and a factor-out of half the channels."""

    def __init__(self, channels: int, size: int, last: bool, cfg: RealNVPConfig) -> None:
        super().__init__()
        self.last = last
        h, n = cfg.hidden_channels, cfg.num_blocks
        checker = [CheckerboardCoupling(channels, size, i % 2, h, n) for i in range(4 if last else 3)]
        channel = [] if last else [ChannelCoupling(4 * channels, i % 2 == 1, h, n) for i in range(3)]  # at 4C
        self.checker, self.channel = nn.ModuleList(checker), nn.ModuleList(channel)


class RealNVP(nn.Module):
    """f: x (B, C, H, W) in the preprocessed space -> z (B, D), the concatenation of the factored-out parts
    (scale by scale) and the last scale's output."""

    def __init__(self, cfg: RealNVPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scales = nn.ModuleList()
        c, size = cfg.in_channels, cfg.image_size
        self.z_shapes: list[tuple[int, int, int]] = []
        for i in range(cfg.num_scales + 1):
            last = i == cfg.num_scales
            self.scales.append(Scale(c, size, last, cfg))
            if not last:
                c, size = 2 * c, size // 2  # squeeze to 4c, factor out 2c
                self.z_shapes.append((c, size, size))
        self.z_shapes.append((c, size, size))

    @property
    def dims(self) -> int:
        return self.cfg.in_channels * self.cfg.image_size**2

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W) -> z (B, D), log|det dz/dx| (B,)."""
        logdet = x.new_zeros(x.shape[0])
        zs = []
        h = x
        for scale in self.scales:
            for layer in scale.checker:
                h, ld = layer(h)
                logdet = logdet + ld
            if scale.last:
                break
            h = squeeze(h)  # (B, 4C, H/2, W/2)
            for layer in scale.channel:
                h, ld = layer(h)
                logdet = logdet + ld
            z, h = h.chunk(2, dim=1)  # factor out half: (B, 2C, H/2, W/2) each
            zs.append(z.flatten(1))
        zs.append(h.flatten(1))
        return torch.cat(zs, dim=1), logdet  # (B, D), (B,)

    def inverse(self, z: Tensor) -> Tensor:
        """z (B, D) -> x (B, C, H, W)."""
        sizes = [c * h * w for c, h, w in self.z_shapes]
        parts = [p.reshape(-1, *shape) for p, shape in zip(z.split(sizes, dim=1), self.z_shapes)]
        h = parts.pop()
        for scale in reversed(self.scales):
            if not scale.last:
                h = torch.cat([parts.pop(), h], dim=1)  # (B, 4C, H/2, W/2)
                for layer in reversed(scale.channel):
                    h = layer.inverse(h)
                h = unsqueeze(h)  # (B, C, H, W)
            for layer in reversed(scale.checker):
                h = layer.inverse(h)
        return h

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_X(x) per image (B,), Dinh eq. 3."""
        z, logdet = self(x)
        return standard_normal_log_prob(z) + logdet

    # --------------------------------------------------------------------------- on dequantised data

    def preprocess(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return logit_preprocess(y, self.cfg.logit_alpha)

    def bits_per_dim(self, y: Tensor) -> Tensor:
        """bpd (B,) of dequantised images y in [0, 1)^D: the training loss (its mean) and the test metric."""
        x, logdet_pre = self.preprocess(y)
        return bits_per_dim(self.log_prob(x), logdet_pre, self.dims)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float | None = None) -> Tensor:
        """n images y in [0, 1] (B, C, H, W): z ~ N(0, T^2 I), x = f^-1(z), y = g^-1(x)."""
        device = next(self.parameters()).device
        T = self.cfg.sample_temperature if temperature is None else temperature
        z = torch.randn((n, self.dims), generator=generator).to(device) * T  # (B, D)
        return logit_postprocess(self.inverse(z), self.cfg.logit_alpha)


def realnvp_loss(model: RealNVP, y: Tensor) -> Tensor:
    """Maximum likelihood: the mean bits per dimension of a batch of dequantised images."""
    return model.bits_per_dim(y).mean()
