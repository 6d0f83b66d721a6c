"""models/detection/boxes.py and models/detection/roi.py: NMS against its loop twin and ONNX, the box coder, PS RoI
align against its loop twin."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from models.detection.boxes import (
    ONNX_TRANSLATION_TABLE,
    batched_nms,
    batched_nms_reference,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    nms,
    nms_reference,
    nms_torch,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from models.detection.roi import ps_roi_align, ps_roi_align_reference


def random_boxes(n: int, seed: int, dtype=torch.float64, clusters: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes clustered around a few centres, so that many overlap and NMS has work to do."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(clusters, 2, generator=g, dtype=dtype) * 200
    c = centres[torch.randint(clusters, (n,), generator=g)] + torch.randn(n, 2, generator=g, dtype=dtype) * 8
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * 40 + 5
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1)
    return boxes, torch.rand(n, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------------------------------- NMS


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_equals_reference(seed, threshold):
    boxes, scores = random_boxes(300, seed)
    keep = nms_torch(boxes, scores, threshold)
    ref = nms_reference(boxes, scores, threshold)
    assert 0 < len(ref) < len(boxes)  # something was suppressed, something kept
    assert torch.equal(keep, ref)
    assert torch.equal(nms(boxes, scores, threshold), ref)  # the custom op, eagerly


@pytest.mark.parametrize("max_output", [0, 1, 7, 130, 10_000])
def test_nms_stops_at_max_output_with_the_references_best(max_output):
    # 300 boxes are three blocks of the sweep; 130 kept crosses a block boundary.
    boxes, scores = random_boxes(300, 5)
    ref = nms_reference(boxes, scores, 0.5)
    assert len(ref) > 130
    keep = nms_torch(boxes, scores, 0.5, max_output)
    assert torch.equal(keep, ref[:max_output])
    assert torch.equal(keep, nms_reference(boxes, scores, 0.5, max_output))


def test_nms_ties_in_score_keep_index_order():
    boxes, _ = random_boxes(200, 7)
    scores = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(0)).to(torch.float64) / 4
    assert torch.equal(nms_torch(boxes, scores, 0.5), nms_reference(boxes, scores, 0.5))


@pytest.mark.parametrize("seed", range(3))
def test_batched_nms_equals_per_class_reference(seed):
    boxes, scores = random_boxes(300, seed)
    classes = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(seed))
    keep = batched_nms(boxes, scores, classes, 0.5)
    ref = batched_nms_reference(boxes, scores, classes, 0.5)
    assert len(ref) < len(boxes)
    assert len(ref) > len(nms_reference(boxes, scores, 0.5))  # classes do not suppress each other
    assert torch.equal(keep, ref)


def test_batched_nms_float32_and_empty():
    boxes, scores = random_boxes(200, 11, dtype=torch.float32)
    classes = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(batched_nms(boxes, scores, classes, 0.6), batched_nms_reference(boxes, scores, classes, 0.6))
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.long


class _TinyNMS(nn.Module):
    """Score threshold (a dynamic size) then class-wise NMS: what the detectors do at the end."""

    def forward(self, boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor):
        hit = torch.nonzero(scores > 0.2).flatten()
        boxes, scores, classes = boxes[hit], scores[hit], classes[hit]
        keep = batched_nms(boxes, scores, classes, 0.5)
        return boxes[keep], scores[keep], classes[keep]


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # inside torch.export
def test_nms_op_exports_to_onnx_and_onnxruntime_keeps_the_same_boxes():
    module = _TinyNMS().eval()
    boxes, scores = random_boxes(300, 3, dtype=torch.float32)
    classes = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(3))
    program = torch.onnx.export(
        module, (boxes, scores, classes), dynamo=True, custom_translation_table=ONNX_TRANSLATION_TABLE, verbose=False
    )
    assert any(n.op_type == "NonMaxSuppression" for n in program.model_proto.graph.node)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    # A different input than the one traced: the number of boxes kept is data-dependent.
    boxes2, scores2 = random_boxes(300, 4, dtype=torch.float32)
    for b, s in ((boxes, scores), (boxes2, scores2)):
        names = [i.name for i in session.get_inputs()]
        got = session.run(None, dict(zip(names, (b.numpy(), s.numpy(), classes.numpy()))))
        want = module(b, s, classes)
        assert 0 < len(want[0]) < 300
        np.testing.assert_array_equal(got[0], want[0].numpy())
        np.testing.assert_array_equal(got[1], want[1].numpy())
        np.testing.assert_array_equal(got[2], want[2].numpy())


# ----------------------------------------------------------------------------------------------------- boxes


def test_formats_iou_and_clip():
    xywh = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 10.0, 10.0]])
    xyxy = xywh_to_xyxy(xywh)
    assert torch.equal(xyxy, torch.tensor([[1.0, 2.0, 4.0, 6.0], [0.0, 0.0, 10.0, 10.0]]))
    assert torch.equal(xyxy_to_xywh(xyxy), xywh)
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 3.0, 8.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[50 / 150, 0.0, 1.0, 0.0]]))
    clipped = clip_boxes(torch.tensor([[-5.0, 2.0, 50.0, 70.0]]), (60, 40))
    assert torch.equal(clipped, torch.tensor([[0.0, 2.0, 40.0, 60.0]]))


def test_encode_decode_round_trip_and_clamp():
    boxes, _ = random_boxes(100, 0)
    ref, _ = random_boxes(100, 1)
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        deltas = encode_boxes(ref, boxes, weights)
        assert torch.allclose(decode_boxes(deltas, ref, weights), boxes, atol=1e-9)
    # Per-class deltas (R, C, 4) against proposals (R, 1, 4).
    per_class = torch.stack([encode_boxes(ref, boxes), encode_boxes(ref, boxes + 1)], dim=1)
    decoded = decode_boxes(per_class, ref[:, None, :])
    assert torch.allclose(decoded[:, 1], boxes + 1, atol=1e-9)
    # dw = 100 is clamped at log(1000 / 16): the box grows 62.5 times, not e^100.
    big = decode_boxes(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), torch.tensor([[0.0, 0.0, 2.0, 2.0]]))
    assert big[0, 2] - big[0, 0] == pytest.approx(2 * 1000 / 16)
    assert math.isfinite(float(big.sum()))


# ----------------------------------------------------------------------------------------------------- PS RoI align


def test_ps_roi_align_equals_loop_reference_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    alpha, p, s = 2, 3, 2
    features = torch.randn(2, alpha * p * p, 7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    rois = [
        torch.tensor([[0.0, 0.0, 30.0, 20.0], [5.0, 7.0, 18.0, 40.0], [-8.0, -3.0, 12.0, 9.0]], dtype=torch.float64),
        torch.tensor([[10.0, 2.0, 35.0, 27.0], [30.0, 20.0, 40.0, 33.0]], dtype=torch.float64),  # past the border
    ]
    fast = ps_roi_align(features, rois, p, 0.25, s)
    slow = ps_roi_align_reference(features, rois, p, 0.25, s)
    assert fast.shape == (5, alpha, p, p)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    w = torch.randn(fast.shape, generator=g, dtype=torch.float64)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), features)
    (g_slow,) = torch.autograd.grad((slow * w).sum(), features)
    assert g_fast.abs().sum() > 0
    torch.testing.assert_close(g_fast, g_slow, rtol=0, atol=1e-12)


def test_ps_roi_align_reads_its_own_channel_slice():
    # Channel (c p + i) p + j constant = its index: bin (i, j) of output channel c must read exactly that.
    p, alpha = 3, 2
    features = torch.arange(alpha * p * p, dtype=torch.float32)[None, :, None, None].expand(1, -1, 8, 8).contiguous()
    out = ps_roi_align(features, [torch.tensor([[4.0, 4.0, 28.0, 28.0]])], p, 0.25, 2)  # well inside the map
    assert torch.equal(out[0], torch.arange(alpha * p * p, dtype=torch.float32).reshape(alpha, p, p))
