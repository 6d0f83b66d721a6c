"""models/detection/coco_eval.py against pycocotools' COCOeval (its loop twin), built in memory, no files."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools.coco import COCO  # a test-only dependency: the reference twin
from pycocotools.cocoeval import COCOeval

from models.detection.coco_eval import STAT_NAMES, evaluate_coco

CATS = [1, 2, 5, 7]
NO_GT_CAT = 11  # listed in the categories, never annotated


def run_pycocotools(gt: dict, dets: list[dict]) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        E = COCOeval(coco_gt, coco_dt, "bbox")
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E


def per_class_ap(E: COCOeval, iou: float | None = None) -> dict[int, float]:
    s = E.eval["precision"][:, :, :, 0, -1]  # (T, R, K), area all, 100 detections
    if iou is not None:
        s = s[np.flatnonzero(E.params.iouThrs == iou)]
    out = {}
    for k, c in enumerate(E.params.catIds):
        v = s[:, :, k]
        out[int(c)] = float(np.mean(v[v > -1])) if (v > -1).any() else -1.0
    return out


def synthetic(seed: int, *, grid: bool, jitter: float, many_in_one: int = 130) -> tuple[dict, list[dict]]:
    """Random ground truth and jittered detections with every case COCOeval treats specially.

    grid=True puts boxes on a 4-pixel grid and scores on quarters, so IoUs and scores tie."""
    rng = np.random.default_rng(seed)
    n_img = 40
    images = [{"id": int(i)} for i in rng.permutation(np.arange(1, n_img + 1) * 3)]  # unsorted ids
    categories = [{"id": c} for c in CATS + [NO_GT_CAT]]

    def random_box():
        if grid:
            x, y = rng.integers(0, 60, 2) * 4
            w, h = rng.integers(1, 40, 2) * 4
        else:
            x, y = rng.uniform(0, 300, 2)
            w, h = np.exp(rng.uniform(np.log(3), np.log(200), 2))  # small, medium and large
        return [float(x), float(y), float(w), float(h)]

    anns = []
    for im in images:
        if im["id"] % 7 == 0:  # images without ground truth
            continue
        for _ in range(rng.integers(1, 10)):
            box = random_box()
            area = box[2] * box[3] * (rng.uniform(0.5, 1.0) if rng.random() < 0.5 else 1.0)  # e.g. mask area
            anns.append(
                {
                    "id": -1,
                    "image_id": im["id"],
                    "category_id": int(rng.choice(CATS)),
                    "bbox": box,
                    "area": float(area),
                    "iscrowd": int(rng.random() < 0.08),
                }
            )
    for a, i in zip(anns, rng.permutation(len(anns))):  # ids in no order, one of them 0 (never "matched")
        a["id"] = int(i)
    dets = []
    for im in images:
        if im["id"] % 5 == 0:  # images without detections
            continue
        for a in (a for a in anns if a["image_id"] == im["id"]):
            for _ in range(rng.integers(0, 4)):  # 0: missed, 2-3: duplicates
                x, y, w, h = a["bbox"]
                j = rng.normal(0, jitter, 4) * np.array([w, h, w, h])
                if grid:
                    j = np.round(j / 4) * 4
                c = a["category_id"] if rng.random() < 0.85 else int(rng.choice(CATS + [NO_GT_CAT]))
                box = [x + j[0], y + j[1], max(w + j[2], 2), max(h + j[3], 2)]
                dets.append(
                    {
                        "image_id": im["id"],
                        "category_id": c,
                        "bbox": [float(v) for v in box],
                        "score": float(rng.integers(0, 5) / 4 if grid else rng.random()),
                    }
                )
        for _ in range(rng.integers(0, 6)):  # background false positives
            dets.append(
                {
                    "image_id": im["id"],
                    "category_id": int(rng.choice(CATS + [NO_GT_CAT])),
                    "bbox": random_box(),
                    "score": float(rng.integers(0, 5) / 4 if grid else rng.random()),
                }
            )
    # More than 100 detections in one (image, category), and in one image: maxDets truncates.
    busy = next(im["id"] for im in images if im["id"] % 5 and im["id"] % 7)
    for i in range(many_in_one):
        dets.append(
            {
                "image_id": busy,
                "category_id": CATS[0] if i % 3 else CATS[1],
                "bbox": random_box(),
                "score": float(np.round(rng.random(), 1)),
            }
        )  # ties
    rng.shuffle(dets)
    return {"images": images, "annotations": anns, "categories": categories}, dets


SCENARIOS = [
    pytest.param(0, False, 0.05, id="continuous-tight"),
    pytest.param(1, False, 0.15, id="continuous-loose"),
    pytest.param(2, True, 0.05, id="grid-ties-tight"),
    pytest.param(3, True, 0.2, id="grid-ties-loose"),
    pytest.param(4, False, 0.1, id="continuous-mid"),
]


@pytest.mark.parametrize("seed,grid,jitter", SCENARIOS)
def test_equals_pycocotools(seed, grid, jitter):
    gt, dets = synthetic(seed, grid=grid, jitter=jitter)
    # the cases the scenario is meant to contain are there
    gt_imgs = {a["image_id"] for a in gt["annotations"]}
    dt_imgs = {d["image_id"] for d in dets}
    assert any(im["id"] not in gt_imgs for im in gt["images"]) and any(im["id"] not in dt_imgs for im in gt["images"])
    assert any(a["iscrowd"] for a in gt["annotations"]) and any(a["id"] == 0 for a in gt["annotations"])
    assert max(np.unique([d["image_id"] for d in dets], return_counts=True)[1]) > 100

    E = run_pycocotools(gt, dets)
    ours = evaluate_coco(gt, dets)

    assert 0.01 < E.stats[0] < 0.99  # not a degenerate AP
    np.testing.assert_allclose(ours.stats, E.stats, rtol=0, atol=1e-6, err_msg=str(dict(zip(STAT_NAMES, E.stats))))
    np.testing.assert_allclose(ours.precision, E.eval["precision"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.recall, E.eval["recall"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.scores, E.eval["scores"], rtol=0, atol=1e-6)
    ref_ap, ref_ap50 = per_class_ap(E), per_class_ap(E, 0.5)
    assert ours.cat_ids == sorted(ref_ap)
    for c in ours.cat_ids:
        assert ours.per_class_ap[c] == pytest.approx(ref_ap[c], abs=1e-6)
        assert ours.per_class_ap50[c] == pytest.approx(ref_ap50[c], abs=1e-6)
    assert ours.per_class_ap[NO_GT_CAT] == -1.0


def test_equal_iou_goes_to_the_later_ground_truth():
    # d1 overlaps A and B equally (IoU 2/3); COCOeval's running best updates on >=, so d1 takes B, the later
    # annotation, and d2 (IoU 1 with A, 3/7 with B) takes A: two true positives at IoU 0.5. Ties to the
    # first would leave d2 a false positive.
    gt = {
        "images": [{"id": 1}],
        "categories": [{"id": 1}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [4, 0, 10, 10], "area": 100, "iscrowd": 0},
        ],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [2, 0, 10, 10], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8},
    ]
    ours, E = evaluate_coco(gt, dets), run_pycocotools(gt, dets)
    np.testing.assert_allclose(ours.stats, E.stats, atol=1e-6)
    np.testing.assert_allclose(ours.precision, E.eval["precision"], atol=1e-6)
    assert ours.stats[1] == pytest.approx(1.0)  # AP50


def test_columns_input_equals_list_input():
    gt, dets = synthetic(5, grid=False, jitter=0.1)
    columns = {
        "image_id": np.array([d["image_id"] for d in dets]),
        "category_id": np.array([d["category_id"] for d in dets]),
        "bbox": np.array([d["bbox"] for d in dets]),
        "score": np.array([d["score"] for d in dets]),
    }
    a, b = evaluate_coco(gt, dets), evaluate_coco(gt, columns)
    np.testing.assert_array_equal(a.stats, b.stats)
    np.testing.assert_array_equal(a.precision, b.precision)


def test_no_detections_and_perfect_detections():
    gt, _ = synthetic(6, grid=False, jitter=0.1)
    empty = evaluate_coco(gt, [])  # pycocotools' loadRes cannot take an empty list
    assert empty.stats[0] == 0.0 and empty.stats[8] == 0.0
    assert empty.per_class_ap[NO_GT_CAT] == -1.0

    # Every non-crowd annotation detected exactly, distinct scores: AP = AR = 1 over all areas ...
    for a in gt["annotations"]:
        a["id"] += 1
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0 - 1e-4 * i}
        for i, a in enumerate(gt["annotations"])
        if not a["iscrowd"]
    ]
    ours, E = evaluate_coco(gt, perfect), run_pycocotools(gt, perfect)
    np.testing.assert_allclose(ours.stats, E.stats, atol=1e-6)
    assert ours.stats[0] == pytest.approx(1.0) and ours.stats[8] == pytest.approx(1.0)

    # ... unless a ground truth has id 0: pycocotools stores matched ids and reads 0 as "unmatched".
    next(a for a in gt["annotations"] if not a["iscrowd"])["id"] = 0
    ours, E = evaluate_coco(gt, perfect), run_pycocotools(gt, perfect)
    np.testing.assert_allclose(ours.stats, E.stats, atol=1e-6)
    assert ours.stats[0] < 1.0 and ours.stats[8] < 1.0


def test_pr_curve_and_summary():
    gt, dets = synthetic(7, grid=False, jitter=0.05)
    res = evaluate_coco(gt, dets)
    recall, precision = res.pr_curve(iou=0.5)
    assert recall.shape == precision.shape == (101,)
    assert np.all(np.diff(precision[np.isfinite(precision)]) <= 1e-12)  # the envelope never rises
    assert res.summary()["AP50"] == pytest.approx(res.stats[1])
    # AP50 is the mean of the PR curve over categories with ground truth.
    assert np.mean(precision) == pytest.approx(res.stats[1])


def test_rejects_detections_on_unknown_images():
    gt, dets = synthetic(8, grid=False, jitter=0.1)
    with pytest.raises(ValueError, match="images not in the ground truth"):
        evaluate_coco(gt, dets + [{"image_id": 10**6, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])
