"""The `scene_audit` stage's task: built-in scenes (the digits each split drew, by `digit_index`) and a user
COCO dataset (whole images), each clean and with planted duplicates. It reports exactly the planted shares
and fails over the threshold with one line naming the annotations file, the share and a pair."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

import tasks.detection.scene_audit as scene_audit
from models.duplicates import AuditConfig
from tasks.detection.scene_audit import SceneAuditInputs, scene_audit_task
from tasks.detection.scenes import ScenesConfig, write_scenes
from tasks.errors import ContaminationError
from tasks.layout import METRICS_DIR, SCENES_DIR
from tasks.spec import StageContext

LENIENT = AuditConfig(near_hamming=2, max_exact_share=0.5, max_near_share=0.5)
SMALL = ScenesConfig(canvas=64, train_images=40, val_images=8, test_images=10, max_digits=4, min_scale=12, max_scale=28)


class RecordingRun:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.update(metrics)


def run_audit(root, cfg: AuditConfig) -> dict:
    run = RecordingRun()
    metrics = scene_audit_task.fn(StageContext(root, "", 0, "cpu", run), SceneAuditInputs(cfg))
    assert run.logged == metrics
    return metrics


def annotations(root, split) -> dict:
    return json.loads((root / SCENES_DIR / split / "annotations.json").read_text())


def save_annotations(root, split, coco) -> None:
    (root / SCENES_DIR / split / "annotations.json").write_text(json.dumps(coco))


@pytest.fixture(scope="module")
def built_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_scenes(SMALL, root / SCENES_DIR, root)
    return root


def drawn(root, split) -> list[int]:
    return sorted({a["digit_index"] for a in annotations(root, split)["annotations"]})


def test_built_in_scenes_draw_disjoint_digit_pools(built_in):
    metrics = run_audit(built_in, LENIENT)
    assert metrics["test_digits_audited"] == len(drawn(built_in, "test"))
    assert metrics["test_digits_shared_with_train"] == 0 and metrics["val_digits_shared_with_train"] == 0
    assert metrics["test_digits_exact_in_train"] == 0
    assert metrics["test_digits_near_in_train_share"] <= 0.05
    assert json.loads((built_in / METRICS_DIR / "scene_audit.json").read_text()) == pytest.approx(metrics)


def test_planted_digits_are_found_exactly(built_in, tmp_path, monkeypatch):
    """Test boxes relabelled to train digits (the same sklearn digit: exact), and test digits swapped for
    a train digit at another contrast (near) in the digit table the audit reads."""
    import shutil

    root = tmp_path / "project"
    shutil.copytree(built_in / SCENES_DIR, root / SCENES_DIR)
    train, test = drawn(root, "train"), drawn(root, "test")
    coco = annotations(root, "test")
    relabelled = {test[0]: train[0], test[1]: train[1]}  # every box of two test digits now shows a train digit
    for ann in coco["annotations"]:
        ann["digit_index"] = relabelled.get(ann["digit_index"], ann["digit_index"])
    save_annotations(root, "test", coco)

    from tasks.digits import load_digit_images

    ink, labels = load_digit_images()
    ink = ink.copy()
    ink[test[2]] = ink[train[5]] * 0.9  # a test digit that is a dimmer train digit
    monkeypatch.setattr(scene_audit, "load_digit_images", lambda: (ink, labels))

    metrics = run_audit(root, LENIENT)
    n = len(test)  # two test digits swapped for two train digits: as many distinct digits as before
    assert metrics["test_digits_audited"] == n == len(drawn(root, "test"))
    assert metrics["test_digits_shared_with_train"] == 2
    assert metrics["test_digits_exact_in_train"] == 2
    assert metrics["test_digits_exact_in_train_share"] == pytest.approx(2 / n)
    assert metrics["test_digits_near_in_train"] == 3
    assert metrics["test_digits_near_in_train_share"] == pytest.approx(3 / n)

    with pytest.raises(ContaminationError) as err:
        run_audit(root, replace(LENIENT, max_exact_share=0.01))
    message = str(err.value)
    first = train[0]  # the first audited test digit (in index order) with an identical train digit
    assert message.startswith(
        f"data/prepared/scenes/test/annotations.json: test_digits_exact_in_train_share = {2 / n:.4f} exceeds "
        f"scene_audit.max_exact_share = 0.01: 2 of {n} test digits have an identical train digit"
    )
    assert f"(e.g. load_digits()[{first}] in test/images/" in message and "identical pixels" in message
    assert "\n" not in message


def coco_split(root, split: str, images: np.ndarray) -> None:
    folder = root / SCENES_DIR / split
    (folder / "images").mkdir(parents=True)
    records = []
    for i, image in enumerate(images, start=1):
        Image.fromarray(image).save(folder / "images" / f"{i:06d}.png")
        records.append({"id": i, "file_name": f"images/{i:06d}.png", "width": 32, "height": 32})
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0], "area": 25.0, "iscrowd": 0}]
    coco = {"info": {"split": split}, "images": records, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    (folder / "annotations.json").write_text(json.dumps(coco))


def test_coco_scenes_are_audited_as_whole_images(tmp_path):
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, size=(40, 4, 4)).astype(np.float64)  # blocky images: hashes far apart
    images = np.round(smooth.repeat(8, axis=1).repeat(8, axis=2)).astype(np.uint8)  # (40, 32, 32)
    train, val, clean = images[:24], images[24:30], images[30:38]
    test = np.concatenate([clean, train[[3]], np.round(train[[9]] * 0.9 + 10).astype(np.uint8)])  # 10 images
    coco_split(tmp_path, "train", train)
    coco_split(tmp_path, "val", val)
    coco_split(tmp_path, "test", test)
    metrics = run_audit(tmp_path, LENIENT)
    assert metrics["test_images_audited"] == 10
    assert metrics["test_images_exact_in_train_share"] == pytest.approx(0.1)
    assert metrics["test_images_near_in_train_share"] == pytest.approx(0.2)
    assert metrics["val_images_near_in_train"] == 0
    assert "test_digits_audited" not in metrics
    with pytest.raises(ContaminationError) as err:
        run_audit(tmp_path, replace(LENIENT, max_near_share=0.1))
    assert str(err.value).startswith(
        "data/prepared/scenes/test/annotations.json: test_images_near_in_train_share = 0.2000 exceeds "
        "scene_audit.max_near_share = 0.1: 2 of 10 test images have a train image within 2 bits"
    )
    assert "(e.g. test/images/000009.png and train/images/000004.png, Hamming 0)" in str(err.value)
