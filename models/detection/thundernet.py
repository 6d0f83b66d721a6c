"""ThunderNet (Qin et al. 2019, "ThunderNet: Towards Real-time Generic Object Detection on Mobile Devices").

A two-stage detector built for small inputs (320 x 320) and light compute, read top to bottom:

1. Backbone SNet (section 3.1; models/detection/backbones.py): C4 (stride 16) and C5 (stride 32).
2. Context Enhancement Module (section 3.2, figure 3): three scales merged on the stride-16 grid,
       F_CEM = conv1x1(C4) + upsample2x(conv1x1(C5)) + broadcast(conv1x1(globalavgpool(C5)))
   with alpha * p * p channels (245 = 5 * 7 * 7 in the paper): the position-sensitive score map.
3. Light RPN (section 3.3): 5x5 depthwise + 1x1 convolution (256 channels), then objectness and box
   deltas for anchors of several scales and aspect ratios (paper: 32^2..512^2 and 1:2, 3:4, 1:1, 4:3, 2:1).
4. Spatial Attention Module (section 3.4, eq. 1): the RPN features, which know foreground from
   background, re-weight the CEM map:  F_SAM = F_CEM * sigmoid(BN(conv1x1(F_RPN))).
5. Proposals: decode the RPN deltas at the top-scoring anchors, clip, drop tiny boxes, NMS, keep the
   best `post_nms` (paper: 200 at test time).
6. PS RoI align on F_SAM (models/detection/roi.py): alpha x p x p features per RoI.
7. Light R-CNN head (section 3.3): one fully connected layer (1024-d), then class scores (C + 1, with
   background) and class-specific box deltas.
Training: anchors and RoIs are labelled by IoU and sampled with a foreground fraction (Faster R-CNN,
Ren et al. 2015); losses are binary cross-entropy and smooth L1 for the RPN, cross-entropy and smooth L1
for the R-CNN. Inference: per-class decoding, score threshold, class-wise NMS, the best
`max_detections`. It runs the whole batch at once (proposals padded to (B, post, 4) with a validity mask,
per-image top-k as sorts along a row, models/detection/boxes.py's `multiclass_nms` op per image and class), so it
exports to ONNX with a fixed input size and a dynamic batch.

Images come in normalised (B, 3, H, W), H and W multiples of 32. Targets: one dict per image, "boxes"
(n, 4) xyxy in input pixels, positive sizes, and "labels" (n,) int64 in 0 .. num_classes - 1.
`forward(images, targets)` returns the losses (sum them to train); `forward(images)` returns Detections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.detection.backbones import BACKBONES, build_backbone
from models.detection.boxes import Detections, box_iou, clip_boxes, decode_boxes, encode_boxes, multiclass_nms, top_kept
from models.detection.roi import ps_roi_align

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class ThunderNetConfig:
    """The `thundernet:` section of params/detection.yaml."""

    num_classes: int = 10  # foreground classes
    backbone: str = "snet146"  # a models.detection.backbones.BACKBONES name (the paper's: snet49, snet146, snet535)
    input_size: int = 320  # square input, a multiple of 32
    # CEM / PS RoI align: alpha * p * p channels (paper: 5 * 7 * 7 = 245)
    ps_alpha: int = 5
    ps_size: int = 7  # p
    sampling_ratio: int = 2  # bilinear samples per bin side
    # Light RPN
    rpn_channels: int = 256
    rpn_kernel: int = 5
    anchor_sizes: list[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])  # sqrt(area)
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 4.0 / 3.0, 2.0])  # h / w
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_train: int = 6000
    rpn_post_nms_train: int = 1000
    rpn_pre_nms_test: int = 3000
    rpn_post_nms_test: int = 200
    rpn_nms_iou: float = 0.7
    rpn_min_size: float = 1.0  # proposals narrower or shorter than this (pixels) are dropped
    # R-CNN
    head_dim: int = 1024
    rcnn_batch_per_image: int = 512
    rcnn_positive_fraction: float = 0.25
    rcnn_fg_iou: float = 0.5  # RoIs at or above: foreground; below: background
    box_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])  # R-CNN box coder
    # Inference
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections: int = 100

    def __post_init__(self) -> None:
        positive_ints = (
            "num_classes",
            "input_size",
            "ps_alpha",
            "ps_size",
            "sampling_ratio",
            "rpn_channels",
            "rpn_kernel",
            "rpn_batch_per_image",
            "rpn_pre_nms_train",
            "rpn_post_nms_train",
            "rpn_pre_nms_test",
            "rpn_post_nms_test",
            "head_dim",
            "rcnn_batch_per_image",
            "max_detections",
        )
        for name in positive_ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"thundernet.{name} must be an integer >= 1, got {v!r}")
        if self.input_size % 32:
            raise ValueError(f"thundernet.input_size must be a multiple of 32, got {self.input_size}")
        if self.rpn_kernel % 2 == 0:
            raise ValueError(f"thundernet.rpn_kernel must be odd, got {self.rpn_kernel}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"thundernet.backbone must be one of {sorted(BACKBONES)}, got {self.backbone!r}")
        for name in ("anchor_sizes", "anchor_ratios"):
            v = getattr(self, name)
            if not isinstance(v, list) or not v or not all(_is_number(x) and x > 0 for x in v):
                raise ValueError(f"thundernet.{name} must be a non-empty list of positive numbers, got {v!r}")
        if not (
            isinstance(self.box_weights, list)
            and len(self.box_weights) == 4
            and all(_is_number(x) and x > 0 for x in self.box_weights)
        ):
            raise ValueError(f"thundernet.box_weights must be 4 positive numbers, got {self.box_weights!r}")
        for name in (
            "rpn_fg_iou",
            "rpn_bg_iou",
            "rcnn_fg_iou",
            "rpn_nms_iou",
            "nms_iou",
            "rpn_positive_fraction",
            "rcnn_positive_fraction",
        ):
            v = getattr(self, name)
            if not _is_number(v) or not 0 < v <= 1:
                raise ValueError(f"thundernet.{name} must be in (0, 1], got {v!r}")
        if self.rpn_bg_iou > self.rpn_fg_iou:
            raise ValueError(
                f"thundernet.rpn_bg_iou ({self.rpn_bg_iou}) must not exceed rpn_fg_iou ({self.rpn_fg_iou})"
            )
        for name in ("score_threshold", "rpn_min_size"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                raise ValueError(f"thundernet.{name} must be a number >= 0, got {v!r}")

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# ----------------------------------------------------------------------------------------------------
# Modules


class ContextEnhancementModule(nn.Module):
    """CEM (figure 3): C4, upsampled C5 and the global C5 vector, each by a 1x1 conv, summed."""

    def __init__(self, c4: int, c5: int, out: int):
        super().__init__()
        self.lat4 = nn.Conv2d(c4, out, 1)
        self.lat5 = nn.Conv2d(c5, out, 1)
        self.glb = nn.Conv2d(c5, out, 1)

    def forward(self, c4: Tensor, c5: Tensor) -> Tensor:
        x4 = self.lat4(c4)  # (B, out, H/16, W/16)
        x5 = F.interpolate(self.lat5(c5), size=c4.shape[-2:], mode="nearest")  # (B, out, H/16, W/16)
        glb = self.glb(c5.mean(dim=(2, 3), keepdim=True))  # (B, out, 1, 1), broadcast
        return x4 + x5 + glb


class LightRPN(nn.Module):
    """5x5 depthwise + 1x1 convolution, then per-anchor objectness (A) and deltas (4A)."""

    def __init__(self, c_in: int, channels: int, num_anchors: int, kernel: int = 5):
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, kernel, padding=kernel // 2, groups=c_in)
        self.pw = nn.Conv2d(c_in, channels, 1)
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.deltas = nn.Conv2d(channels, 4 * num_anchors, 1)
        for conv in (self.objectness, self.deltas):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feat = F.relu(self.pw(self.dw(x)))  # (B, channels, H, W)
        B, _, H, W = feat.shape
        obj = self.objectness(feat).permute(0, 2, 3, 1).reshape(B, -1)  # (B, H W A): location-major
        deltas = self.deltas(feat).reshape(B, -1, 4, H, W).permute(0, 3, 4, 1, 2).reshape(B, -1, 4)  # (B, H W A, 4)
        return feat, obj, deltas


class SpatialAttentionModule(nn.Module):
    """SAM (eq. 1): F_SAM = F_CEM * sigmoid(BN(conv1x1(F_RPN)))."""

    def __init__(self, rpn_channels: int, out: int):
        super().__init__()
        self.conv = nn.Conv2d(rpn_channels, out, 1, bias=False)
        self.bn = nn.BatchNorm2d(out)

    def forward(self, cem: Tensor, rpn_feat: Tensor) -> Tensor:
        return cem * torch.sigmoid(self.bn(self.conv(rpn_feat)))  # (B, out, H, W)


class LightRCNNHead(nn.Module):
    """PS RoI align features (R, alpha, p, p) -> one fc layer -> class logits (C + 1) and deltas (C, 4)."""

    def __init__(self, in_features: int, head_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, head_dim)
        self.cls = nn.Linear(head_dim, num_classes + 1)
        self.box = nn.Linear(head_dim, 4 * num_classes)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.normal_(self.box.weight, std=0.001)
        nn.init.zeros_(self.cls.bias)
        nn.init.zeros_(self.box.bias)

    def forward(self, roi_feats: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.fc(roi_feats.flatten(1)))  # (R, head_dim)
        return self.cls(h), self.box(h).reshape(h.shape[0], -1, 4)  # (R, C + 1), (R, C, 4)


# ----------------------------------------------------------------------------------------------------
# Anchors, labelling, sampling


def make_anchors(
    sizes: list[float],
    ratios: list[float],
    stride: int,
    height: int,
    width: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """Anchors (H W A, 4) xyxy, location-major, centred on the stride cells; ratio = h / w, area = size^2."""
    s = torch.tensor(sizes, dtype=dtype, device=device)
    r = torch.tensor(ratios, dtype=dtype, device=device)
    hs = (s[None, :] * r.sqrt()[:, None]).reshape(-1)  # (A,) ratio-major
    ws = (s[None, :] / r.sqrt()[:, None]).reshape(-1)
    base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # (A, 4)
    cx = (torch.arange(width, dtype=dtype, device=device) + 0.5) * stride
    cy = (torch.arange(height, dtype=dtype, device=device) + 0.5) * stride
    yy, xx = torch.meshgrid(cy, cx, indexing="ij")
    centres = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)  # (H W, 1, 4)
    return (centres + base[None]).reshape(-1, 4)


def label_by_iou(iou: Tensor, fg: float, bg: float, allow_low_quality: bool) -> tuple[Tensor, Tensor]:
    """iou (G, N) ground truths x candidates -> (labels (N,): 1 fg, 0 bg, -1 ignore; matched gt (N,)).
    With `allow_low_quality`, each ground truth's best candidates are foreground too (Faster R-CNN's RPN
    rule, so that every object has an anchor)."""
    best, matched = iou.max(dim=0)  # (N,)
    labels = torch.full_like(matched, -1)
    labels[best < bg] = 0
    labels[best >= fg] = 1
    if allow_low_quality:
        per_gt = iou.max(dim=1, keepdim=True).values  # (G, 1)
        is_best = ((iou == per_gt) & (per_gt > 0)).any(dim=0)
        labels[is_best] = 1
    return labels, matched


def sample_balanced(labels: Tensor, batch: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Random foreground (labels >= 1) and background (== 0) indices: at most batch * fraction
    foreground, background filling the rest of the batch."""
    pos = torch.nonzero(labels >= 1).flatten()
    neg = torch.nonzero(labels == 0).flatten()
    n_pos = min(len(pos), int(batch * positive_fraction))
    n_neg = min(len(neg), batch - n_pos)
    pos = pos[torch.randperm(len(pos), device=labels.device)[:n_pos]]
    neg = neg[torch.randperm(len(neg), device=labels.device)[:n_neg]]
    return pos, neg


# ----------------------------------------------------------------------------------------------------
# ThunderNet


class ThunderNet(nn.Module):
    def __init__(self, config: ThunderNetConfig):
        super().__init__()
        self.config = cfg = config
        self.backbone = build_backbone(cfg.backbone)
        ps_channels = cfg.ps_alpha * cfg.ps_size**2
        c4, c5 = self.backbone.out_channels["C4"], self.backbone.out_channels["C5"]
        self.cem = ContextEnhancementModule(c4, c5, ps_channels)
        self.rpn = LightRPN(ps_channels, cfg.rpn_channels, cfg.num_anchors, cfg.rpn_kernel)
        self.sam = SpatialAttentionModule(cfg.rpn_channels, ps_channels)
        self.head = LightRCNNHead(ps_channels, cfg.head_dim, cfg.num_classes)
        self.stride = self.backbone.strides["C4"]

    # ------------------------------------------------------------------------------------------------

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None) -> dict[str, Tensor] | Detections:
        B, _, H, W = images.shape
        c4, c5 = self.backbone(images)  # (B, c4, H/16, W/16), (B, c5, H/32, W/32)
        cem = self.cem(c4, c5)  # (B, alpha p p, H/16, W/16)
        rpn_feat, objectness, deltas = self.rpn(cem)  # (B, rpn_channels, ., .), (B, N), (B, N, 4)
        sam = self.sam(cem, rpn_feat)  # (B, alpha p p, H/16, W/16)
        anchors = make_anchors(
            self.config.anchor_sizes,
            self.config.anchor_ratios,
            self.stride,
            cem.shape[2],
            cem.shape[3],
            cem.dtype,
            cem.device,
        )  # (N, 4)
        proposals, valid = self.propose(objectness.detach(), deltas.detach(), anchors, (H, W), targets is not None)
        if targets is None:
            return self.detect(sam, proposals, valid, (H, W))
        losses = self.rpn_loss(objectness, deltas, anchors, targets)
        losses.update(self.rcnn_loss(sam, [p[v] for p, v in zip(proposals, valid)], targets))
        return losses

    def propose(
        self, objectness: Tensor, deltas: Tensor, anchors: Tensor, size: tuple[int, int], training: bool
    ) -> tuple[Tensor, Tensor]:
        """Step 5 for the whole batch: proposals (B, P, 4), each image's by decreasing objectness, and which
        are real (B, P) bool (an image may keep fewer than P after NMS)."""
        cfg = self.config
        pre = cfg.rpn_pre_nms_train if training else cfg.rpn_pre_nms_test
        post = cfg.rpn_post_nms_train if training else cfg.rpn_post_nms_test
        k = min(pre, objectness.shape[1])
        scores, top = objectness.topk(k, dim=1)  # (B, k)
        d = torch.gather(deltas, 1, top[:, :, None].expand(-1, -1, 4))  # (B, k, 4)
        boxes = clip_boxes(decode_boxes(d, anchors[top]), size)  # (B, k, 4)
        wide = (boxes[..., 2:] - boxes[..., :2] >= cfg.rpn_min_size).all(dim=-1)  # (B, k)
        scores = torch.where(wide, scores, -math.inf)  # narrow boxes: out of NMS
        # Only the best `post` survivors are kept, so NMS may stop there (the same P boxes, far fewer IoUs).
        keep = multiclass_nms(boxes, scores[:, None], cfg.rpn_nms_iou, -math.inf, min(post, k))[:, 0]  # (B, k)
        order, kept = top_kept(scores, keep, min(post, k))  # (B, P)
        return torch.gather(boxes, 1, order[:, :, None].expand(-1, -1, 4)), kept

    def roi_head(self, sam: Tensor, rois: list[Tensor] | Tensor) -> tuple[Tensor, Tensor]:
        """rois: one (R_b, 4) tensor per image, or (B, P, 4); R = sum R_b or B P."""
        cfg = self.config
        feats = ps_roi_align(sam, rois, cfg.ps_size, 1.0 / self.stride, cfg.sampling_ratio)  # (R, alpha, p, p)
        return self.head(feats)  # (R, C + 1), (R, C, 4)

    # ------------------------------------------------------------------------------------------------ training

    def rpn_loss(
        self, objectness: Tensor, deltas: Tensor, anchors: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        cfg = self.config
        obj_terms, box_terms, n_sampled = [], [], 0
        for obj, d, t in zip(objectness, deltas, targets):
            gt = t["boxes"].to(anchors)
            if len(gt):
                labels, matched = label_by_iou(box_iou(gt, anchors), cfg.rpn_fg_iou, cfg.rpn_bg_iou, True)
            else:
                labels, matched = torch.zeros_like(obj, dtype=torch.long), torch.zeros_like(obj, dtype=torch.long)
            pos, neg = sample_balanced(labels, cfg.rpn_batch_per_image, cfg.rpn_positive_fraction)
            sampled = torch.cat([pos, neg])
            target_obj = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).to(obj)
            obj_terms.append(F.binary_cross_entropy_with_logits(obj[sampled], target_obj, reduction="sum"))
            if len(pos):
                target_d = encode_boxes(anchors[pos], gt[matched[pos]])
                box_terms.append(F.smooth_l1_loss(d[pos], target_d, beta=1 / 9, reduction="sum"))
            n_sampled += len(sampled)
        n = max(n_sampled, 1)
        return {
            "rpn_objectness": torch.stack(obj_terms).sum() / n,
            "rpn_box": (torch.stack(box_terms).sum() if box_terms else deltas.sum() * 0) / n,
        }

    def sample_rois(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Per image: proposals plus ground truths, labelled by IoU (class + 1, 0 background), sampled.
        Returns RoIs per image, labels (R,), regression targets (R, 4)."""
        cfg = self.config
        rois, labels, reg = [], [], []
        for props, t in zip(proposals, targets):
            gt, gt_labels = t["boxes"].to(props), t["labels"]
            cand = torch.cat([props, gt])  # ground truths are RoIs too, so each image has a foreground
            if len(gt):
                iou = box_iou(gt, cand)  # (G, P)
                best, matched = iou.max(dim=0)
                lab = torch.where(best >= cfg.rcnn_fg_iou, gt_labels[matched] + 1, torch.zeros_like(matched))
            else:
                matched = torch.zeros(len(cand), dtype=torch.long, device=cand.device)
                lab = torch.zeros_like(matched)
            pos, neg = sample_balanced(lab, cfg.rcnn_batch_per_image, cfg.rcnn_positive_fraction)
            keep = torch.cat([pos, neg])
            rois.append(cand[keep])
            labels.append(lab[keep])
            if len(gt):
                reg.append(encode_boxes(cand[keep], gt[matched[keep]], tuple(cfg.box_weights)))
            else:
                reg.append(torch.zeros(len(keep), 4, dtype=cand.dtype, device=cand.device))
        return rois, torch.cat(labels), torch.cat(reg)

    def rcnn_loss(self, sam: Tensor, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        rois, labels, reg_targets = self.sample_rois(proposals, targets)
        logits, deltas = self.roi_head(sam, rois)  # (R, C + 1), (R, C, 4)
        pos = torch.nonzero(labels > 0).flatten()
        box = F.smooth_l1_loss(deltas[pos, labels[pos] - 1], reg_targets[pos], beta=1 / 9, reduction="sum")
        return {"rcnn_cls": F.cross_entropy(logits, labels), "rcnn_box": box / max(len(labels), 1)}

    # ------------------------------------------------------------------------------------------------ inference

    def detect(self, sam: Tensor, proposals: Tensor, valid: Tensor, size: tuple[int, int]) -> Detections:
        """Per image and class: decode, score threshold, NMS; per image the best `max_detections`. The whole
        batch at once (no loop over images), so the ONNX export keeps a dynamic batch."""
        cfg = self.config
        C = cfg.num_classes
        B, P = valid.shape
        logits, deltas = self.roi_head(sam, proposals)  # (B P, C + 1), (B P, C, 4)
        probs = F.softmax(logits, dim=-1)[:, 1:].reshape(B, P, C)  # background dropped
        probs = torch.where(valid[:, :, None], probs, -math.inf)  # padding proposals: never detections
        boxes = decode_boxes(deltas.reshape(B, P, C, 4), proposals[:, :, None, :], tuple(cfg.box_weights))
        boxes = clip_boxes(boxes, size)  # (B, P, C, 4)
        # Boxes are class-specific: NMS "batches" are the (image, class) pairs, each over its P boxes.
        keep = multiclass_nms(
            boxes.transpose(1, 2).reshape(B * C, P, 4),
            probs.transpose(1, 2).reshape(B * C, 1, P),
            cfg.nms_iou,
            cfg.score_threshold,
            cfg.max_detections,  # no class can place more in an image's best max_detections
        )  # (B C, 1, P)
        keep = keep.reshape(B, C, P).transpose(1, 2).reshape(B, P * C)  # roi-major, as the scores
        scores = probs.reshape(B, P * C)
        order, kept = top_kept(scores, keep, min(cfg.max_detections, P * C))  # (B, D)
        boxes = torch.gather(boxes.reshape(B, P * C, 4), 1, order[:, :, None].expand(-1, -1, 4))
        return Detections.from_padded(boxes, torch.gather(scores, 1, order), order % C, kept)
