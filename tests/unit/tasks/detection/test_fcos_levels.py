"""FCOS's level assignment (models/detection/fcos.py `assign_targets`) with the paper's ranges on scenes
like the default profile's: a location trains P4 when its max(l, t, r, b) is at most `level_boundary`
(8 strides of P4, section 3.2), P5 beyond; the smallest box wins; centre sampling keeps the locations
within radius * stride of a box's centre. The levels built follow the training boxes (`max_box_size`, derived
from the annotations), so every level the detector has gets positives."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from models.detection.fcos import FCOS, FCOSConfig, locations
from tasks.detection.detectors import derived_detector_fields
from tasks.detection.scenes import ScenesConfig, build_split, digit_pools, load_digit_images, scenes_to_coco

CANVAS = 192


@pytest.fixture(scope="module")
def scenes():
    """A small set drawn like the default profile's scenes: 192 px canvas, digits of 24-60 px."""
    cfg = ScenesConfig(canvas=CANVAS, train_images=24, min_scale=24, max_scale=60, clutter=0, noise=0.0)
    digits, labels = load_digit_images()
    split = build_split(cfg, "train", digits, labels, digit_pools(labels, cfg)["train"])
    return cfg, split


def xyxy(scene) -> torch.Tensor:
    b = torch.as_tensor(scene.boxes, dtype=torch.float32).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


def assigned(
    boundary: float, scenes_, radius: float = 1.5, max_box_size: float = math.inf
) -> tuple[list[int], list[tuple[Tensor, Tensor]]]:
    """Positive locations per level built (P4, then P5 if built), and per scene the labels and matched boxes of
    FCOS.assign."""
    cfg = FCOSConfig(
        num_classes=10,
        backbone="mobilenet_v2_tiny",
        input_size=CANVAS,
        neck_channels=16,
        level_boundary=boundary,
        center_sampling_radius=radius,
        max_box_size=max_box_size,
    )
    model = FCOS(cfg)
    points = [locations(CANVAS // s, CANVAS // s, s, torch.float32) for s in model.strides]
    counts, out = [0] * len(points), []
    for scene in scenes_:
        labels, boxes = model.assign(points, xyxy(scene), torch.as_tensor(scene.labels, dtype=torch.long))
        pos = (labels < cfg.num_classes).split([len(p) for p in points])
        counts = [c + int(p.sum()) for c, p in zip(counts, pos)]
        out.append((labels, boxes))
    return counts, out


def brute_force(scene, boundary: float, radius: float, levels: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The same targets, location by location in plain Python: the reference twin of `assign_targets`. With
    one level, P4 takes every size."""
    boxes = xyxy(scene).numpy()
    labels_out, boxes_out = [], []
    ranges = ((16, 0.0, boundary), (32, boundary, np.inf)) if levels == 2 else ((16, 0.0, np.inf),)
    for stride, lo, hi in ranges:
        for y in (np.arange(CANVAS // stride) + 0.5) * stride:
            for x in (np.arange(CANVAS // stride) + 0.5) * stride:
                best, best_area = None, np.inf
                for g, (x0, y0, x1, y1) in enumerate(boxes):
                    ltrb = (x - x0, y - y0, x1 - x, y1 - y)
                    near = abs(x - (x0 + x1) / 2) < radius * stride and abs(y - (y0 + y1) / 2) < radius * stride
                    area = (x1 - x0) * (y1 - y0)
                    if min(ltrb) > 0 and near and lo < max(ltrb) <= hi and area < best_area:
                        best, best_area = g, area
                labels_out.append(10 if best is None else int(scene.labels[best]))
                boxes_out.append(boxes[best] if best is not None else None)
    return np.array(labels_out), boxes_out


def test_scene_boxes_stay_below_the_paper_boundary(scenes):
    _, split = scenes
    sides = np.concatenate([s.boxes[:, 2:].max(axis=1) for s in split])
    assert sides.max() <= 64 and sides.max() > 32


def test_paper_boundary_puts_every_positive_on_p4(scenes):
    _, split = scenes
    (p4, p5), _ = assigned(FCOSConfig.level_boundary, split)
    assert FCOSConfig.level_boundary == 8 * 16
    assert p4 > 0 and p5 == 0


def test_a_low_boundary_moves_the_far_locations_to_p5(scenes):
    _, split = scenes
    (p4, p5), _ = assigned(24.0, split)
    assert p4 > 0 and p5 > 0


@pytest.mark.parametrize(
    "boundary,radius,max_box",
    [(128.0, 1.5, math.inf), (24.0, 1.5, math.inf), (24.0, 100.0, math.inf), (24.0, 1.5, 20.0)],
)
def test_assignment_equals_the_location_by_location_twin(scenes, boundary, radius, max_box):
    _, split = scenes
    _, targets = assigned(boundary, split[:4], radius, max_box)
    for scene, (labels, boxes) in zip(split[:4], targets):
        ref_labels, ref_boxes = brute_force(scene, boundary, radius, levels=2 if max_box > boundary else 1)
        np.testing.assert_array_equal(labels.numpy(), ref_labels)
        for got, want in zip(boxes.numpy(), ref_boxes):
            if want is not None:
                np.testing.assert_array_equal(got, want)


def derived(tmp_path, cfg, split, name: str) -> dict:
    directory = tmp_path / "data" / "prepared" / "scenes" / "train"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "annotations.json").write_text(json.dumps(scenes_to_coco(split, "train", cfg)))
    return derived_detector_fields(name)(tmp_path)[name]


def test_derive_fills_classes_size_and_the_largest_box(tmp_path, scenes):
    cfg, split = scenes
    largest = max(float(s.boxes[:, 2:].max()) for s in split)
    assert derived(tmp_path, cfg, split, "thundernet") == {"num_classes": 10, "input_size": CANVAS}
    assert derived(tmp_path, cfg, split, "one_stage") == {
        "num_classes": 10,
        "input_size": CANVAS,
        "max_box_size": pytest.approx(largest),
    }


@pytest.mark.parametrize("boundary", [128.0, 40.0])
def test_every_level_built_from_the_data_gets_positives(tmp_path, scenes, boundary):
    """With the paper's boundary the 24-60 px digits build P4 alone; with one inside their sizes, P4 and P5.
    Either way no level is left without a positive (a dead P5 was what the default profile had)."""
    cfg, split = scenes
    max_box = derived(tmp_path, cfg, split, "one_stage")["max_box_size"]
    counts, _ = assigned(boundary, split, max_box_size=max_box)
    assert len(counts) == (1 if boundary == 128.0 else 2)
    assert all(c > 0 for c in counts), counts
