"""A KL-regularised convolutional autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"),
in the form latent diffusion uses as its first stage (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", Section 3.1 and Appendix G), in small.

    q(z | x) = N(mu(x), diag exp(logvar(x)))     encoder: conv-ResBlock-downsample stack -> 2 * latent_channels
    z = mu + exp(logvar / 2) * eps                reparameterisation (Kingma & Welling Section 2.4)
    x^ = decoder(z)                               mirror image: ResBlock-upsample stack -> in_channels
    loss = rec(x, x^) + kl_weight * KL(q(z | x) || N(0, I))                                   (K&W eq. 10)
    KL = 1/2 sum(mu^2 + exp(logvar) - 1 - logvar)                                           (K&W Appendix B)

Both terms are summed over an image's elements and averaged over the batch, as in LDM's KL autoencoder
loss; a small kl_weight (LDM: 1e-6) keeps the latent close to an autoencoder's, only mildly regularised
towards N(0, I), so a diffusion model can work in it. LDM's perceptual and adversarial terms are left out.
The latent has spatial size H / 2^(len(channel_mult) - 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class VAEConfig:
    in_channels: int = 1
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])  # one level per entry; stride 2 between
    num_res_blocks: int = 1
    latent_channels: int = 4
    kl_weight: float = 1e-6
    reconstruction: Literal["mse", "l1"] = "mse"  # squared error (Gaussian decoder) or LDM's L1
    num_groups: int = 8
    logvar_min: float = -30.0  # clamp of the encoder's log-variance, as LDM's DiagonalGaussianDistribution
    logvar_max: float = 20.0

    def __post_init__(self) -> None:
        self.channel_mult = list(self.channel_mult)
        for name in ("in_channels", "base_channels", "num_res_blocks", "latent_channels", "num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of ints >= 1, got {self.channel_mult}")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.num_groups:
                raise ValueError(
                    f"num_groups ({self.num_groups}) must divide every level's channels, not {self.base_channels * m}"
                )
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.reconstruction not in ("mse", "l1"):
            raise ValueError(f"reconstruction must be 'mse' or 'l1', got {self.reconstruction!r}")
        if not self.logvar_min < self.logvar_max:
            raise ValueError(f"logvar_min must be < logvar_max, got {self.logvar_min}, {self.logvar_max}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


# ----------------------------------------------------------------------------------------------------
# Modules


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        C, G = cfg.base_channels, cfg.num_groups
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, C, 3, padding=1)]
        ch = C
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, C * mult, G))
                ch = C * mult
            if level != len(cfg.channel_mult) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # downsample
        layers += [ResBlock(ch, ch, G), nn.GroupNorm(G, ch), nn.SiLU()]
        layers.append(nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1))  # mean and log-variance
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 2 * latent_channels, H / f, W / f)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        C, G = cfg.base_channels, cfg.num_groups
        ch = C * cfg.channel_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, ch, 3, padding=1), ResBlock(ch, ch, G)]
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, C * mult, G))
                ch = C * mult
            if level:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        layers += [nn.GroupNorm(G, ch), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)  # (B, in_channels, H, W)


# ----------------------------------------------------------------------------------------------------
# Loss pieces


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch dim (K&W Appendix B)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)  # (B,)


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image peak signal-to-noise ratio in dB; data_range 2 for images in [-1, 1]."""
    mse = (x - y).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


# ----------------------------------------------------------------------------------------------------
# The autoencoder


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.cfg.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"expected (B, {self.cfg.in_channels}, H, W) with H, W divisible by {f}, got {tuple(x.shape)}"
            )
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # (B, latent, H / f, W / f) each
        return mean, logvar.clamp(self.cfg.logvar_min, self.cfg.logvar_max)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """The posterior mean (default; what LDM caches as latents when deterministic) or a sample."""
        mean, logvar = self.encode_moments(x)
        if not sample:
            return mean
        return self.reparameterize(mean, logvar, generator)

    @staticmethod
    def reparameterize(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + (0.5 * logvar).exp() * eps  # (B, latent, h, w)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)  # (B, in_channels, H, W)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        mean, logvar = self.encode_moments(x)
        z = self.reparameterize(mean, logvar, generator)
        return self.decode(z), mean, logvar  # x^ (B, C, H, W), mean, logvar (B, latent, h, w)

    def training_losses(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Negative ELBO with a weighted KL. Returns scalars: loss, reconstruction, kl (unweighted)."""
        x_rec, mean, logvar = self(x, generator)
        err = x_rec - x
        per_elem = err.pow(2) if self.cfg.reconstruction == "mse" else err.abs()
        rec = per_elem.flatten(1).sum(dim=1).mean()  # summed over the image, mean over the batch
        kl = gaussian_kl(mean, logvar).mean()
        return {"loss": rec + self.cfg.kl_weight * kl, "reconstruction": rec.detach(), "kl": kl.detach()}
