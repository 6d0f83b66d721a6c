"""Box utilities for the detectors, in torch: formats, IoU, the Faster R-CNN box coder, clipping, and NMS.

Boxes are (..., 4) float tensors. `xyxy` = (x1, y1, x2, y2) in continuous pixel coordinates, width
x2 - x1 (no "+1"); `xywh` = (x, y, w, h) as in COCO JSON.

NMS comes three ways, held equal by tests/unit/test_boxes_roi.py:
- `nms_reference`: the greedy algorithm as written in papers, a Python loop over Python floats;
- `nms_torch`: the same greedy sweep by blocks of boxes in score order, each block's IoUs in torch against
  the boxes kept so far and against itself, ending early once `max_output` boxes are kept;
- `nms`: a `torch.library` custom op (`torch.ops.kiln.nms`) whose eager kernel is `nms_torch`, with a fake
  kernel whose output length is a fresh dynamic size, so `torch.export` traces through it, and an
  onnxscript translation that emits ONNX `NonMaxSuppression`. Export a model that calls it with
      torch.onnx.export(model, args, dynamo=True, custom_translation_table=ONNX_TRANSLATION_TABLE)
`batched_nms` runs per-class (or per-image) NMS in one call of `nms` with the offset trick: boxes of
group g are shifted by g * (coordinate span + 1), so boxes of different groups never overlap.
`multiclass_nms` is ONNX `NonMaxSuppression` itself, batches and classes included, as a custom op on
padded tensors that returns a keep mask: what the detectors' batched inference calls. A batch costs
what its images cost one by one (no offsets, whose float32 rounding grows with the batch), and only the
final selection of a model has a data-dependent size.

All of them suppress a box whose IoU with a kept, higher-scoring box is > iou_threshold (strictly, as
torchvision and ONNX do), visit equal scores in index order and return kept indices by decreasing score
(`multiclass_nms`: the kept set, as a mask; `top_kept` orders it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from onnxscript import opset18 as op
from torch import Tensor

# The clamp on dw, dh before exp (Detectron's and torchvision's): no box grows past 1000/16 times its anchor.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class Detections(NamedTuple):
    """What the detectors' inference returns for a batch, flat so it exports to ONNX: detection k is
    `boxes[k]` (xyxy, input pixels) with `scores[k]` and class `labels[k]` (0 .. num_classes - 1) in image
    `image_index[k]`; within an image, by decreasing score."""

    boxes: Tensor  # (K, 4)
    scores: Tensor  # (K,)
    labels: Tensor  # (K,) int64
    image_index: Tensor  # (K,) int64

    @classmethod
    def from_padded(cls, boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor) -> Detections:
        """Per-image rows, (B, D, 4) boxes and (B, D) scores, labels and validity, each row by decreasing
        score with its padding last -> the flat form, image by image."""
        image, k = torch.nonzero(valid, as_tuple=True)  # image-major: each image's rows in order
        return cls(boxes[image, k], scores[image, k], labels[image, k], image)

    def per_image(self, batch_size: int) -> list[dict[str, Tensor]]:
        return [
            {"boxes": self.boxes[m], "scores": self.scores[m], "labels": self.labels[m]}
            for m in (self.image_index == b for b in range(batch_size))
        ]


def top_kept(scores: Tensor, keep: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row of scores (B, M): the indices (B, k) of the best k entries where keep (B, M) holds, by
    decreasing score (ties by index), then the others; and whether each is a kept one (B, k). This is
    "NMS then the first k" for every image at once, with a static k."""
    order = torch.where(keep, scores, -math.inf).sort(dim=1, descending=True, stable=True).indices[:, :k]
    return order, torch.gather(keep, 1, order)


# ----------------------------------------------------------------------------------------------------
# Formats, areas, IoU


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix (N, M) of xyxy boxes a (N, 4) and b (M, 4); 0 where the union is empty."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(a.dtype).tiny), torch.zeros_like(inter))


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip xyxy boxes (..., 4) to an image of (height, width)."""
    h, w = size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1.clamp(0, w), y1.clamp(0, h), x2.clamp(0, w), y2.clamp(0, h)], dim=-1)


# ----------------------------------------------------------------------------------------------------
# Box coder (Girshick et al. 2014, R-CNN appendix C; Ren et al. 2015, Faster R-CNN eq. 2)
#   tx = wx (x - xa) / wa,  ty = wy (y - ya) / ha,  tw = ww log(w / wa),  th = wh log(h / ha)
# with (x, y) box centres; the weights (wx, wy, ww, wh) scale the targets to unit-ish variance.


def encode_boxes(
    reference: Tensor, target: Tensor, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
) -> Tensor:
    """Deltas (..., 4) that take `reference` boxes (anchors, proposals) to `target` boxes, both xyxy."""
    wx, wy, ww, wh = weights
    rw, rh = reference[..., 2] - reference[..., 0], reference[..., 3] - reference[..., 1]
    rx, ry = reference[..., 0] + 0.5 * rw, reference[..., 1] + 0.5 * rh
    tw, th = target[..., 2] - target[..., 0], target[..., 3] - target[..., 1]
    tx, ty = target[..., 0] + 0.5 * tw, target[..., 1] + 0.5 * th
    return torch.stack(
        [wx * (tx - rx) / rw, wy * (ty - ry) / rh, ww * torch.log(tw / rw), wh * torch.log(th / rh)], dim=-1
    )


def decode_boxes(
    deltas: Tensor,
    reference: Tensor,
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    clamp: float = BBOX_XFORM_CLIP,
) -> Tensor:
    """Inverse of `encode_boxes`: boxes (..., 4) xyxy; `reference` broadcasts against `deltas`
    (e.g. proposals (R, 1, 4) with per-class deltas (R, C, 4)). dw, dh are clamped at `clamp`."""
    wx, wy, ww, wh = weights
    rw, rh = reference[..., 2] - reference[..., 0], reference[..., 3] - reference[..., 1]
    rx, ry = reference[..., 0] + 0.5 * rw, reference[..., 1] + 0.5 * rh
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw, dh = (deltas[..., 2] / ww).clamp(max=clamp), (deltas[..., 3] / wh).clamp(max=clamp)
    cx, cy = dx * rw + rx, dy * rh + ry
    w, h = torch.exp(dw) * rw, torch.exp(dh) * rh
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


# ----------------------------------------------------------------------------------------------------
# NMS: the reference loop


def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float, max_output: int | None = None) -> Tensor:
    """Greedy NMS, literally: take the best remaining box, drop every box overlapping it by > threshold; stop
    after `max_output` kept boxes (ONNX's max_output_boxes_per_class; None: no limit)."""
    b = boxes.tolist()
    remaining = sorted(range(len(b)), key=lambda i: -float(scores[i]))  # stable: ties in index order
    keep = []
    while remaining and (max_output is None or len(keep) < max_output):
        best = remaining.pop(0)
        keep.append(best)
        x1, y1, x2, y2 = b[best]
        survivors = []
        for j in remaining:
            u1, v1, u2, v2 = b[j]
            iw, ih = max(min(x2, u2) - max(x1, u1), 0.0), max(min(y2, v2) - max(y1, v1), 0.0)
            inter = iw * ih
            union = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - inter
            if not (union > 0 and inter / union > iou_threshold):
                survivors.append(j)
        remaining = survivors
    return torch.tensor(keep, dtype=torch.long)


def batched_nms_reference(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each group separately, merged by decreasing score (ties by index)."""
    keep = [
        torch.nonzero(groups == g).flatten()[nms_reference(boxes[groups == g], scores[groups == g], iou_threshold)]
        for g in torch.unique(groups).tolist()
    ]
    keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
    order = sorted(range(len(keep)), key=lambda i: (-float(scores[keep[i]]), int(keep[i])))
    return keep[torch.tensor(order, dtype=torch.long)]


# ----------------------------------------------------------------------------------------------------
# NMS: the fast path

# Boxes visited at once, in score order. A block is first tested against the boxes kept so far (K x 128 IoUs),
# then swept against itself (128 x 128), so the work is about N x (K + 128) IoUs rather than the N x N matrix:
# an RPN keeps ~60 % of its 1,000 proposals, and with `max_output` (its 200 post-NMS proposals) the sweep ends
# after ~300 boxes. On 1,000 proposals of the default ThunderNet, 128 was the fastest of 32 / 64 / 128 at that
# limit: 1.8 ms per image, against 14.4 ms for the whole N x N matrix.
_NMS_BLOCK = 128


def nms_torch(boxes: Tensor, scores: Tensor, iou_threshold: float, max_output: int | None = None) -> Tensor:
    """Greedy NMS by blocks of boxes sorted by score: a box survives unless a kept box before it overlaps it by
    > threshold, which the block's IoUs with the kept boxes and then its own "overlaps too much" matrix decide.
    Stops after `max_output` kept boxes (None: no limit). Returns kept indices (K,) by decreasing score, the
    same as `nms_reference`."""
    n = boxes.shape[0]
    if n == 0 or max_output == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    kept: list[int] = []  # positions in score order
    for lo in range(0, n, _NMS_BLOCK):
        block = b[lo : lo + _NMS_BLOCK]  # (m, 4)
        if kept:
            by_kept = (box_iou(block, b[torch.as_tensor(kept, device=b.device)]) > iou_threshold).any(dim=1)
            alive = (~by_kept).cpu().numpy()  # (m,) not suppressed by an earlier block
        else:
            alive = np.ones(len(block), dtype=bool)
        over = (box_iou(block, block) > iou_threshold).cpu().numpy()  # (m, m) bool
        for i in range(len(block)):
            if alive[i]:
                kept.append(lo + i)
                if len(kept) == max_output:
                    return order[torch.as_tensor(kept, dtype=torch.long, device=boxes.device)]
                alive[i + 1 :] &= ~over[i, i + 1 :]
    return order[torch.as_tensor(kept, dtype=torch.long, device=boxes.device)]


# ----------------------------------------------------------------------------------------------------
# NMS: the custom op, its fake kernel and its ONNX translation


@torch.library.custom_op("kiln::nms", mutates_args=())
def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """boxes (N, 4) xyxy, scores (N,) -> kept indices (K,) int64 by decreasing score."""
    return nms_torch(boxes, scores, iou_threshold)


@nms.register_fake
def _nms_fake(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    k = torch.library.get_ctx().new_dynamic_size()  # data-dependent: K unknown until run time
    return boxes.new_empty((k,), dtype=torch.long)


def _nms_onnx(boxes, scores, iou_threshold: float):
    """ONNX NonMaxSuppression on one batch and one class: boxes (1, N, 4), scores (1, 1, N); it returns
    (K, 3) rows (batch, class, box) in decreasing score order; keep the box column."""
    selected = op.NonMaxSuppression(
        op.Unsqueeze(boxes, [0]),
        op.Unsqueeze(scores, [0, 1]),
        op.Shape(scores),  # max_output_boxes_per_class: all of them
        op.Constant(value_floats=[iou_threshold]),
    )
    return op.Squeeze(op.Gather(selected, op.Constant(value_ints=[2]), axis=1), [1])


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within groups (classes, images) in one `nms` call: group g is shifted by g * (span + 1)."""
    coords = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)])  # never empty, so export-safe
    span = coords.max() - coords.min() + 1
    shifted = boxes + (groups.to(boxes.dtype) * span)[:, None]  # (N, 4)
    return nms(shifted, scores, iou_threshold)


@torch.library.custom_op("kiln::multiclass_nms", mutates_args=())
def multiclass_nms(
    boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float, max_output: int = -1
) -> Tensor:
    """ONNX NonMaxSuppression on padded tensors: boxes (N, M, 4) xyxy, scores (N, K, M) -> keep (N, K, M)
    bool. For each batch n and class k, greedy NMS (as `nms`) among the boxes m of batch n whose
    scores[n, k, m] > score_threshold; the others are never kept and suppress nothing. At most `max_output`
    boxes per batch and class are kept, the best (ONNX's max_output_boxes_per_class; -1: no limit): a
    detector that keeps only its best P boxes passes P, and NMS stops there."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    candidate = scores > score_threshold  # (N, K, M)
    limit = None if max_output < 0 else max_output
    for n, k in torch.nonzero(candidate.any(dim=2)).tolist():  # the non-empty (batch, class) pairs
        idx = torch.nonzero(candidate[n, k]).flatten()
        keep[n, k, idx[nms_torch(boxes[n, idx], scores[n, k, idx], iou_threshold, limit)]] = True
    return keep


@multiclass_nms.register_fake
def _multiclass_nms_fake(
    boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float, max_output: int = -1
) -> Tensor:
    return torch.empty_like(scores, dtype=torch.bool)  # a static shape: the mask, not the kept count


def _multiclass_nms_onnx(boxes, scores, iou_threshold: float, score_threshold: float, max_output: int = -1):
    """NonMaxSuppression returns (S, 3) rows (batch, class, box): scatter ones there into a zero mask."""
    selected = op.NonMaxSuppression(
        boxes,
        scores,
        # max_output_boxes_per_class; -1 (no limit): all M boxes
        op.Shape(boxes, start=1, end=2) if max_output < 0 else op.Constant(value_ints=[max_output]),
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[score_threshold]),
    )
    zeros = op.Expand(op.Constant(value_int=0), op.Shape(scores))  # (N, K, M) int64
    ones = op.Expand(op.Constant(value_int=1), op.Shape(selected, start=0, end=1))  # (S,)
    return op.Cast(op.ScatterND(zeros, selected, ones), to=9)  # 9: BOOL


def _sort_stable_onnx(self, stable: bool | None = None, dim: int = -1, descending: bool = False):
    """`torch.sort(..., stable=True)`, which the exporter does not translate: ONNX TopK over the whole axis
    is one, as it puts equal values in index order (TopK spec, opset 11 on), for either direction."""
    n = op.Gather(op.Shape(self), op.Constant(value_ints=[dim]))  # (1,)
    return op.TopK(self, n, axis=dim, largest=int(descending), sorted=1)


ONNX_TRANSLATION_TABLE = {
    torch.ops.kiln.nms.default: _nms_onnx,
    torch.ops.kiln.multiclass_nms.default: _multiclass_nms_onnx,
    torch.ops.aten.sort.stable: _sort_stable_onnx,
}
