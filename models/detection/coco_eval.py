"""COCO bounding-box evaluation (Lin et al. 2014, "Microsoft COCO"), vectorised with numpy.

Gives the numbers pycocotools' `COCOeval(gt, dt, "bbox")` gives after `evaluate(); accumulate();
summarize()`: the 12 summary stats, the precision array (T, R, K, A, M), recall (T, K, A, M) and the
scores at each recall threshold, with the same semantics, quirks included:

1. Per (image, category): detections sorted by score, highest first, ties kept in input order
   (`np.argsort(-scores, kind="mergesort")`), truncated to maxDets[-1] = 100. maxDets therefore bounds
   detections per image *and category*, as pycocotools does with `useCats=1`.
2. IoU of a detection with a crowd annotation is intersection / detection area (maskApi.c `bbIou`);
   IoU uses the boxes, the area ranges use the annotation's `area` field (detections: w * h).
3. A ground truth is ignored when it is a crowd or its area lies outside the range (ends included).
   Greedy matching per IoU threshold t, detections by score: a detection takes, among ground truths not
   yet matched (crowds can be matched again), the one with the highest IoU >= min(t, 1 - 1e-10), ties to
   the later one in annotation order; it tries ignored ground truths only when no regular one qualifies.
   A detection matched to an ignored ground truth is ignored; so is an unmatched one outside the area range.
4. A detection counts as matched when the *id* of its ground truth is non-zero (pycocotools stores ids in
   `dtMatches` and tests them for truth), so a ground truth with id 0 can never give a true positive.
5. Per category, area range and maxDet m: the first m detections of every image, merged in image-id
   order and stable-sorted by score; cumulative TP / FP give recall and precision; precision is made
   monotone (the envelope) and read at the 101 recall thresholds at the first index whose recall reaches
   the threshold, 0 where recall never does. Categories (or areas) without non-ignored ground truth get -1.
6. A summary stat is the mean of the entries > -1 (-1 when there are none).

Vectorised: step 3 runs once per detection rank (<= 100 steps) over all (image, category) groups, area
ranges and IoU thresholds at once, the groups bucketed by their number of ground truths; step 5 reads the
curves only at the true positives (see `_accumulate`), once per maxDet, with a light loop over categories.
The loop twin is pycocotools itself (tests/unit/test_coco_eval.py holds them equal).

Inputs are parsed COCO JSON: the ground-truth dict (images, annotations, categories) and the detection
results (a list of dicts, or a dict of columns `image_id`, `category_id`, `bbox` (N, 4) xywh, `score`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------------------------------
# The COCO bbox parameters (pycocotools Params.setDetParams)

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)  # T = 10
REC_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)  # R = 101
MAX_DETS = (1, 10, 100)  # M
AREA_RANGES = ((0.0**2, 1e5**2), (0.0**2, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))  # A
AREA_LABELS = ("all", "small", "medium", "large")

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# (average precision?, IoU threshold or None for all, area label, maxDets), as in COCOeval._summarizeDets
_STAT_SPECS = (
    (True, None, "all", 100),
    (True, 0.5, "all", 100),
    (True, 0.75, "all", 100),
    (True, None, "small", 100),
    (True, None, "medium", 100),
    (True, None, "large", 100),
    (False, None, "all", 1),
    (False, None, "all", 10),
    (False, None, "all", 100),
    (False, None, "small", 100),
    (False, None, "medium", 100),
    (False, None, "large", 100),
)


@dataclass
class CocoEvalResult:
    """What COCOeval holds after accumulate() and summarize(), plus per-class AP."""

    stats: np.ndarray  # (12,) in STAT_NAMES order
    precision: np.ndarray  # (T, R, K, A, M), -1 where a category/area has no ground truth
    recall: np.ndarray  # (T, K, A, M)
    scores: np.ndarray  # (T, R, K, A, M) score of the detection where each recall threshold is reached
    cat_ids: list[int]
    per_class_ap: dict[int, float]  # AP@[.5:.95], area all, 100 dets; -1 without ground truth
    per_class_ap50: dict[int, float]
    iou_thresholds: np.ndarray = field(default_factory=lambda: IOU_THRESHOLDS.copy())
    rec_thresholds: np.ndarray = field(default_factory=lambda: REC_THRESHOLDS.copy())

    def summary(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(STAT_NAMES, self.stats)}

    def pr_curve(
        self, iou: float | None = 0.5, area: str = "all", max_dets: int = 100
    ) -> tuple[np.ndarray, np.ndarray]:
        """(recall thresholds (R,), precision (R,)) averaged over categories with ground truth and, when
        `iou` is None, over all IoU thresholds; NaN where nothing has ground truth."""
        s = self.precision[:, :, :, AREA_LABELS.index(area), MAX_DETS.index(max_dets)]  # (T, R, K)
        if iou is not None:
            s = s[np.flatnonzero(np.isclose(self.iou_thresholds, iou))]
        s = s.transpose(1, 0, 2).reshape(len(self.rec_thresholds), -1)  # (R, T * K)
        valid = s > -1
        with np.errstate(invalid="ignore"):
            curve = np.where(valid, s, 0.0).sum(1) / valid.sum(1)
        return self.rec_thresholds.copy(), curve


# ----------------------------------------------------------------------------------------------------
# Parsing


def _as_columns(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]] | Mapping[str, Any]):
    img_ids = np.unique(np.asarray([im["id"] for im in gt["images"]], dtype=np.int64))
    cat_ids = np.unique(np.asarray([c["id"] for c in gt["categories"]], dtype=np.int64))

    anns = gt["annotations"]
    g = {
        "image_id": np.asarray([a["image_id"] for a in anns], dtype=np.int64),
        "category_id": np.asarray([a["category_id"] for a in anns], dtype=np.int64),
        "bbox": np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
        "area": np.asarray([a["area"] for a in anns], dtype=np.float64),
        "iscrowd": np.asarray([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
        "id": np.asarray([a["id"] for a in anns], dtype=np.int64),
    }
    if len(np.unique(g["id"])) != len(g["id"]):
        raise ValueError("ground-truth annotation ids must be unique")

    if isinstance(detections, Mapping):
        d = {
            "image_id": np.asarray(detections["image_id"], dtype=np.int64).reshape(-1),
            "category_id": np.asarray(detections["category_id"], dtype=np.int64).reshape(-1),
            "bbox": np.asarray(detections["bbox"], dtype=np.float64).reshape(-1, 4),
            "score": np.asarray(detections["score"], dtype=np.float64).reshape(-1),
        }
    else:
        d = {
            "image_id": np.asarray([x["image_id"] for x in detections], dtype=np.int64),
            "category_id": np.asarray([x["category_id"] for x in detections], dtype=np.int64),
            "bbox": np.asarray([x["bbox"] for x in detections], dtype=np.float64).reshape(-1, 4),
            "score": np.asarray([x["score"] for x in detections], dtype=np.float64),
        }
    n = len(d["score"])
    if not all(len(v) == n for v in d.values()):
        raise ValueError("detections: image_id, category_id, bbox and score must have the same length")
    unknown = ~np.isin(d["image_id"], img_ids)
    if unknown.any():  # pycocotools' loadRes asserts the same
        raise ValueError(f"detections refer to images not in the ground truth, e.g. {d['image_id'][unknown][0]}")
    return img_ids, cat_ids, g, d


# ----------------------------------------------------------------------------------------------------
# Step 2: IoU (maskApi.c bbIou, the same float64 operations)


def _bbox_iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """dt (..., 4), gt (..., 4) xywh, crowd (...) -> IoU (...), elementwise over broadcast shapes."""
    w = np.minimum(dt[..., 2] + dt[..., 0], gt[..., 2] + gt[..., 0]) - np.maximum(dt[..., 0], gt[..., 0])
    h = np.minimum(dt[..., 3] + dt[..., 1], gt[..., 3] + gt[..., 1]) - np.maximum(dt[..., 1], gt[..., 1])
    inter = w * h
    da = dt[..., 2] * dt[..., 3]
    ga = gt[..., 2] * gt[..., 3]
    union = np.where(crowd, da, da + ga - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


# ----------------------------------------------------------------------------------------------------
# Step 3: greedy matching, all groups at once, one detection rank per step


def _match_bucket(
    ious: np.ndarray,  # (N, Gb) IoU of each detection with its group's padded ground truths, columns reversed
    det_offset: np.ndarray,  # (nb,) first detection row of each group; groups sorted by count, descending
    det_count: np.ndarray,  # (nb,)
    gt_valid: np.ndarray,  # (nb, Gb) columns reversed, as all gt arrays here
    gt_ignore: np.ndarray,  # (nb, A, Gb)
    gt_crowd: np.ndarray,  # (nb, Gb)
    gt_id_nonzero: np.ndarray,  # (nb, Gb)
    thresholds: np.ndarray,  # (T,)
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of every group at once, one detection rank per step. Returns per detection row
    `dtm` (N, A, T): matched to a ground truth with a non-zero id, and `ignored` (N, A, T): matched to an
    ignored ground truth. The ground-truth columns come reversed, so that COCOeval's *last* best match
    (its running best updates on >=) is numpy's first argmax."""
    nb, A, Gb = gt_ignore.shape
    T = len(thresholds)
    dtm = np.zeros((ious.shape[0], A, T), dtype=bool)
    ignored = np.zeros((ious.shape[0], A, T), dtype=bool)
    matched = np.zeros((nb, A, T, Gb), dtype=bool)
    thr = thresholds[None, None, :, None]
    reg_gt = (gt_valid[:, None, :] & ~gt_ignore)[:, :, None, :]  # (nb, A, 1, Gb)
    ign_gt = (gt_valid[:, None, :] & gt_ignore)[:, :, None, :]
    crowd = gt_crowd[:, None, None, :]
    for d in range(int(det_count.max(initial=0))):
        n = int(np.count_nonzero(det_count > d))  # the groups with a detection of rank d lead
        rows = det_offset[:n] + d
        iou = ious[rows][:, None, None, :]  # (n, 1, 1, Gb)
        ok = (~matched[:n] | crowd[:n]) & (iou >= thr)  # (n, A, T, Gb); a crowd may absorb many
        v_reg = np.where(ok & reg_gt[:n], iou, -1.0)
        v_ign = np.where(ok & ign_gt[:n], iou, -1.0)
        m_reg = np.argmax(v_reg, axis=-1)[..., None]  # (n, A, T, 1)
        m_ign = np.argmax(v_ign, axis=-1)[..., None]
        has_reg = np.take_along_axis(v_reg, m_reg, axis=-1)[..., 0] >= 0  # (n, A, T)
        has_ign = np.take_along_axis(v_ign, m_ign, axis=-1)[..., 0] >= 0
        # Ignored ground truths come after the regular ones: tried only when no regular one qualifies.
        m = np.where(has_reg, m_reg[..., 0], np.where(has_ign, m_ign[..., 0], -1))
        gi, ai, ti = np.nonzero(m >= 0)
        mi = m[gi, ai, ti]
        matched[gi, ai, ti, mi] = True
        dtm[rows[gi], ai, ti] = gt_id_nonzero[gi, mi]
        ignored[rows[gi], ai, ti] = ~has_reg[gi, ai, ti]
    return dtm, ignored


# ----------------------------------------------------------------------------------------------------
# Step 5: precision / recall per (category, area, maxDet, IoU threshold)


def _accumulate(
    tp: np.ndarray,  # (N, A, T) bool
    fp: np.ndarray,  # (N, A, T) bool
    cat: np.ndarray,  # (N,) category index
    img: np.ndarray,  # (N,) image index
    rank: np.ndarray,  # (N,) rank by score within its (image, category)
    score: np.ndarray,  # (N,)
    npig: np.ndarray,  # (K, A) non-ignored ground truths
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COCOeval.accumulate, reading the curves only where they matter.

    In a (category, area, threshold) row, sorted by score, recall rc = tp / npig rises with the count of
    true positives, so `searchsorted(rc, r)` is the position of the c_r-th true positive, c_r the least
    count with c_r / npig >= r (the same float division); it is 0 when c_r = 0. Between true positives
    the precision tp / (tp + fp + eps) only falls, so its envelope at the c-th true positive is the max
    over the true positives from the c-th on. Everything is computed from the true positives' positions,
    with the false positives counted before each, never the (N, A, T) cumulative sums."""
    N, A, T = tp.shape
    K, R, M = npig.shape[0], len(REC_THRESHOLDS), len(MAX_DETS)
    AT = A * T
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    scores = -np.ones((T, R, K, A, M))
    # c_r per (category, area); npig + 1 (never reached) where there is no ground truth
    c_r = np.zeros((K, A, R), dtype=np.int64)
    for k, a in zip(*np.nonzero(npig)):
        c_r[k, a] = np.searchsorted(np.arange(npig[k, a] + 1) / npig[k, a], REC_THRESHOLDS, side="left")
    c_r = np.repeat(c_r, T, axis=1)  # (K, AT, R), row = a * T + t
    npig_rows = np.repeat(npig, T, axis=1)  # (K, AT)

    for m, max_det in enumerate(MAX_DETS):
        sel = np.flatnonzero(rank < max_det)
        # Images merged in id order, each already by score, then stable-sorted by score.
        order = sel[np.lexsort((rank[sel], img[sel], -score[sel], cat[sel]))]
        n = len(order)
        cat_o, score_o = cat[order], score[order]
        bounds = np.searchsorted(cat_o, np.arange(K + 1))  # category k is [bounds[k], bounds[k+1])
        tp_flat = np.flatnonzero(np.ascontiguousarray(tp[order].reshape(n, AT).T))  # row-major (AT, n)
        fp_flat = np.flatnonzero(np.ascontiguousarray(fp[order].reshape(n, AT).T))
        row, pos = np.divmod(tp_flat, max(n, 1))
        k_of = cat_o[pos]
        seg_start = row * n + bounds[k_of]  # where this row of this category starts
        count = np.arange(len(tp_flat)) - np.searchsorted(tp_flat, seg_start) + 1  # tp at this position
        fp_before = np.searchsorted(fp_flat, tp_flat) - np.searchsorted(fp_flat, seg_start)
        pr = count / (fp_before + count + np.spacing(1))
        n_tp = np.bincount(k_of * AT + row, minlength=K * AT).reshape(K, AT)
        by_cat = np.argsort(k_of, kind="stable")  # keeps (row, count) order within a category
        cat_start = np.searchsorted(k_of[by_cat], np.arange(K + 1))
        for k in range(K):
            rows = np.flatnonzero(npig_rows[k])  # the other rows stay -1
            if len(rows) == 0:
                continue
            a_rows, t_rows = np.divmod(rows, T)
            recall[t_rows, k, a_rows, m] = n_tp[k, rows] / npig_rows[k, rows]
            nd = bounds[k + 1] - bounds[k]
            if nd == 0:
                precision[t_rows, :, k, a_rows, m] = 0.0
                scores[t_rows, :, k, a_rows, m] = 0.0
                continue
            e = by_cat[cat_start[k] : cat_start[k + 1]]
            L = max(int(n_tp[k].max()), 1)
            env = np.full((AT, L), -np.inf)  # env[row, c - 1]: precision envelope at the c-th tp
            env[row[e], count[e] - 1] = pr[e]
            env = np.maximum.accumulate(env[:, ::-1], axis=1)[:, ::-1]
            at = np.zeros((AT, L), dtype=np.int64)  # position of the c-th tp
            at[row[e], count[e] - 1] = pos[e]
            c = c_r[k][rows]  # (rows, R)
            has_tp = n_tp[k, rows, None] > 0
            reached = c <= n_tp[k, rows, None]
            col = np.clip(c - 1, 0, L - 1)
            r_i = rows[:, None]
            prec = np.where(reached & has_tp, env[r_i, col], 0.0)  # c = 0 reads index 0: the max
            sc = np.where(c == 0, score_o[bounds[k]], np.where(reached, score_o[at[r_i, col]], 0.0))
            precision[t_rows, :, k, a_rows, m] = prec
            scores[t_rows, :, k, a_rows, m] = sc
    return precision, recall, scores


# ----------------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class Matches:
    """Steps 1-3 of an evaluation: the kept detections (at most maxDets[-1] per image and category) with their
    true/false positive flags per area range and IoU threshold, and the non-ignored ground truths. Matching
    never looks across images, so a bootstrap over images reuses it (coco_bootstrap.ResampledAP)."""

    tp: np.ndarray  # (N, A, T) bool
    fp: np.ndarray  # (N, A, T) bool: neither matched nor ignored
    cat: np.ndarray  # (N,) category index into cat_ids
    img: np.ndarray  # (N,) image index into img_ids
    rank: np.ndarray  # (N,) rank by score within its (image, category)
    score: np.ndarray  # (N,)
    gt_img: np.ndarray  # (G,) image index of each kept ground truth
    gt_cat: np.ndarray  # (G,) category index
    gt_ignore: np.ndarray  # (G, A) bool
    img_ids: np.ndarray  # (I,)
    cat_ids: np.ndarray  # (K,)

    def npig(self) -> np.ndarray:
        """(K, A) non-ignored ground truths per category and area range."""
        npig = np.zeros((len(self.cat_ids), len(AREA_RANGES)), dtype=np.int64)
        np.add.at(npig, self.gt_cat, ~self.gt_ignore)
        return npig


def evaluate_coco(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> CocoEvalResult:
    """COCO bbox evaluation of `detections` against the ground-truth dict `gt` (see module docstring)."""
    m = match_detections(gt, detections)
    precision, recall, scores = _accumulate(m.tp, m.fp, m.cat, m.img, m.rank, m.score, m.npig())

    stats = np.asarray([_summarize(precision, recall, *spec) for spec in _STAT_SPECS])
    ap_all = precision[:, :, :, 0, -1]  # (T, R, K)
    t50 = np.flatnonzero(IOU_THRESHOLDS == 0.5)
    per_class_ap = {int(c): _mean_valid(ap_all[:, :, k]) for k, c in enumerate(m.cat_ids)}
    per_class_ap50 = {int(c): _mean_valid(ap_all[t50][:, :, k]) for k, c in enumerate(m.cat_ids)}
    return CocoEvalResult(
        stats=stats,
        precision=precision,
        recall=recall,
        scores=scores,
        cat_ids=[int(c) for c in m.cat_ids],
        per_class_ap=per_class_ap,
        per_class_ap50=per_class_ap50,
    )


def match_detections(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> Matches:
    """Steps 1-3 (module docstring): parse, group, truncate and match."""
    img_ids, cat_ids, g, d = _as_columns(gt, detections)
    I = len(img_ids)
    T, A = len(IOU_THRESHOLDS), len(AREA_RANGES)
    lo = np.asarray([r[0] for r in AREA_RANGES])  # (A,)
    hi = np.asarray([r[1] for r in AREA_RANGES])

    # Keep annotations/detections of known images and categories (COCOeval._prepare via getAnnIds).
    def locate(ids: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.clip(np.searchsorted(table, ids), 0, max(len(table) - 1, 0))
        found = (table[pos] == ids) if len(table) else np.zeros(len(ids), dtype=bool)
        return pos, found

    gi_img, ok_img = locate(g["image_id"], img_ids)
    gi_cat, ok_cat = locate(g["category_id"], cat_ids)
    keep = ok_img & ok_cat
    g = {k: v[keep] for k, v in g.items()}
    g_img, g_cat = gi_img[keep], gi_cat[keep]
    di_img, _ = locate(d["image_id"], img_ids)
    di_cat, ok_cat = locate(d["category_id"], cat_ids)
    d = {k: v[ok_cat] for k, v in d.items()}
    d_img, d_cat = di_img[ok_cat], di_cat[ok_cat]

    # Step 1: group by (category, image); detections by score (stable), at most maxDets[-1] per group.
    g_key = g_cat * I + g_img
    g_order = np.argsort(g_key, kind="stable")  # within a group: annotation order
    g = {k: v[g_order] for k, v in g.items()}
    g_key, g_cat = g_key[g_order], g_cat[g_order]

    d_key = d_cat * I + d_img
    d_order = np.lexsort((-d["score"], d_key))  # lexsort is stable: ties keep input order
    d = {k: v[d_order] for k, v in d.items()}
    d_key, d_cat, d_img = d_key[d_order], d_cat[d_order], d_img[d_order]
    d_start = np.searchsorted(d_key, d_key, side="left")
    d_rank = np.arange(len(d_key)) - d_start
    top = d_rank < MAX_DETS[-1]
    d = {k: v[top] for k, v in d.items()}
    d_key, d_cat, d_img, d_rank = d_key[top], d_cat[top], d_img[top], d_rank[top]
    nd_all = len(d_key)
    d_area = d["bbox"][:, 2] * d["bbox"][:, 3]  # loadRes: area = w * h
    d_out_of_range = (d_area[:, None] < lo) | (d_area[:, None] > hi)  # (N, A)

    # Ground-truth ignore flags per area range.
    g_ignore = g["iscrowd"][:, None] | (g["area"][:, None] < lo) | (g["area"][:, None] > hi)  # (G, A)

    # Step 3: match, bucketing groups by their ground-truth count padded to a power of two.
    keys, d_first = np.unique(d_key, return_index=True)  # groups that have detections
    d_count = np.diff(np.append(d_first, nd_all))
    g_lo = np.searchsorted(g_key, keys, side="left")
    g_count = np.searchsorted(g_key, keys, side="right") - g_lo
    dtm = np.zeros((nd_all, A, T), dtype=bool)  # matched, as pycocotools reads dtMatches
    matched_ignored = np.zeros((nd_all, A, T), dtype=bool)
    gt_id_nonzero = g["id"] != 0  # dtMatches holds the gt *id*: a zero id reads as "unmatched"
    width = np.where(g_count > 0, 1 << np.ceil(np.log2(np.maximum(g_count, 1))).astype(np.int64), 0)
    for Gb in np.unique(width[width > 0]):
        groups = np.flatnonzero(width == Gb)
        groups = groups[np.argsort(-d_count[groups], kind="stable")]
        nb = len(groups)
        cols = np.arange(Gb)[::-1]  # reversed: see _match_bucket
        gt_valid = cols[None, :] < g_count[groups, None]  # (nb, Gb)
        gt_index = np.where(gt_valid, g_lo[groups, None] + cols[None, :], 0)  # (nb, Gb)
        counts = d_count[groups]
        det_offset = np.concatenate([[0], np.cumsum(counts)[:-1]])
        det_rows = np.repeat(d_first[groups] - det_offset, counts) + np.arange(counts.sum())
        det_group = np.repeat(np.arange(nb), counts)
        gidx = gt_index[det_group]  # (N_b, Gb)
        ious = _bbox_iou(d["bbox"][det_rows][:, None, :], g["bbox"][gidx], g["iscrowd"][gidx])
        dtm[det_rows], matched_ignored[det_rows] = _match_bucket(
            ious,
            det_offset,
            counts,
            gt_valid,
            g_ignore[gt_index].transpose(0, 2, 1),  # (nb, A, Gb)
            g["iscrowd"][gt_index],
            gt_id_nonzero[gt_index] & gt_valid,
            np.minimum(IOU_THRESHOLDS, 1 - 1e-10),
        )
    dt_ignore = matched_ignored | (~dtm & d_out_of_range[:, :, None])  # (N, A, T)
    return Matches(
        tp=dtm & ~dt_ignore,
        fp=~dtm & ~dt_ignore,
        cat=d_cat,
        img=d_img,
        rank=d_rank,
        score=d["score"],
        gt_img=g_img[g_order],
        gt_cat=g_cat,
        gt_ignore=g_ignore,
        img_ids=img_ids,
        cat_ids=cat_ids,
    )


def _mean_valid(s: np.ndarray) -> float:
    valid = s[s > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _summarize(
    precision: np.ndarray, recall: np.ndarray, ap: bool, iou: float | None, area: str, max_dets: int
) -> float:
    """COCOeval.summarize()._summarize: the mean over entries > -1 of one slice."""
    a, m = AREA_LABELS.index(area), MAX_DETS.index(max_dets)
    s = precision if ap else recall
    if iou is not None:
        s = s[np.flatnonzero(iou == IOU_THRESHOLDS)]
    s = s[..., a, m]
    return _mean_valid(s)
