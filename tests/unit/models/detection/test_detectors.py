"""models/detection/backbones.py, models/detection/thundernet.py, models/detection/fcos.py: shapes, losses,
gradients, the inference
format, batched inference against image by image, and the ONNX exports (dynamic batch) against PyTorch."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from models.detection.backbones import BACKBONES, SNET_PRESETS, build_backbone
from models.detection.boxes import ONNX_TRANSLATION_TABLE, Detections, multiclass_nms, nms_reference
from models.detection.detectors import GrayscaleDetector, to_model_input
from models.detection.fcos import FCOS, FCOSConfig
from models.detection.thundernet import ThunderNet, ThunderNetConfig, label_by_iou, make_anchors

NUM_CLASSES = 3
SIZE = 64


def tiny_thundernet_config(**overrides) -> ThunderNetConfig:
    kw = dict(
        num_classes=NUM_CLASSES,
        backbone="snet_tiny",
        input_size=SIZE,
        ps_alpha=2,
        ps_size=3,
        rpn_channels=16,
        anchor_sizes=[16.0, 32.0],
        anchor_ratios=[0.5, 1.0, 2.0],
        rpn_pre_nms_train=200,
        rpn_post_nms_train=50,
        rpn_pre_nms_test=200,
        rpn_post_nms_test=30,
        rpn_batch_per_image=32,
        rcnn_batch_per_image=32,
        head_dim=32,
        max_detections=20,
    )
    return ThunderNetConfig(**(kw | overrides))


def tiny_fcos_config(**overrides) -> FCOSConfig:
    kw = dict(
        num_classes=NUM_CLASSES,
        backbone="mobilenet_v2_tiny",
        input_size=SIZE,
        neck_channels=16,
        head_convs=1,
        level_boundary=32.0,
        pre_nms_top_n=50,
        max_detections=20,
    )
    return FCOSConfig(**(kw | overrides))


def toy_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, SIZE, SIZE, generator=g)
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 20.0, 60.0, 50.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},  # an image without objects
    ]
    return images, targets


# ----------------------------------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_strides_and_channels(name):
    model = build_backbone(name).eval()
    with torch.no_grad():
        c4, c5 = model(torch.randn(1, 3, 64, 96))
    assert c4.shape == (1, model.out_channels["C4"], 64 // 16, 96 // 16)
    assert c5.shape == (1, model.out_channels["C5"], 64 // 32, 96 // 32)
    assert model.strides == {"C4": 16, "C5": 32}


def test_snet_presets_follow_the_paper():
    assert build_backbone("snet49").out_channels == {"C4": 120, "C5": 512}  # Conv5 of 512
    assert build_backbone("snet146").out_channels == {"C4": 264, "C5": 528}
    assert build_backbone("snet535").out_channels == {"C4": 496, "C5": 992}
    # 5x5 depthwise convolutions throughout
    dw = [m for m in build_backbone("snet49").modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert dw and all(m.kernel_size == (5, 5) for m in dw)
    assert set(SNET_PRESETS) >= {"snet49", "snet146", "snet535"}


# ----------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "field,value",
    [
        ("input_size", 100),
        ("num_classes", 0),
        ("backbone", "resnet"),
        ("anchor_sizes", []),
        ("rpn_fg_iou", 1.5),
        ("box_weights", [1.0, 1.0]),
        ("rpn_kernel", 4),
        ("max_detections", True),
    ],
)
def test_thundernet_config_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        ThunderNetConfig(**{field: value})


@pytest.mark.parametrize(
    "field,value", [("neck_channels", 12), ("input_size", 48), ("focal_alpha", 0.0), ("backbone", "vgg")]
)
def test_fcos_config_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        FCOSConfig(**{field: value})


def test_default_configs_are_the_papers():
    cfg = ThunderNetConfig()
    assert cfg.ps_alpha * cfg.ps_size**2 == 245 and cfg.num_anchors == 25 and cfg.head_dim == 1024
    assert cfg.rpn_post_nms_test == 200 and cfg.input_size == 320


# ----------------------------------------------------------------------------------------------------- pieces


def test_anchors_and_low_quality_matches():
    anchors = make_anchors([16.0, 32.0], [0.5, 1.0, 2.0], 16, 2, 3)
    assert anchors.shape == (2 * 3 * 6, 4)
    wh = anchors[:, 2:] - anchors[:, :2]
    assert torch.allclose((wh[:, 0] * wh[:, 1]).sqrt()[:6], torch.tensor([16.0, 32.0] * 3))
    assert torch.allclose((anchors[:6, :2] + anchors[:6, 2:]) / 2, torch.tensor([8.0, 8.0]).expand(6, 2))
    # A ground truth far from every anchor's IoU threshold still gets its best anchor as foreground.
    iou = torch.tensor([[0.1, 0.25, 0.2], [0.0, 0.0, 0.8]])
    labels, matched = label_by_iou(iou, fg=0.7, bg=0.3, allow_low_quality=True)
    assert labels.tolist() == [0, 1, 1] and matched.tolist() == [0, 0, 1]


# ----------------------------------------------------------------------------------------------------- detectors


def check_detections(det: Detections, batch: int):
    assert isinstance(det, Detections)
    k = det.boxes.shape[0]
    assert det.boxes.shape == (k, 4) and det.scores.shape == det.labels.shape == det.image_index.shape == (k,)
    assert det.labels.dtype == det.image_index.dtype == torch.long
    assert ((det.labels >= 0) & (det.labels < NUM_CLASSES)).all()
    assert ((det.image_index >= 0) & (det.image_index < batch)).all()
    assert (det.boxes >= 0).all() and (det.boxes <= SIZE).all()
    for image in det.per_image(batch):
        assert (image["scores"][1:] <= image["scores"][:-1]).all()  # by decreasing score


@pytest.mark.parametrize(
    "build",
    [lambda: ThunderNet(tiny_thundernet_config()), lambda: FCOS(tiny_fcos_config())],
    ids=["thundernet", "fcos"],
)
def test_losses_are_finite_and_gradients_reach_every_part(build):
    torch.manual_seed(0)
    model = build()
    images, targets = toy_batch()
    losses = model(images, targets)
    assert len(losses) >= 3 and all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    for name, module in model.named_children():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient reaches {name}"

    model.eval()
    with torch.no_grad():
        check_detections(model(images), batch=2)


def test_fcos_inference_format_with_detections():
    torch.manual_seed(0)
    model = FCOS(tiny_fcos_config(score_threshold=0.005)).eval()  # at init the class prior is 0.01
    with torch.no_grad():
        det = model(toy_batch()[0])
    assert len(det.scores) > 0 and set(det.image_index.tolist()) == {0, 1}
    check_detections(det, batch=2)


def train_on_toy(model, images, targets, steps: int = 60) -> None:
    """A few SGD steps on the toy batch, enough for confident, well-separated detections."""
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for _ in range(steps):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item())


# ----------------------------------------------------------------------------------------------------- batched
# Inference runs the whole batch at once (no loop over images), so the ONNX export keeps a dynamic batch.


def gray_toy():
    """Three gray images in [0, 1], what the exported models take: objects in two, none in the middle one."""
    gray = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    _, targets = toy_batch()
    targets = [targets[0], targets[1], {"boxes": torch.tensor([[8.0, 30.0, 40.0, 62.0]]), "labels": torch.tensor([1])}]
    return gray, targets


@pytest.fixture(scope="module", params=["thundernet", "fcos"])
def trained_gray(request) -> GrayscaleDetector:
    """A detector trained on the gray toy until its detections are confident and their scores spread out
    (at initialisation they sit within 1e-4 of each other, where last-bit differences reorder them)."""
    torch.manual_seed(0)
    model = ThunderNet(tiny_thundernet_config()) if request.param == "thundernet" else FCOS(tiny_fcos_config())
    gray, targets = gray_toy()
    train_on_toy(model, to_model_input(gray), targets)
    return GrayscaleDetector(model).eval()


def assert_same_detections(got, want: Detections, atol: float, box_rtol: float = 0.0):
    """got: Detections or onnxruntime's (boxes, scores, labels, image_index) arrays."""
    got = [torch.as_tensor(np.asarray(v)) for v in got]
    assert got[0].shape == want.boxes.shape
    torch.testing.assert_close(got[0], want.boxes, rtol=box_rtol, atol=atol)
    torch.testing.assert_close(got[1], want.scores, rtol=0, atol=atol)
    assert torch.equal(got[2], want.labels) and torch.equal(got[3], want.image_index)


def test_batched_inference_equals_image_by_image(trained_gray):
    gray, _ = gray_toy()
    with torch.no_grad():
        batched = trained_gray(gray)
        alone = [trained_gray(gray[b : b + 1]) for b in range(len(gray))]
    check_detections(batched, batch=len(gray))
    assert len(batched.scores) > 5 and {0, 2} <= set(batched.image_index.tolist())  # not vacuous
    for d in alone:
        assert (d.scores[:-1] - d.scores[1:] > 1e-5).all()  # no near-ties that last bits could reorder
    want = Detections(*(torch.cat(parts) for parts in zip(*alone)))
    want = want._replace(image_index=torch.cat([torch.full_like(d.labels, b) for b, d in enumerate(alone)]))
    # Convolutions round differently for another batch size (features ~1e-7 apart, relatively), and
    # FCOS's exp(distance) carries that to a few float32 ulps of a coordinate (pixels, up to SIZE): 4 ulps
    # (1.5e-5 at x = 50) on one machine of this kind, so the bound is 4e-6 relative.
    assert_same_detections(batched, want, atol=1e-5, box_rtol=4e-6)


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # inside torch.export
def test_onnx_export_has_a_dynamic_batch_and_matches_pytorch(trained_gray):
    gray, _ = gray_toy()
    program = torch.onnx.export(
        trained_gray,
        (torch.rand(2, 1, SIZE, SIZE),),
        dynamo=True,
        custom_translation_table=ONNX_TRANSLATION_TABLE,
        dynamic_shapes={"gray": {0: torch.export.Dim("batch", min=1, max=1024)}},
        input_names=["pixels"],
        output_names=["boxes", "scores", "labels", "image_index"],
        verbose=False,
    )
    graph = program.model_proto.graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not specialised to 2
    ops = {n.op_type for n in graph.node}
    assert "NonMaxSuppression" in ops
    if isinstance(trained_gray.detector, ThunderNet):
        assert "GridSample" in ops  # PSRoIAlign's bilinear sampling, in the graph
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in (gray[:1], gray):
        with torch.no_grad():
            want = trained_gray(x)
        assert len(want.scores) > 2
        assert_same_detections(session.run(None, {"pixels": x.numpy()}), want, atol=1e-4)


def test_multiclass_nms_is_nms_per_batch_and_class():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3, 80, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + torch.rand(3, 80, 2, generator=g) * 20 + 1], dim=-1)  # (N, M, 4)
    scores = torch.rand(3, 4, 80, generator=g)  # (N, K, M)
    keep = multiclass_nms(boxes, scores, 0.5, 0.3)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    for n in range(3):
        for k in range(4):
            cand = torch.nonzero(scores[n, k] > 0.3).flatten()
            want = cand[nms_reference(boxes[n, cand], scores[n, k, cand], 0.5)]
            assert 0 < len(want) < len(cand)
            assert torch.equal(torch.nonzero(keep[n, k]).flatten(), want.sort().values)


@pytest.mark.parametrize("max_output", [1, 3])
def test_multiclass_nms_max_output_keeps_each_classes_best(max_output):
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(2, 60, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + torch.rand(2, 60, 2, generator=g) * 20 + 1], dim=-1)  # (N, M, 4)
    scores = torch.rand(2, 3, 60, generator=g)  # (N, K, M)
    keep = multiclass_nms(boxes, scores, 0.5, 0.3, max_output)
    for n in range(2):
        for k in range(3):
            cand = torch.nonzero(scores[n, k] > 0.3).flatten()
            want = cand[nms_reference(boxes[n, cand], scores[n, k, cand], 0.5)]
            assert len(want) > max_output
            assert torch.equal(torch.nonzero(keep[n, k]).flatten(), want[:max_output].sort().values)


class _TopNMS(nn.Module):
    def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return multiclass_nms(boxes, scores, 0.5, 0.3, 3)


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # inside torch.export
def test_multiclass_nms_max_output_exports_as_onnx_max_output_boxes_per_class():
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(2, 50, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + torch.rand(2, 50, 2, generator=g) * 20 + 1], dim=-1)
    scores = torch.rand(2, 3, 50, generator=g)
    program = torch.onnx.export(
        _TopNMS().eval(), (boxes, scores), dynamo=True, custom_translation_table=ONNX_TRANSLATION_TABLE, verbose=False
    )
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {i.name: v.numpy() for i, v in zip(session.get_inputs(), (boxes, scores))})
    want = _TopNMS()(boxes, scores)
    assert int(want.sum()) == 2 * 3 * 3  # every (image, class) kept exactly its best 3
    np.testing.assert_array_equal(got, want.numpy())
