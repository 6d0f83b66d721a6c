"""A bootstrap resample of a COCO evaluation set: the test images drawn with replacement, as a COCO dataset.

COCO evaluation groups by image id, so an image drawn twice must come back as two images, or its ground
truths and detections would be matched as one image holding everything twice. Resample position j therefore
becomes image id j + 1, its annotations and detections are copied onto that id, and the annotations get fresh
ids 1, 2, ... (COCO matching needs them unique; being non-zero they avoid pycocotools' id-0 quirk, see
coco_eval.py). The resample is then evaluated by `evaluate_coco` like any other dataset.

`resample_images_ref` builds the same resample record by record; a test holds the two equal.

`ResampledAP` gives a resample's AP and AP50 without building and evaluating it: COCO matching never looks
across images, so each image's true and false positives are found once, and a resample only merges the drawn
images' detections and reads the precision curves (coco_eval.py's step 5, for the one area range and maxDet
those two figures use). Its twin, `resampled_ap_ref`, evaluates the built resample; a test holds them equal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.detection.coco_eval import (
    AREA_LABELS,
    IOU_THRESHOLDS,
    MAX_DETS,
    REC_THRESHOLDS,
    _mean_valid,
    evaluate_coco,
    match_detections,
)

_AP50 = np.flatnonzero(IOU_THRESHOLDS == 0.5)


def detection_columns(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """COCO result records -> the column form `evaluate_coco` also takes (image_id, category_id, bbox, score)."""
    return {
        "image_id": np.asarray([r["image_id"] for r in records], dtype=np.int64),
        "category_id": np.asarray([r["category_id"] for r in records], dtype=np.int64),
        "bbox": np.asarray([r["bbox"] for r in records], dtype=np.float64).reshape(-1, 4),
        "score": np.asarray([r["score"] for r in records], dtype=np.float64),
    }


def image_ids(gt: Mapping[str, Any]) -> np.ndarray:
    """(I,) the ground truth's image ids, sorted: the items a resample draws from (by position)."""
    return np.unique(np.asarray([im["id"] for im in gt["images"]], dtype=np.int64))


def _rows_by_image(ids: np.ndarray, of: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of `of` (image ids) grouped by the position of their image in `ids`: (order, first, count)."""
    pos = np.searchsorted(ids, of)
    unknown = (pos == len(ids)) | (ids[np.minimum(pos, len(ids) - 1)] != of)
    if unknown.any():
        raise ValueError(f"records refer to images not in the ground truth, e.g. {of[unknown][0]}")
    order = np.argsort(pos, kind="stable")  # within an image, the input order (score ties keep it)
    count = np.bincount(pos, minlength=len(ids))
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    return order, first, count


def _gather(order: np.ndarray, first: np.ndarray, count: np.ndarray, draw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the drawn images in draw order, and the resample position each row belongs to."""
    c = count[draw]  # (n,)
    starts = np.repeat(first[draw] - np.concatenate([[0], np.cumsum(c)[:-1]]), c)
    return order[starts + np.arange(c.sum())], np.repeat(np.arange(len(draw)), c)


def resample_images(
    gt: Mapping[str, Any], detections: Mapping[str, np.ndarray], draw: np.ndarray
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The resample `draw` (n,) (positions into `image_ids(gt)`, with repeats) as a ground-truth dict and
    detection columns in which position j is image j + 1."""
    ids = image_ids(gt)
    anns = gt["annotations"]
    a_image = np.asarray([a["image_id"] for a in anns], dtype=np.int64)
    rows, new_image = _gather(*_rows_by_image(ids, a_image), draw)
    annotations = [
        {
            "id": k + 1,
            "image_id": int(j) + 1,
            "category_id": anns[r]["category_id"],
            "bbox": anns[r]["bbox"],
            "area": anns[r]["area"],
            "iscrowd": anns[r].get("iscrowd", 0),
        }
        for k, (r, j) in enumerate(zip(rows.tolist(), new_image.tolist()))
    ]
    rows, new_image = _gather(*_rows_by_image(ids, detections["image_id"]), draw)
    dets = {key: np.asarray(detections[key])[rows] for key in ("category_id", "bbox", "score")}
    dets["image_id"] = new_image.astype(np.int64) + 1
    images = [{"id": j + 1} for j in range(len(draw))]
    return {"images": images, "annotations": annotations, "categories": gt["categories"]}, dets


def resample_images_ref(
    gt: Mapping[str, Any], records: Sequence[Mapping[str, Any]], draw: np.ndarray
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`resample_images` one drawn image at a time, copying records (detections as result records)."""
    ids = sorted({int(im["id"]) for im in gt["images"]})
    images, annotations, dets = [], [], []
    for j, p in enumerate(draw):
        images.append({"id": j + 1})
        for a in gt["annotations"]:
            if a["image_id"] == ids[p]:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": j + 1,
                        "category_id": a["category_id"],
                        "bbox": a["bbox"],
                        "area": a["area"],
                        "iscrowd": a.get("iscrowd", 0),
                    }
                )
        dets += [{**d, "image_id": j + 1} for d in records if d["image_id"] == ids[p]]
    return {"images": images, "annotations": annotations, "categories": gt["categories"]}, dets


class ResampledAP:
    """AP and AP50 (IoU 0.5:0.95 and 0.5, area "all", 100 detections) of resamples of one detector's test
    images, each equal to `evaluate_coco` of the resample built by `resample_images`, bit for bit."""

    def __init__(self, gt: Mapping[str, Any], detections: Mapping[str, np.ndarray] | Sequence[Mapping[str, Any]]):
        # A resample renumbers the annotations 1, 2, ...: the same non-zero ids here, so the same matches.
        renumbered = {**gt, "annotations": [{**a, "id": k + 1} for k, a in enumerate(gt["annotations"])]}
        m = match_detections(renumbered, detections)
        area = AREA_LABELS.index("all")
        self.tp, self.fp = m.tp[:, area, :], m.fp[:, area, :]  # (N, T)
        self.cat, self.rank, self.score = m.cat, m.rank, m.score
        self.num_classes = len(m.cat_ids)
        images = len(m.img_ids)
        self.order = np.argsort(m.img, kind="stable")  # detection rows grouped by image
        self.count = np.bincount(m.img, minlength=images)
        self.first = np.concatenate([[0], np.cumsum(self.count)[:-1]])
        self.npig = np.zeros((images, self.num_classes), dtype=np.int64)  # (I, K) non-ignored ground truths
        np.add.at(self.npig, (m.gt_img, m.gt_cat), ~m.gt_ignore[:, area])
        assert (self.rank < MAX_DETS[-1]).all()  # match_detections kept the first 100 per image and category

    def __call__(self, draw: np.ndarray) -> tuple[float, float]:
        """(AP, AP50) of the resample `draw` (n,): positions into `image_ids(gt)`, with repeats."""
        rows, position = _gather(self.order, self.first, self.count, draw)
        npig = self.npig[draw].sum(0)  # (K,)
        cat = self.cat[rows]
        # evaluate_coco's merge: by category, score (highest first), then image (resample position), then rank
        merged = np.lexsort((self.rank[rows], position, -self.score[rows], cat))
        rows = rows[merged]
        bounds = np.searchsorted(cat[merged], np.arange(self.num_classes + 1))
        precision = -np.ones((len(IOU_THRESHOLDS), len(REC_THRESHOLDS), self.num_classes))  # (T, R, K)
        for k in np.flatnonzero(npig):
            seg = rows[bounds[k] : bounds[k + 1]]
            precision[:, :, k] = _precision_at_recalls(self.tp[seg], self.fp[seg], int(npig[k]))
        return _mean_valid(precision), _mean_valid(precision[_AP50])


def _precision_at_recalls(tp: np.ndarray, fp: np.ndarray, npig: int) -> np.ndarray:
    """COCOeval.accumulate for one category: (nd, T) flags in merge order -> (T, R) interpolated precision."""
    nd, T = tp.shape
    out = np.zeros((T, len(REC_THRESHOLDS)))
    if nd == 0:
        return out
    tps = np.cumsum(tp, axis=0).astype(float)
    fps = np.cumsum(fp, axis=0).astype(float)
    recall = tps / npig
    envelope = np.maximum.accumulate((tps / (fps + tps + np.spacing(1)))[::-1], axis=0)[::-1]
    for t in range(T):
        at = np.searchsorted(recall[:, t], REC_THRESHOLDS, side="left")
        reached = at < nd
        out[t, reached] = envelope[at[reached], t]
    return out


def resampled_ap_ref(
    gt: Mapping[str, Any], detections: Mapping[str, np.ndarray], draw: np.ndarray
) -> tuple[float, float]:
    """`ResampledAP`'s twin: the resample built as a COCO dataset and evaluated whole."""
    stats = evaluate_coco(*resample_images(gt, detections, draw)).stats
    return float(stats[0]), float(stats[1])
