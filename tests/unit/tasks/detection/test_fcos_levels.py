"""The FCOS level boundary derived from the training boxes (models/detection/fcos.py `balanced_level_boundary`,
tasks/detection/detectors.py `derived_detector_fields`): on boxes like the scenes' (up to ~60 px) every
level gets positives under the model's own assignment, where the old fixed boundary 64 left P5 empty."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.detection.fcos import FCOS, FCOSConfig, balanced_level_boundary, locations
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


def positives_per_level(boundary: float, scenes_) -> list[int]:
    """Positive locations per level (P4, P5), counted with FCOS.assign on every scene."""
    cfg = FCOSConfig(
        num_classes=10, backbone="mobilenet_v2_tiny", input_size=CANVAS, neck_channels=16, level_boundary=boundary
    )
    model = FCOS(cfg)
    points = [locations(CANVAS // s, CANVAS // s, s, torch.float32) for s in model.strides]
    counts = [0, 0]
    for scene in scenes_:
        labels, _ = model.assign(points, xyxy(scene), torch.as_tensor(scene.labels, dtype=torch.long))
        pos = labels < cfg.num_classes
        counts[0] += int(pos[: len(points[0])].sum())
        counts[1] += int(pos[len(points[0]) :].sum())
    return counts


def test_scene_boxes_stay_below_the_old_boundary(scenes):
    _, split = scenes
    sides = np.concatenate([s.boxes[:, 2:].max(axis=1) for s in split])
    assert sides.max() <= 64 and sides.max() > 32


def test_old_fixed_boundary_leaves_p5_empty(scenes):
    _, split = scenes
    p4, p5 = positives_per_level(64.0, split)
    assert p4 > 0 and p5 == 0


def test_derived_boundary_gives_every_level_positives(scenes):
    _, split = scenes
    boundary = balanced_level_boundary(np.concatenate([xyxy(s).numpy() for s in split]), CANVAS)
    assert 0 < boundary < 64
    p4, p5 = positives_per_level(boundary, split)
    assert p4 > 0 and p5 > 0
    # Comparable shares (centre sampling, which the derivation leaves out, trims only some P4 locations).
    assert min(p4, p5) / max(p4, p5) > 0.4, (p4, p5)


def candidate_counts(boxes: np.ndarray, size: int, boundary: float) -> tuple[int, int]:
    """P4 and P5 locations inside a box whose max(l, t, r, b) puts them on that level (no centre sampling)."""
    counts = []
    for stride, keep in ((16, lambda r: r <= boundary), (32, lambda r: r > boundary)):
        centres = (np.arange(size // stride) + 0.5) * stride
        xx, yy = (a.reshape(-1, 1) for a in np.meshgrid(centres, centres))
        ltrb = np.stack([xx - boxes[:, 0], yy - boxes[:, 1], boxes[:, 2] - xx, boxes[:, 3] - yy], axis=-1)
        counts.append(int(keep(ltrb.max(-1)[ltrb.min(-1) > 0]).sum()))
    return counts[0], counts[1]


@pytest.mark.parametrize("seed", range(3))
def test_boundary_is_the_most_even_split(seed):
    rng = np.random.default_rng(seed)
    xy = rng.integers(0, 120, size=(12, 2)).astype(float)  # integer boxes: reaches on a 0.5 px grid
    boxes = np.concatenate([xy, xy + rng.integers(12, 61, size=(12, 2))], axis=1)
    b = balanced_level_boundary(boxes, 192)
    n4, n5 = candidate_counts(boxes, 192, b)
    best = max(min(candidate_counts(boxes, 192, t)) for t in np.arange(0.0, 100.0, 0.25))
    assert n4 > 0 and n5 > 0 and min(n4, n5) == best


def test_boundary_with_no_even_split_keeps_positives():
    # A 40 px box: its one P5 location reaches 20, its four P4 ones 28. No boundary feeds both levels;
    # it must not feed neither (any boundary in [20, 28) would).
    b = balanced_level_boundary(np.array([[28.0, 28.0, 68.0, 68.0]]), 96)
    assert sum(candidate_counts(np.array([[28.0, 28.0, 68.0, 68.0]]), 96, b)) > 0


def test_no_boxes_is_an_error():
    with pytest.raises(ValueError, match="no boxes"):
        balanced_level_boundary(np.zeros((0, 4)), 64)


def test_derive_fills_the_boundary_for_one_stage_only(tmp_path, scenes):
    cfg, split = scenes
    directory = tmp_path / "data" / "prepared" / "scenes" / "train"
    directory.mkdir(parents=True)
    (directory / "annotations.json").write_text(json.dumps(scenes_to_coco(split, "train", cfg)))
    one_stage = derived_detector_fields("one_stage")(tmp_path)["one_stage"]
    thundernet = derived_detector_fields("thundernet")(tmp_path)["thundernet"]
    expected = balanced_level_boundary(np.concatenate([xyxy(s).numpy() for s in split]), CANVAS)
    assert one_stage == {"num_classes": 10, "input_size": CANVAS, "level_boundary": pytest.approx(expected)}
    assert "level_boundary" not in thundernet
    FCOSConfig(**one_stage)  # a valid config
