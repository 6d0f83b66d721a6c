"""Position-sensitive RoI align (Dai et al. 2016, R-FCN, with RoIAlign's bilinear sampling from He et al.
2017, Mask R-CNN), the RoI feature extractor of ThunderNet (Qin et al. 2019, section 3.3).

The score map has alpha * p * p channels: for output channel c and bin (i, j) of the p x p grid over a
RoI, only input channel (c * p + i) * p + j is read (its "position-sensitive" slice). Each bin averages
`sampling_ratio`^2 bilinear samples placed evenly inside it:

    x(j, sx) = x1 + (j + (sx + 0.5) / s) * (x2 - x1) / p        sx = 0 .. s - 1
    out[r, c, i, j] = mean over (sy, sx) of  bilinear(F[b_r, (c * p + i) * p + j], y(i, sy), x(j, sx))

Coordinates: the RoI (x1, y1, x2, y2) is in input-image pixels, times `spatial_scale` in feature pixels;
feature pixel (u, v) covers [u, u + 1) x [v, v + 1), so its value sits at (u + 0.5, v + 0.5) ("aligned"
RoIAlign, no half-pixel shift left to fix). Bilinear sampling reads zero outside the map, i.e. exactly
`grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)`.

`ps_roi_align` is the vectorised path: the (image, bin) pairs become the batch of one `grid_sample`, each
sampling only its alpha channels at its image's RoI points, so no work is wasted on the other p^2 - 1
slices; RoIs come as a (B, R, 4) tensor (per-image lists are padded to one), so it exports to ONNX
(GridSample) with a dynamic batch. `ps_roi_align_reference` loops over RoIs, channels, bins and samples
with explicit bilinear weights; a test holds them equal in values and gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _sample_points(rois: Tensor, p: int, s: int, spatial_scale: float) -> tuple[Tensor, Tensor]:
    """x, y sample coordinates in feature pixels: each (R, p, s), bin-major."""
    x1, y1, x2, y2 = (rois * spatial_scale).unbind(-1)  # (R,)
    frac = (torch.arange(p * s, dtype=rois.dtype, device=rois.device) + 0.5) / s  # j + (sx + 0.5) / s
    xs = x1[:, None] + frac[None, :] * ((x2 - x1) / p)[:, None]  # (R, p * s)
    ys = y1[:, None] + frac[None, :] * ((y2 - y1) / p)[:, None]
    return xs.reshape(-1, p, s), ys.reshape(-1, p, s)


def ps_roi_align(
    features: Tensor, rois: list[Tensor] | Tensor, output_size: int, spatial_scale: float, sampling_ratio: int = 2
) -> Tensor:
    """features (B, alpha * p * p, H, W); rois in image pixels, xyxy: one (R_b, 4) tensor per image, or one
    (B, R, 4) tensor, R RoIs for every image (what batched inference passes, with no loop over images).
    Returns (sum R_b, alpha, p, p) or (B R, alpha, p, p), RoIs in the order given, image-major."""
    B, C, H, W = features.shape
    p, s = output_size, sampling_ratio
    if C % (p * p):
        raise ValueError(f"ps_roi_align: {C} channels is not alpha * {p} * {p}")
    n = rois.shape[0] if isinstance(rois, Tensor) else len(rois)  # not len(tensor): it would fix B in export
    if n != B:
        raise ValueError(f"ps_roi_align: {n} RoI tensors for a batch of {B}")
    if isinstance(rois, Tensor):
        return _ps_roi_align_padded(features, rois, p, spatial_scale, s)
    # Per-image lists pad to one (B, R_max, 4) tensor; the padding rows are sampled, then dropped.
    counts = [len(r) for r in rois]
    padded = features.new_zeros(B, max(counts, default=0), 4)
    for b, r in enumerate(rois):
        padded[b, : len(r)] = r
    out = _ps_roi_align_padded(features, padded, p, spatial_scale, s)  # (B R_max, alpha, p, p)
    valid = torch.arange(padded.shape[1], device=features.device) < padded.new_tensor(counts)[:, None]  # (B, R_max)
    return out[valid.flatten()]


def _ps_roi_align_padded(features: Tensor, rois: Tensor, p: int, spatial_scale: float, s: int) -> Tensor:
    """features (B, alpha p p, H, W), rois (B, R, 4) -> (B R, alpha, p, p): one `grid_sample` for the batch."""
    B, C, H, W = features.shape
    R = rois.shape[1]
    alpha = C // (p * p)
    # Bins as batch: (B * p * p, alpha, H, W), row (b, i, j) holding channels (c * p + i) * p + j.
    per_bin = features.reshape(B, alpha, p, p, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B * p * p, alpha, H, W)
    xs, ys = _sample_points(rois.reshape(-1, 4), p, s, spatial_scale)  # (B R, p, s)
    gx = (2.0 * xs / W - 1.0).reshape(B, R, p, s).permute(0, 2, 1, 3)[:, None, :, :, None, :]  # (B, 1, p_j, R, 1, s_x)
    gy = (2.0 * ys / H - 1.0).reshape(B, R, p, s).permute(0, 2, 1, 3)[:, :, None, :, :, None]  # (B, p_i, 1, R, s_y, 1)
    shape = torch.broadcast_shapes(gx.shape, gy.shape)  # (B, p_i, p_j, R, s_y, s_x)
    grid = torch.stack([gx.expand(shape), gy.expand(shape)], dim=-1).reshape(B * p * p, R, s * s, 2)
    sampled = F.grid_sample(per_bin, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    pooled = sampled.mean(dim=3)  # (B p p, alpha, R)
    return pooled.reshape(B, p * p, alpha, R).permute(0, 3, 2, 1).reshape(B * R, alpha, p, p)


def _bilinear(plane: Tensor, y: float, x: float) -> Tensor:
    """plane (H, W) read at continuous (y, x), pixel values at centres, zero outside."""
    H, W = plane.shape
    v, u = y - 0.5, x - 0.5  # index space
    v0, u0 = math.floor(v), math.floor(u)
    fv, fu = v - v0, u - u0
    total = plane.new_zeros(())
    for dv, wv in ((0, 1.0 - fv), (1, fv)):
        for du, wu in ((0, 1.0 - fu), (1, fu)):
            vi, ui = v0 + dv, u0 + du
            if 0 <= vi < H and 0 <= ui < W:
                total = total + wv * wu * plane[vi, ui]
    return total


def ps_roi_align_reference(
    features: Tensor, rois: list[Tensor], output_size: int, spatial_scale: float, sampling_ratio: int = 2
) -> Tensor:
    """The loop twin of `ps_roi_align`: every bin of every RoI and channel, sample by sample."""
    _, C, _, _ = features.shape
    p, s = output_size, sampling_ratio
    alpha = C // (p * p)
    out = []
    for b, r_b in enumerate(rois):
        for roi in r_b.tolist():
            x1, y1, x2, y2 = (v * spatial_scale for v in roi)
            bw, bh = (x2 - x1) / p, (y2 - y1) / p
            bins = []
            for c in range(alpha):
                for i in range(p):
                    for j in range(p):
                        plane = features[b, (c * p + i) * p + j]
                        acc = features.new_zeros(())
                        for sy in range(s):
                            for sx in range(s):
                                y = y1 + (i + (sy + 0.5) / s) * bh
                                x = x1 + (j + (sx + 0.5) / s) * bw
                                acc = acc + _bilinear(plane, y, x)
                        bins.append(acc / (s * s))
            out.append(torch.stack(bins).reshape(alpha, p, p))
    if not out:
        return features.new_zeros((0, alpha, p, p))
    return torch.stack(out)
