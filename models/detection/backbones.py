"""Light backbones for the detectors. Each maps images (B, 3, H, W) to (C4, C5), the feature maps at
strides 16 and 32 (H and W multiples of 32), and states `out_channels = {"C4": ..., "C5": ...}`.

- SNet (Qin et al. 2019, ThunderNet, section 3.1 and table 1): ShuffleNetV2 (Ma et al. 2018) with every
  3x3 depthwise convolution replaced by a 5x5 one for a larger receptive field. SNet49 keeps a 1x1 Conv5
  of 512 channels; SNet146 and SNet535 drop Conv5 and widen the stages.
- MobileNetV2 (Sandler et al. 2018, table 2): inverted residual bottlenecks (1x1 expand, 3x3 depthwise,
  linear 1x1 project), width multiplier. C5 is the 320-channel stage; the classifier's 1x1 to 1280 is
  left out, a detector has its own neck.
- A small Inception-style net (Szegedy et al. 2015, GoogLeNet, figure 2b): blocks of parallel 1x1, 1x1->3x3,
  1x1->5x5 and 3x3-max-pool->1x1 branches, concatenated; stride-2 max pools between stages.

`BACKBONES` is the registry by name; `build_backbone(name)` builds one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def conv_bn(
    c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU
) -> nn.Sequential:
    """k x k convolution ("same" padding), batch norm, then the activation if any."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------
# SNet


@dataclass(frozen=True)
class SNetSpec:
    conv1: int  # stem channels (3x3 conv, stride 2, then 3x3 max pool, stride 2)
    stages: tuple[int, int, int]  # Stage2, Stage3, Stage4 output channels (strides 8, 16, 32)
    repeats: tuple[int, int, int]  # units per stage, the first with stride 2
    conv5: int = 0  # 1x1 conv after Stage4; 0: none


# ThunderNet table 1. "snet_tiny" is not from the paper: a few-second model for smoke tests.
SNET_PRESETS: dict[str, SNetSpec] = {
    "snet49": SNetSpec(conv1=24, stages=(60, 120, 240), repeats=(4, 8, 4), conv5=512),
    "snet146": SNetSpec(conv1=24, stages=(132, 264, 528), repeats=(4, 8, 4)),
    "snet535": SNetSpec(conv1=48, stages=(248, 496, 992), repeats=(4, 8, 4)),
    "snet_tiny": SNetSpec(conv1=16, stages=(32, 64, 128), repeats=(1, 2, 1)),
}


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    B, C, H, W = x.shape
    return x.reshape(B, groups, C // groups, H, W).transpose(1, 2).reshape(B, C, H, W)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit (Ma et al. 2018, figure 3c/d) with a k x k depthwise convolution."""

    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int = 5):
        super().__init__()
        if c_out % 2 or (stride == 1 and c_in != c_out):
            raise ValueError(f"ShuffleUnit: bad channels {c_in} -> {c_out} at stride {stride}")
        self.stride = stride
        half = c_out // 2
        if stride == 2:  # both halves see the input; the left branch downsamples it
            self.left = nn.Sequential(conv_bn(c_in, c_in, kernel, 2, groups=c_in, act=None), conv_bn(c_in, half, 1))
        branch_in = c_in if stride == 2 else half
        self.right = nn.Sequential(
            conv_bn(branch_in, half, 1),
            conv_bn(half, half, kernel, stride, groups=half, act=None),
            conv_bn(half, half, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            keep, x = x.chunk(2, dim=1)  # channel split
            out = torch.cat([keep, self.right(x)], dim=1)
        else:
            out = torch.cat([self.left(x), self.right(x)], dim=1)
        return channel_shuffle(out)


class SNet(nn.Module):
    def __init__(self, spec: SNetSpec, kernel: int = 5):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, spec.conv1, 3, 2), nn.MaxPool2d(3, 2, 1))  # stride 4
        stages = []
        c_in = spec.conv1
        for c_out, n in zip(spec.stages, spec.repeats):
            units = [ShuffleUnit(c_in, c_out, 2, kernel)] + [ShuffleUnit(c_out, c_out, 1, kernel) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            c_in = c_out
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = conv_bn(c_in, spec.conv5, 1) if spec.conv5 else nn.Identity()
        self.out_channels = {"C4": spec.stages[1], "C5": spec.conv5 or spec.stages[2]}
        self.strides = {"C4": 16, "C5": 32}

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.stage2(self.stem(x))  # (B, c2, H/8, W/8)
        c4 = self.stage3(x)  # (B, c3, H/16, W/16)
        c5 = self.conv5(self.stage4(c4))  # (B, c5, H/32, W/32)
        return c4, c5


# ----------------------------------------------------------------------------------------------------
# MobileNetV2


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8, never below 90% of v (the reference implementation's rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = [] if expand == 1 else [conv_bn(c_in, hidden, 1, act=nn.ReLU6)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6), conv_bn(hidden, c_out, 1, act=None)]
        self.block = nn.Sequential(*layers)  # the projection is linear
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x) if self.residual else self.block(x)


# (t expansion, c channels, n repeats, s stride of the first), MobileNetV2 table 2
MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    def __init__(self, width_mult: float = 1.0):
        super().__init__()
        c_in = _make_divisible(32 * width_mult)
        blocks: list[nn.Module] = [conv_bn(3, c_in, 3, 2, act=nn.ReLU6)]
        stride, c4_at, c4_channels = 2, 0, 0
        for t, c, n, s in MOBILENET_V2_SETTINGS:
            c_out = _make_divisible(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
            stride *= s
            if stride == 16:  # the last block at stride 16 (the 96-channel stage) gives C4
                c4_at, c4_channels = len(blocks), c_out
        self.to_c4 = nn.Sequential(*blocks[:c4_at])
        self.to_c5 = nn.Sequential(*blocks[c4_at:])
        self.out_channels = {"C4": c4_channels, "C5": c_in}
        self.strides = {"C4": 16, "C5": 32}

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c4 = self.to_c4(x)  # (B, 96 w, H/16, W/16)
        c5 = self.to_c5(c4)  # (B, 320 w, H/32, W/32)
        return c4, c5


# ----------------------------------------------------------------------------------------------------
# Inception-style


class InceptionBlock(nn.Module):
    """Parallel 1x1 | 1x1->3x3 | 1x1->5x5 | maxpool->1x1, concatenated: c_out/4 + c_out/2 + c_out/8 + c_out/8."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        if c_out % 16:
            raise ValueError(f"InceptionBlock: c_out must be a multiple of 16, got {c_out}")
        q = c_out // 4
        self.b1 = conv_bn(c_in, q, 1)
        self.b3 = nn.Sequential(conv_bn(c_in, q, 1), conv_bn(q, c_out // 2, 3))  # 1x1 reduction first
        self.b5 = nn.Sequential(conv_bn(c_in, c_out // 16, 1), conv_bn(c_out // 16, c_out // 8, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(c_in, c_out // 8, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)


@dataclass(frozen=True)
class InceptionSpec:
    stem: int  # 3x3 stride-2 conv, 3x3 conv, then max pool: stride 4
    stages: tuple[int, int, int]  # block output channels at strides 8, 16, 32
    blocks: tuple[int, int, int]  # blocks per stage


INCEPTION_PRESETS: dict[str, InceptionSpec] = {
    "inception": InceptionSpec(stem=32, stages=(128, 256, 512), blocks=(1, 2, 2)),
    "inception_tiny": InceptionSpec(stem=16, stages=(32, 64, 128), blocks=(1, 1, 1)),
}


class InceptionNet(nn.Module):
    def __init__(self, spec: InceptionSpec):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, spec.stem, 3, 2), conv_bn(spec.stem, spec.stem, 3), nn.MaxPool2d(3, 2, 1))
        stages = []
        c_in = spec.stem
        for c_out, n in zip(spec.stages, spec.blocks):
            blocks = [nn.MaxPool2d(3, 2, 1)]
            for _ in range(n):
                blocks.append(InceptionBlock(c_in, c_out))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.stage3, self.stage4, self.stage5 = stages
        self.out_channels = {"C4": spec.stages[1], "C5": spec.stages[2]}
        self.strides = {"C4": 16, "C5": 32}

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.stage3(self.stem(x))  # (B, c3, H/8, W/8)
        c4 = self.stage4(x)  # (B, c4, H/16, W/16)
        c5 = self.stage5(c4)  # (B, c5, H/32, W/32)
        return c4, c5


# ----------------------------------------------------------------------------------------------------
# Registry

BACKBONES: dict[str, Callable[[], nn.Module]] = {
    **{name: (lambda spec=spec: SNet(spec)) for name, spec in SNET_PRESETS.items()},
    "mobilenet_v2": lambda: MobileNetV2(1.0),
    "mobilenet_v2_0.5": lambda: MobileNetV2(0.5),
    "mobilenet_v2_tiny": lambda: MobileNetV2(0.25),
    **{name: (lambda spec=spec: InceptionNet(spec)) for name, spec in INCEPTION_PRESETS.items()},
}


def build_backbone(name: str) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[name]()
