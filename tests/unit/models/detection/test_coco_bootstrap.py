"""models/detection/coco_bootstrap.py: a resample of the test images as a COCO dataset, against its
record-by-record twin, and what COCO evaluation of a resample must give in known cases."""

from __future__ import annotations

import numpy as np
import pytest

from models.bootstrap import resample_indices
from models.detection.coco_bootstrap import (
    ResampledAP,
    detection_columns,
    image_ids,
    resample_images,
    resample_images_ref,
    resampled_ap_ref,
)
from models.detection.coco_eval import evaluate_coco
from tests.unit.models.detection.test_coco_eval import run_pycocotools, synthetic


def renumbered(seed: int, grid: bool = True) -> tuple[dict, list[dict]]:
    """`synthetic`'s hard cases with annotation ids 1.. (its id 0 can never match, and a resample renumbers)."""
    gt, dets = synthetic(seed, grid=grid, jitter=0.1)
    for i, a in enumerate(gt["annotations"]):
        a["id"] = i + 1
    return gt, dets


def as_records(columns: dict[str, np.ndarray]) -> list[dict]:
    return [
        {"image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
        for i, c, b, s in zip(columns["image_id"], columns["category_id"], columns["bbox"], columns["score"])
    ]


@pytest.mark.parametrize("seed", [0, 1])
def test_resample_equals_the_record_by_record_twin(seed):
    gt, dets = renumbered(seed)
    draw = resample_indices(len(image_ids(gt)), 1, seed)[0]
    fast_gt, fast_dets = resample_images(gt, detection_columns(dets), draw)
    ref_gt, ref_dets = resample_images_ref(gt, dets, draw)
    assert fast_gt == ref_gt
    assert as_records(fast_dets) == ref_dets
    np.testing.assert_array_equal(evaluate_coco(fast_gt, fast_dets).stats, evaluate_coco(ref_gt, ref_dets).stats)


def test_every_image_once_gives_the_original_figures():
    gt, dets = renumbered(2)
    every = np.arange(len(image_ids(gt)))
    np.testing.assert_array_equal(
        evaluate_coco(*resample_images(gt, detection_columns(dets), every)).stats, evaluate_coco(gt, dets).stats
    )


def test_every_image_twice_gives_the_same_curves():
    # Doubling every image doubles every true and false positive count: the 2k-th true positive has the k-th's
    # recall and precision (up to the evaluator's epsilon), so AP stays. Scores must not tie across images
    # (grid=False), or the merge would interleave the copies of tied detections otherwise.
    gt, dets = renumbered(3, grid=False)
    twice = np.repeat(np.arange(len(image_ids(gt))), 2)
    stats = evaluate_coco(*resample_images(gt, detection_columns(dets), twice)).stats
    np.testing.assert_allclose(stats, evaluate_coco(gt, dets).stats, atol=1e-9)


def test_an_image_drawn_twice_counts_as_two_images():
    gt = {
        "images": [{"id": 7}, {"id": 9}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100.0}],
        "categories": [{"id": 1}],
    }
    dets = [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}]
    sample_gt, sample_dets = resample_images(gt, detection_columns(dets), np.array([0, 0]))
    assert [im["id"] for im in sample_gt["images"]] == [1, 2]
    assert [(a["id"], a["image_id"]) for a in sample_gt["annotations"]] == [(1, 1), (2, 2)]
    assert sample_dets["image_id"].tolist() == [1, 2]
    # Two ground truths, each found: AP 1. Had the copies kept image id 7, the second detection would find its
    # ground truth taken, a false positive.
    assert evaluate_coco(sample_gt, sample_dets).stats[0] == 1.0
    assert evaluate_coco(*resample_images(gt, detection_columns(dets), np.array([1, 1]))).stats[0] == -1.0


def test_a_resample_is_evaluated_as_pycocotools_evaluates_it():
    gt, dets = renumbered(4)
    draw = resample_indices(len(image_ids(gt)), 1, 11)[0]
    sample_gt, sample_dets = resample_images_ref(gt, dets, draw)
    np.testing.assert_allclose(
        evaluate_coco(sample_gt, sample_dets).stats, run_pycocotools(sample_gt, sample_dets).stats, atol=1e-6
    )


def test_records_of_unknown_images_are_refused():
    gt, dets = renumbered(0)
    dets[0] = {**dets[0], "image_id": 10_000}
    with pytest.raises(ValueError, match="not in the ground truth, e.g. 10000"):
        resample_images(gt, detection_columns(dets), np.array([0]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grid", [True, False])
def test_resampled_ap_equals_evaluating_the_built_resample_bit_for_bit(seed, grid):
    # `synthetic` keeps its hard cases: crowds, an annotation with id 0, score ties (grid), boxes that straddle
    # the IoU thresholds. ResampledAP renumbers the ids as a resample does, so id 0 matches there too.
    gt, dets = synthetic(seed, grid=grid, jitter=0.1)
    columns = detection_columns(dets)
    fast = ResampledAP(gt, columns)
    for draw in resample_indices(len(image_ids(gt)), 10, seed):
        assert fast(draw) == resampled_ap_ref(gt, columns, draw)


def test_resampled_ap_leaves_out_a_class_no_drawn_image_holds():
    gt = {
        "images": [{"id": 1}, {"id": 2}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100.0},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "area": 100.0},
        ],
        "categories": [{"id": 1}, {"id": 2}],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},  # found
        {"image_id": 2, "category_id": 2, "bbox": [50, 50, 10, 10], "score": 0.8},  # missed: class 2 scores 0
    ]
    columns = detection_columns(dets)
    ap = ResampledAP(gt, columns)
    assert ap(np.array([0, 1])) == pytest.approx((0.5, 0.5))  # the mean of class 1 (1.0) and class 2 (0.0)
    assert ap(np.array([0, 0])) == pytest.approx((1.0, 1.0))  # class 2 has no ground truth drawn: left out, not 0
    assert ap(np.array([1, 1])) == (0.0, 0.0)
    for draw in ([0, 1], [0, 0], [1, 1]):
        assert ap(np.array(draw)) == resampled_ap_ref(gt, columns, np.array(draw))
