"""The dataset's own FID network: a small CNN classifier whose penultimate layer is the feature space.

FID is a distance between Gaussians fitted to features of a network trained to recognise the data
(Heusel et al. 2017 use ImageNet's InceptionV3). For 16 px digits an ImageNet network sees upsampled
blobs, so, as is usual for MNIST-like data, a classifier trained on the dataset itself defines the space:

    x -> [conv3x3-GN-ReLU x2, maxpool] per width in `channels` -> global average pool
      -> Linear -> features (B, feature_dim)            the FID features (pre-activation, closer to Gaussian)
      -> ReLU -> dropout -> Linear -> logits (B, K)      trained with cross-entropy; scores samples' classes

`feature_dim` must stay well below the number of images an FID compares (the covariance has rank n - 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class FIDNetConfig:
    in_channels: int = 1  # from the data
    image_size: int = 16  # from the data
    num_classes: int = 10  # from the data
    channels: list[int] = field(default_factory=lambda: [32, 64])  # one conv stage (and a 2x pool) each
    feature_dim: int = 32
    dropout: float = 0.2
    num_groups: int = 8

    def __post_init__(self) -> None:
        self.channels = list(self.channels)
        if not self.channels or any(c < 1 or c % self.num_groups for c in self.channels):
            raise ValueError(
                f"channels must be positive multiples of num_groups ({self.num_groups}), got {self.channels}"
            )
        if self.image_size % 2 ** len(self.channels):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**len(channels) = {2 ** len(self.channels)}"
            )
        for name in ("in_channels", "num_classes", "feature_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class FIDNet(nn.Module):
    def __init__(self, cfg: FIDNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for c in cfg.channels:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(cfg.num_groups, c), nn.ReLU()]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature = nn.Linear(c_in, cfg.feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.feature_dim, cfg.num_classes))

    def features(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) in [-1, 1] -> FID features (B, feature_dim)."""
        return self.feature(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, num_classes) logits


class FeatureExtractor(nn.Module):
    """`FIDNet.features` as a module (what `extract_features` and torchmetrics' FID take)."""

    def __init__(self, net: FIDNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.cfg.feature_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x)
