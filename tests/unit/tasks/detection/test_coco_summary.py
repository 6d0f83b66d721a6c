"""tasks/detection/map.py `coco_summary`, the record the `map` stage writes to data/metrics/map.json:
each per-class value is that class's AP from pycocotools, not its id."""

from __future__ import annotations

import numpy as np

from models.detection.coco_eval import evaluate_coco
from tasks.detection.map import coco_summary
from tests.unit.models.detection.test_coco_eval import NO_GT_CAT, per_class_ap, run_pycocotools, synthetic


def test_per_class_ap_is_pycocotools_per_class_ap_and_averages_to_ap():
    gt, dets = synthetic(3, grid=False, jitter=0.1)
    summary = coco_summary(evaluate_coco(gt, dets))
    E = run_pycocotools(gt, dets)
    ref, ref50 = per_class_ap(E), per_class_ap(E, 0.5)
    assert summary["per_class_ap"] == {str(c): ref[c] for c in ref}
    assert summary["per_class_ap50"] == {str(c): ref50[c] for c in ref50}
    assert summary["per_class_ap"][str(NO_GT_CAT)] == -1.0
    valid = [v for v in summary["per_class_ap"].values() if v > -1]
    assert 0.0 < min(valid) and max(valid) < 1.0  # ids 1, 2, 5, 7 would fail this
    # COCO's AP is the mean over the classes with ground truth of their AP.
    assert np.isclose(np.mean(valid), summary["AP"], atol=1e-12)
