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
from tasks.spec import ReplicatesConfig, StageContext

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


def project(root: Path, thundernet: list[dict] | None, one_stage: list[dict] | None, **replicates: list[dict]) -> dict:
    """Test predictions of both detectors; `replicates` adds those of `detector_replicate@<name>` (`thundernet-1`)."""
    coco = json.loads((root / SCENES_DIR / "test" / "annotations.json").read_text())
    meta = {"labels_digest": labels_digest(coco), "input_size": str(SIZE)}
    named = {
        "thundernet": thundernet,
        "one_stage": one_stage,
        **{"-".join(k.rsplit("_", 1)): v for k, v in replicates.items()},
    }
    for name, records in named.items():
        write_predictions(root / DETECTOR_DIR / name / "predictions_test.json", records, meta)
    return coco


def run_map(root: Path, resamples: int = 100, replicates: list[int] | None = None) -> tuple[dict, pd.DataFrame]:
    inputs = MapInputs(
        BootstrapConfig(resamples=resamples), ReplicatesConfig(lm=[], detector=replicates or [], diffusion=[])
    )
    map_task.fn(StageContext(root, "", 3, "cpu", NoRun()), inputs)
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


def shifted(records: list[dict], dx: float) -> list[dict]:
    return [{**r, "bbox": [r["bbox"][0] + dx, *r["bbox"][1:]]} for r in records]


def test_replicates_give_each_detector_a_t_interval_over_seeds(root):
    """The replicates' predictions are scored on the whole split; AP over seeds is their mean with the Student-t
    interval (scipy side by side), and a bootstrap-significant pair whose seed intervals overlap is flagged."""
    from scipy import stats

    coco = json.loads((root / SCENES_DIR / "test" / "annotations.json").read_text())
    seeds = {
        "thundernet": [perfect(coco), shifted(perfect(coco), 3.0), shifted(perfect(coco), 1.0)],
        "one_stage": [with_false_alarms(coco), shifted(perfect(coco), 2.0), shifted(with_false_alarms(coco), 1.0)],
    }
    project(
        root,
        seeds["thundernet"][0],
        seeds["one_stage"][0],
        thundernet_1=seeds["thundernet"][1],
        thundernet_2=seeds["thundernet"][2],
        one_stage_1=seeds["one_stage"][1],
        one_stage_2=seeds["one_stage"][2],
    )
    summaries, pairs = run_map(root, resamples=50, replicates=[1, 2])
    for name, per_seed in seeds.items():
        ap = [float(evaluate_coco(coco, records).stats[STAT_NAMES.index("AP")]) for records in per_seed]
        m = summaries[name]
        assert m["AP_seeds"] == 3 and list(m["AP_by_seed"].values()) == pytest.approx(ap)
        assert list(m["AP_by_seed"]) == ["3", "4", "5"]  # runtime.seed 3, replicates 1 and 2
        low, high = stats.t.interval(0.95, 2, loc=np.mean(ap), scale=stats.sem(ap))
        assert (m["AP_seed_mean"], m["AP_seed_ci_low"], m["AP_seed_ci_high"]) == pytest.approx((np.mean(ap), low, high))
    ap_pair = pairs.set_index("stat").loc["AP"]
    assert ap_pair["significant"]  # on the main stages' predictions the test images tell them apart
    assert not ap_pair["seed_separated"]  # but the seeds overlap: the report does not rank them
    seed_plot = pd.read_csv(root / PLOTS_DIR / "detector_seeds.csv")
    assert seed_plot["row"].tolist() == ["thundernet AP", "thundernet AP50", "one_stage AP", "one_stage AP50"]


def test_without_replicates_no_seed_interval_is_written(root):
    coco = json.loads((root / SCENES_DIR / "test" / "annotations.json").read_text())
    project(root, perfect(coco), with_false_alarms(coco))
    summaries, pairs = run_map(root, resamples=20)
    assert summaries["thundernet"]["AP_seeds"] == 1 and "AP_seed_mean" not in summaries["thundernet"]
    assert pairs["seed_separated"].isna().all()
    assert "NaN" not in (root / METRICS_DIR / "map.json").read_text()


def test_a_missing_replicate_names_its_stage(root):
    coco = json.loads((root / SCENES_DIR / "test" / "annotations.json").read_text())
    project(root, perfect(coco), perfect(coco))
    with pytest.raises(FileNotFoundError, match="thundernet-1/predictions_test.json"):
        run_map(root, resamples=20, replicates=[1])
