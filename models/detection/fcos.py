"""A one-stage baseline: FCOS (Tian et al. 2019, "FCOS: Fully Convolutional One-Stage Object Detection")
on a light backbone (MobileNetV2 by default), sized to sit next to ThunderNet.

Anchor-free: every feature-map location (x, y) of level l (stride s_l) predicts class scores, its
distances (l, t, r, b) to the four sides of a box, and a "centerness" that down-weights boxes predicted
far from an object's centre. Read top to bottom:

1. Backbone: C4 (stride 16) and C5 (stride 32), models/detection/backbones.py.
2. Neck, a two-level FPN (Lin et al. 2017): P5 = 1x1(C5); P4 = 1x1(C4) + upsample(P5); each level that has a
   head (step 4) smoothed by a depthwise-separable 3x3. (FCOS uses P3-P7; these inputs are small, two levels
   suffice.)
3. Head, shared across levels (section 3.1, figure 2): a classification and a regression tower of
   depthwise-separable 3x3 convs with GroupNorm; class logits (C, prior 0.01), distances
   exp(scale_l * x) * s_l with a learnable scale per level, centerness from the regression tower.
4. Targets (sections 3.1-3.3): a location is positive for a box that contains it (and, with
   centre sampling, lies within radius * s_l of the box centre), when max(l, t, r, b) falls in the
   level's range (P4: (0, boundary], P5: (boundary, inf)); among several, the smallest box wins. The
   paper's ranges end each level at 8 strides (P3 64, P4 128, P5 256 px, section 3.2), so the default
   boundary is 8 * 16 = 128 px, and P4 also takes what P3 would (there is no P3 here). The levels follow the
   data: a level whose range starts at or beyond the largest training box side (`max_box_size`, filled from
   the training annotations) could never receive a positive, so it gets no head output and the level below
   takes the open range. On the built-in scenes (digits up to 60 px) that leaves P4 alone, P5 still feeding
   it through the top-down path. Moving the boundary down until P5 got positives instead cost more than half
   the AP50 of the default profile.
   centerness* = sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) (eq. 3).
5. Loss (eq. 2): sigmoid focal loss (Lin et al. 2017) over all locations / #positives; GIoU loss
   (Rezatofighi et al. 2019) on positives weighted by centerness*; BCE on centerness at positives.
6. Inference: per level the top `pre_nms_top_n` (location, class) pairs by class probability above
   `score_threshold`, score = sqrt(p_class * centerness) (as the FCOS code reports), class-wise NMS, the
   best `max_detections`. Output: models.detection.boxes.Detections, as ThunderNet's, and it exports to ONNX the
   same way: the whole batch at once (scores (B, locations, C), -inf where not selected, and
   models/detection/boxes.py's `multiclass_nms` op), so with a dynamic batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.detection.backbones import BACKBONES, build_backbone
from models.detection.boxes import Detections, clip_boxes, multiclass_nms, top_kept


@dataclass
class FCOSConfig:
    """The `one_stage:` section of params/detection.yaml."""

    num_classes: int = 10
    backbone: str = "mobilenet_v2"  # a models.detection.backbones.BACKBONES name
    input_size: int = 320
    neck_channels: int = 96  # a multiple of 8 (GroupNorm with 8 groups)
    head_convs: int = 2  # depthwise-separable convs per tower
    # max(l, t, r, b) up to this goes to P4 (stride 16), beyond to P5: 8 strides of P4 (section 3.2).
    level_boundary: float = 128.0
    center_sampling_radius: float = 1.5  # in strides; 0: any location inside the box
    # Largest side of a training box, derived from the data (tasks/detection/detectors.py); no max(l, t, r, b)
    # reaches it, so a level whose range starts there would only ever learn background.
    max_box_size: float = math.inf
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    score_threshold: float = 0.05
    pre_nms_top_n: int = 1000  # per level
    nms_iou: float = 0.6
    max_detections: int = 100

    def __post_init__(self) -> None:
        for name in ("num_classes", "input_size", "neck_channels", "head_convs", "pre_nms_top_n", "max_detections"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"one_stage.{name} must be an integer >= 1, got {v!r}")
        if self.input_size % 32:
            raise ValueError(f"one_stage.input_size must be a multiple of 32, got {self.input_size}")
        if self.neck_channels % 8:
            raise ValueError(f"one_stage.neck_channels must be a multiple of 8, got {self.neck_channels}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"one_stage.backbone must be one of {sorted(BACKBONES)}, got {self.backbone!r}")
        for name in ("level_boundary", "center_sampling_radius", "focal_gamma", "score_threshold"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                raise ValueError(f"one_stage.{name} must be a number >= 0, got {v!r}")
        for name in ("focal_alpha", "nms_iou"):
            v = getattr(self, name)
            if not _is_number(v) or not 0 < v <= 1:
                raise ValueError(f"one_stage.{name} must be in (0, 1], got {v!r}")
        v = self.max_box_size
        if not isinstance(v, int | float) or isinstance(v, bool) or math.isnan(v) or v <= 0:
            raise ValueError(f"one_stage.max_box_size must be a number > 0 (inf: no limit), got {v!r}")

    @property
    def num_levels(self) -> int:
        """P4 alone when no training box reaches beyond P4's range, else P4 and P5."""
        return 2 if self.max_box_size > self.level_boundary else 1


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _sep_conv(c_in: int, c_out: int, norm: bool = True) -> nn.Sequential:
    """Depthwise 3x3 then pointwise 1x1 (+ GroupNorm + ReLU)."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in), nn.Conv2d(c_in, c_out, 1)]
    if norm:
        layers += [nn.GroupNorm(8, c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    def __init__(self, channels: int, num_classes: int, convs: int, num_levels: int):
        super().__init__()
        self.cls_tower = nn.Sequential(*[_sep_conv(channels, channels) for _ in range(convs)])
        self.reg_tower = nn.Sequential(*[_sep_conv(channels, channels) for _ in range(convs)])
        self.cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.reg = nn.Conv2d(channels, 4, 3, padding=1)
        self.ctr = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels))
        for conv in (self.cls, self.reg, self.ctr):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls.bias, -math.log((1 - 0.01) / 0.01))  # prior p = 0.01 (RetinaNet)

    def forward(self, x: Tensor, level: int, stride: int) -> tuple[Tensor, Tensor, Tensor]:
        B = x.shape[0]
        c, r = self.cls_tower(x), self.reg_tower(x)
        logits = self.cls(c).permute(0, 2, 3, 1).reshape(B, -1, self.cls.out_channels)  # (B, H W, C)
        ltrb = torch.exp((self.scales[level] * self.reg(r)).clamp(max=10.0)) * stride  # (B, 4, H, W) pixels
        ctr = self.ctr(r).reshape(B, -1)  # (B, H W)
        return logits, ltrb.permute(0, 2, 3, 1).reshape(B, -1, 4), ctr


def locations(height: int, width: int, stride: int, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """Centres (H W, 2) of the stride cells, row-major, in input pixels."""
    ys = (torch.arange(height, dtype=dtype, device=device) + 0.5) * stride
    xs = (torch.arange(width, dtype=dtype, device=device) + 0.5) * stride
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


STRIDES = (16, 32)  # P4, P5: the backbones' C4 and C5 (models/detection/backbones.py)


def assign_targets(
    points: list[Tensor],
    strides: Sequence[int],
    level_boundary: float,
    gt: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    center_sampling_radius: float,
) -> tuple[Tensor, Tensor]:
    """Step 4 for one image: class targets (N,) (num_classes = background) and matched boxes (N, 4), over
    the locations of every level built (`points`, P4 then P5 when there is one, each (n_l, 2)). Level ranges:
    P4 (0, boundary], P5 (boundary, inf); the last level built takes everything above its start."""
    pts = torch.cat(points)  # (N, 2)
    stride = torch.cat(
        [torch.full((len(p),), float(s), dtype=pts.dtype, device=pts.device) for p, s in zip(points, strides)]
    )  # (N,)
    starts = (0.0, level_boundary)[: len(points)]
    ends = (*starts[1:], math.inf)
    lo = torch.cat([torch.full((len(p),), a) for p, a in zip(points, starts)]).to(pts)  # (N,)
    hi = torch.cat([torch.full((len(p),), b) for p, b in zip(points, ends)]).to(pts)
    if len(gt) == 0:
        background = torch.full((len(pts),), num_classes, dtype=torch.long, device=pts.device)
        return background, pts.new_zeros(len(pts), 4)
    x, y = pts[:, 0:1], pts[:, 1:2]  # (N, 1)
    ltrb = torch.stack([x - gt[:, 0], y - gt[:, 1], gt[:, 2] - x, gt[:, 3] - y], dim=-1)  # (N, G, 4)
    inside = ltrb.min(dim=-1).values > 0  # (N, G)
    if center_sampling_radius > 0:
        cx, cy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2  # (G,)
        r = center_sampling_radius * stride[:, None]  # (N, 1)
        inside &= ((x - cx).abs() < r) & ((y - cy).abs() < r)
    reach = ltrb.max(dim=-1).values  # (N, G)
    fits = inside & (reach > lo[:, None]) & (reach <= hi[:, None])
    area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[None, :].expand_as(fits)
    area = torch.where(fits, area, torch.full_like(area, math.inf))
    best_area, best = area.min(dim=1)  # (N,)
    labels = torch.where(torch.isfinite(best_area), gt_labels[best], torch.full_like(best, num_classes))
    return labels, gt[best]


def giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """1 - GIoU of xyxy boxes (N, 4), elementwise (N,)."""
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    wh = (torch.minimum(pred[:, 2:], target[:, 2:]) - torch.maximum(pred[:, :2], target[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area_p + area_t - inter
    hull = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).clamp(min=0)
    hull_area = hull[:, 0] * hull[:, 1]
    eps = torch.finfo(pred.dtype).eps
    return 1 - (inter / (union + eps) - (hull_area - union) / (hull_area + eps))


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Summed focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log p_t (Lin et al. 2017, eq. 5)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * ce).sum()


class FCOS(nn.Module):
    def __init__(self, config: FCOSConfig):
        super().__init__()
        self.config = cfg = config
        self.backbone = build_backbone(cfg.backbone)
        d = cfg.neck_channels
        self.lat4 = nn.Conv2d(self.backbone.out_channels["C4"], d, 1)
        self.lat5 = nn.Conv2d(self.backbone.out_channels["C5"], d, 1)
        self.smooth4 = _sep_conv(d, d)
        # P5 only feeds P4 top-down when it has no range of its own (cfg.num_levels == 1).
        self.smooth5 = _sep_conv(d, d) if cfg.num_levels == 2 else None
        self.head = FCOSHead(d, cfg.num_classes, cfg.head_convs, num_levels=cfg.num_levels)
        self.strides = (self.backbone.strides["C4"], self.backbone.strides["C5"])[: cfg.num_levels]

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None) -> dict[str, Tensor] | Detections:
        B, _, H, W = images.shape
        c4, c5 = self.backbone(images)
        p5 = self.lat5(c5)  # (B, d, H/32, W/32)
        p4 = self.lat4(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")  # (B, d, H/16, W/16)
        levels = [self.smooth4(p4)] + ([self.smooth5(p5)] if self.smooth5 is not None else [])
        outs = [self.head(f, i, s) for i, (f, s) in enumerate(zip(levels, self.strides))]
        points = [locations(f.shape[2], f.shape[3], s, f.dtype, f.device) for f, s in zip(levels, self.strides)]
        if targets is None:
            return self.detect(outs, points, (H, W))
        return self.loss(outs, points, targets)

    # ------------------------------------------------------------------------------------------------ training

    def assign(self, points: list[Tensor], gt: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor]:
        """Step 4 for one image: class targets (N,) (num_classes = background) and matched boxes (N, 4)."""
        cfg = self.config
        return assign_targets(
            points, self.strides, cfg.level_boundary, gt, gt_labels, cfg.num_classes, cfg.center_sampling_radius
        )

    def loss(
        self, outs: list[tuple[Tensor, Tensor, Tensor]], points: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        cfg = self.config
        logits = torch.cat([o[0] for o in outs], dim=1)  # (B, N, C)
        ltrb = torch.cat([o[1] for o in outs], dim=1)  # (B, N, 4)
        ctr = torch.cat([o[2] for o in outs], dim=1)  # (B, N)
        pts = torch.cat(points)  # (N, 2)
        assigned = [self.assign(points, t["boxes"].to(pts), t["labels"]) for t in targets]
        labels = torch.stack([a[0] for a in assigned])  # (B, N)
        boxes = torch.stack([a[1] for a in assigned])  # (B, N, 4)
        onehot = F.one_hot(labels, cfg.num_classes + 1)[..., : cfg.num_classes].to(logits)  # background: zeros
        pos = labels < cfg.num_classes  # (B, N)
        n_pos = max(int(pos.sum()), 1)
        cls = sigmoid_focal_loss(logits, onehot, cfg.focal_alpha, cfg.focal_gamma) / n_pos
        b_idx, n_idx = torch.nonzero(pos, as_tuple=True)
        p = pts[n_idx]  # (P, 2)
        pred = torch.cat([p - ltrb[b_idx, n_idx, :2], p + ltrb[b_idx, n_idx, 2:]], dim=-1)  # (P, 4)
        gt = boxes[b_idx, n_idx]
        l, t, r, b = (p[:, 0] - gt[:, 0]), (p[:, 1] - gt[:, 1]), (gt[:, 2] - p[:, 0]), (gt[:, 3] - p[:, 1])
        centerness = torch.sqrt(  # eq. 3
            (torch.minimum(l, r) / torch.maximum(l, r)) * (torch.minimum(t, b) / torch.maximum(t, b))
        )
        box = (giou_loss(pred, gt) * centerness).sum() / centerness.sum().clamp(min=1e-6)
        ctr_loss = F.binary_cross_entropy_with_logits(ctr[b_idx, n_idx], centerness, reduction="sum") / n_pos
        return {"cls": cls, "box": box, "centerness": ctr_loss}

    # ------------------------------------------------------------------------------------------------ inference

    def detect(
        self, outs: list[tuple[Tensor, Tensor, Tensor]], points: list[Tensor], size: tuple[int, int]
    ) -> Detections:
        """Step 6 for the whole batch at once (no loop over images, so the ONNX export keeps a dynamic
        batch): every location's box, its (location, class) scores where selected, -inf elsewhere."""
        cfg = self.config
        C = cfg.num_classes
        B = outs[0][0].shape[0]
        boxes_l, scores_l = [], []
        for (logits, ltrb, ctr), pts in zip(outs, points):  # levels
            prob = torch.sigmoid(logits).reshape(B, -1)  # (B, H W C), location-major
            # Top-k then threshold selects what threshold then top-k would, with a static k.
            _, idx = prob.topk(min(cfg.pre_nms_top_n, prob.shape[1]), dim=1)  # (B, k)
            chosen = torch.zeros_like(prob, dtype=torch.bool).scatter(1, idx, True) & (prob > cfg.score_threshold)
            score = torch.sqrt(prob.reshape(B, -1, C) * torch.sigmoid(ctr)[:, :, None])  # (B, H W, C)
            scores_l.append(torch.where(chosen.reshape(B, -1, C), score, -math.inf))
            boxes_l.append(clip_boxes(torch.cat([pts - ltrb[..., :2], pts + ltrb[..., 2:]], dim=-1), size))
        boxes, scores = torch.cat(boxes_l, dim=1), torch.cat(scores_l, dim=1)  # (B, L, 4), (B, L, C): L locations
        L = boxes.shape[1]
        # Class-wise, at most max_detections per class: no class can place more in the image's best max_detections.
        keep = multiclass_nms(boxes, scores.transpose(1, 2), cfg.nms_iou, -math.inf, cfg.max_detections)  # (B, C, L)
        scores = scores.reshape(B, L * C)  # location-major
        order, kept = top_kept(scores, keep.transpose(1, 2).reshape(B, L * C), min(cfg.max_detections, L * C))
        boxes = torch.gather(boxes, 1, (order // C)[:, :, None].expand(-1, -1, 4))  # (B, D, 4)
        return Detections.from_padded(boxes, torch.gather(scores, 1, order), order % C, kept)
