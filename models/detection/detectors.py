"""The detectors of Kiln behind one interface: a registry, a builder, and the grayscale input wrapper
that exported models carry, so an ONNX file takes raw pixels and returns final detections."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from models.detection.boxes import Detections
from models.detection.fcos import FCOS, FCOSConfig
from models.detection.thundernet import ThunderNet, ThunderNetConfig

DETECTORS: dict[str, tuple[type, type[nn.Module]]] = {
    "thundernet": (ThunderNetConfig, ThunderNet),
    "one_stage": (FCOSConfig, FCOS),
}

# Gray pixels in [0, 1] -> the zero-mean, unit-scale range the backbones were initialised for.
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25


def build_detector(name: str, config: Any) -> nn.Module:
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {sorted(DETECTORS)}")
    config_cls, model_cls = DETECTORS[name]
    if isinstance(config, Mapping):
        config = config_cls(**config)
    return model_cls(config)


def to_model_input(gray: Tensor) -> Tensor:
    """(B, 1, H, W) or (B, H, W) pixels in [0, 1] -> (B, 3, H, W) normalised, what the backbones take."""
    if gray.dim() == 3:
        gray = gray[:, None]
    return ((gray - PIXEL_MEAN) / PIXEL_STD).expand(-1, 3, -1, -1)


class GrayscaleDetector(nn.Module):
    """A detector that takes (B, 1, H, W) gray pixels in [0, 1]: what the ONNX export wraps."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, gray: Tensor) -> Detections:
        return self.detector(to_model_input(gray))
