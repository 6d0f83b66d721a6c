"""The `map` stage on a test split and predictions the test writes: the point estimates are the COCO figures
of the whole split, the intervals come from paired resamples of its images, and the difference between two
detectors is significant only when its interval excludes 0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from models.bootstrap import BootstrapConfig
from models.detection.coco_eval import STAT_NAMES, evaluate_coco
from tasks.detection.detectors import write_predictions
from tasks.detection.map import MapInputs, map_task
from tasks.detection.scenes import labels_digest
from tasks.layout import DETECTOR_DIR, METRICS_DIR, PLOTS_DIR, SCENES_DIR
from tasks.spec import StageContext

SIZE = 32
CATEGORIES = [{"id": c + 1, "name": str(c)} for c in range(3)]


class NoRun:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def write_split(root: Path, images: int = 24, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    split = root / SCENES_DIR / "test"
    (split / "images").mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": CATEGORIES}
    for i in range(1, images + 1):
        name = f"images/{i:06d}.png"
        Image.fromarray(np.zeros((SIZE, SIZE), dtype=np.uint8)).save(split / name)
        coco["images"].append({"id": i, "file_name": name, "width": SIZE, "height": SIZE})
        for _ in range(rng.integers(1, 3)):
            x, y = (float(v) for v in rng.integers(0, SIZE - 12, 2))
            w, h = (float(v) for v in rng.integers(6, 12, 2))
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": i,
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    (split / "annotations.json").write_text(json.dumps(coco))
    return coco


def perfect(coco: dict) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in coco["annotations"]
    ]


def with_false_alarms(coco: dict) -> list[dict]:
    """The perfect detections plus, on every image, a confident detection where nothing is."""
    alarms = [
        {"image_id": im["id"], "category_id": 1, "bbox": [20.0, 20.0, 10.0, 10.0], "score": 0.95}
        for im in coco["images"]
    ]
    return perfect(coco) + alarms


def project(root: Path, thundernet: list[dict] | None, one_stage: list[dict] | None) -> dict:
    coco = json.loads((root / SCENES_DIR / "test" / "annotations.json").read_text())
    meta = {"labels_digest": labels_digest(coco), "input_size": str(SIZE)}
    for name, records in (("thundernet", thundernet), ("one_stage", one_stage)):
        write_predictions(root / DETECTOR_DIR / name / "predictions_test.json", records, meta)
    return coco


def run_map(root: Path, resamples: int = 100) -> tuple[dict, pd.DataFrame]:
    map_task.fn(StageContext(root, "", 3, "cpu", NoRun()), MapInputs(BootstrapConfig(resamples=resamples)))
    summaries = json.loads((root / METRICS_DIR / "map.json").read_text())
    return summaries, pd.read_csv(root / PLOTS_DIR / "map_pairs.csv")


@pytest.fixture
def root(tmp_path) -> Path:
    write_split(tmp_path)
    return tmp_path


def test_a_detector_with_false_alarms_on_every_image_is_significantly_worse(root):
    coco = json.loads((root / SCENES_DIR / "test" / "annotations.json").read_text())
    project(root, perfect(coco), with_false_alarms(coco))
    summaries, pairs = run_map(root)
    assert set(summaries) == {"thundernet", "one_stage"}
    for name, records in (("thundernet", perfect(coco)), ("one_stage", with_false_alarms(coco))):
        point = evaluate_coco(coco, records).stats
        assert [summaries[name][s] for s in STAT_NAMES] == [float(v) for v in point]  # unchanged point estimates
        for stat in ("AP", "AP50"):
            assert summaries[name][f"{stat}_ci_low"] <= summaries[name][stat] <= summaries[name][f"{stat}_ci_high"]
    assert summaries["thundernet"]["AP_ci_low"] == summaries["thundernet"]["AP_ci_high"] == 1.0
    assert pairs["stat"].tolist() == ["AP", "AP50"] and (pairs["pair"] == "thundernet - one_stage").all()
    assert (pairs["ci_low"] > 0).all() and pairs["significant"].all()
    ap = pairs.set_index("stat").loc["AP"]
    assert ap["difference"] == pytest.approx(summaries["thundernet"]["AP"] - summaries["one_stage"]["AP"])


def test_identical_detectors_differ_by_exactly_zero_and_are_not_significant(root):
    coco = json.loads((root / SCENES_DIR / "test" / "annotations.json").read_text())
    noisy = [{**r, "bbox": [v + 2.0 for v in r["bbox"][:2]] + r["bbox"][2:]} for r in with_false_alarms(coco)]
    project(root, noisy, noisy)
    summaries, pairs = run_map(root)
    assert summaries["thundernet"] == summaries["one_stage"]
    assert (pairs[["difference", "ci_low", "ci_high"]] == 0.0).all().all()
    assert not pairs["significant"].any()
    assert summaries["one_stage"]["AP_ci_low"] < summaries["one_stage"]["AP_ci_high"]  # the images do vary
    assert run_map(root)[0] == summaries  # seeded: the same resamples again
