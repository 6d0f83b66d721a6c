"""A bootstrap resample of a COCO evaluation set: the test images drawn with replacement, as a COCO dataset.

COCO evaluation groups by image id, so an image drawn twice must come back as two images, or its ground
truths and detections would be matched as one image holding everything twice. Resample position j therefore
becomes image id j + 1, its annotations and detections are copied onto that id, and the annotations get fresh
ids 1, 2, ... (COCO matching needs them unique; being non-zero they avoid pycocotools' id-0 quirk, see
coco_eval.py). The resample is then evaluated by `evaluate_coco` like any other dataset.

`resample_images_ref` builds the same resample record by record; a test holds the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


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
