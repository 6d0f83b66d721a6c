"""`kiln detect`'s helpers on a hand-built ONNX graph with the exported detectors' interface (pixels (batch, 1, S, S)
in [0, 1] -> boxes, scores, labels, image_index): reading and letterboxing images, mapping boxes back, names,
drawing, and the one-line errors. The real export runs in tests/pipeline/test_inference.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.detection.inference import (
    Detector,
    detect,
    draw_detections,
    format_detections,
    letterbox,
    load_detector,
    model_path,
    output_paths,
    read_gray,
)
from tasks.errors import InputError

SIZE = 8
# (x1, y1, x2, y2) in input pixels, score, label: the third lies in the padding of a wide image's letterbox.
FIXED = [((1.0, 1.0, 3.0, 2.0), 0.9, 1), ((0.0, 0.0, 8.0, 8.0), 0.2, 0), ((2.0, 6.0, 4.0, 8.0), 0.8, 2)]


def fixed_detector(path: Path) -> Path:
    """An ONNX graph of the detectors' signature that returns FIXED whatever the pixels: the input's size (S = 8)
    is what the loader reads from it."""
    import onnx
    from onnx import TensorProto, helper

    def constant(name: str, values, kind) -> onnx.NodeProto:
        array = np.asarray(values)
        tensor = helper.make_tensor(name + "_value", kind, array.shape, array.flatten().tolist())
        return helper.make_node("Constant", [], [name], value=tensor)

    boxes, scores, labels = zip(*FIXED)
    nodes = [
        constant("boxes", boxes, TensorProto.FLOAT),
        constant("scores", scores, TensorProto.FLOAT),
        constant("labels", labels, TensorProto.INT64),
        constant("image_index", [0] * len(FIXED), TensorProto.INT64),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [len(FIXED), 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [len(FIXED)]),
            helper.make_tensor_value_info("labels", TensorProto.INT64, [len(FIXED)]),
            helper.make_tensor_value_info("image_index", TensorProto.INT64, [len(FIXED)]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def project(tmp_path) -> Path:
    fixed_detector(tmp_path / "data/models/onnx/thundernet.onnx")
    scenes = tmp_path / "data/prepared/scenes/train"
    scenes.mkdir(parents=True)
    categories = [{"id": 3, "name": "two"}, {"id": 1, "name": "zero"}, {"id": 2, "name": "one"}]
    (scenes / "annotations.json").write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    return tmp_path


def test_the_default_detector_is_read_with_its_input_size_and_the_scenes_names(project):
    detector = load_detector(project)
    assert (detector.source, detector.input_size) == ("data/models/onnx/thundernet.onnx", SIZE)
    assert detector.class_names == ["zero", "one", "two"]  # label k is the k-th category by id
    assert detector.class_name(7) == "class 7"


def test_an_image_of_the_input_size_is_only_scaled_to_unit_range():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    x, scale = letterbox(gray, 8)
    assert scale == 1.0 and x.shape == (1, 1, 8, 8) and x.dtype == np.float32
    assert np.allclose(x[0, 0], np.asarray(gray) / 255.0)


def test_a_wide_image_is_scaled_to_fit_and_padded_below_with_black():
    x, scale = letterbox(Image.new("L", (16, 8), 255), 8)
    assert scale == 0.5
    assert np.all(x[0, 0, :4] == 1.0) and np.all(x[0, 0, 4:] == 0.0)


def test_detections_map_back_to_the_image_and_keep_what_passes_the_threshold(project, tmp_path):
    Image.new("RGB", (16, 8), (200, 10, 10)).save(tmp_path / "wide.png")
    result = detect(load_detector(project), tmp_path / "wide.png", score_threshold=0.5)
    assert result.size == (16, 8)
    # scale 0.5: boxes double; the third box (y >= 6 px of the input) is in the padding (y >= 4) and dropped
    assert [(d.box, d.name, d.score) for d in result.detections] == [((2.0, 2.0, 6.0, 4.0), "one", pytest.approx(0.9))]
    everything = detect(load_detector(project), tmp_path / "wide.png", score_threshold=0.0)
    assert [d.score for d in everything.detections] == sorted((d.score for d in everything.detections), reverse=True)
    assert everything.detections[-1].box == (0.0, 0.0, 16.0, 8.0)  # clipped to the image
    text = format_detections(everything)
    assert text.splitlines()[0] == f"{tmp_path / 'wide.png'} (16x8): 2 detection(s)"
    assert "one" in text.splitlines()[1] and "[2.0, 2.0, 6.0, 4.0]" in text.splitlines()[1]


def test_the_drawn_image_is_the_input_upscaled_in_colour(project, tmp_path):
    Image.new("L", (8, 8), 40).save(tmp_path / "scene.png")
    result = detect(load_detector(project), tmp_path / "scene.png", score_threshold=0.5)
    drawn = np.asarray(Image.open(draw_detections(result, tmp_path / "out" / "scene.detections.png")))
    assert drawn.shape == (256, 256, 3)
    assert (drawn != 40).any(axis=2).sum() > 0  # the boxes are drawn over the gray image


def test_images_of_any_mode_are_read_as_8_bit_gray(tmp_path):
    Image.new("RGBA", (3, 2), (255, 255, 255, 0)).save(tmp_path / "rgba.png")
    assert read_gray(tmp_path / "rgba.png").mode == "L"
    Image.fromarray(np.full((2, 3), 0xABCD, dtype=np.uint16)).save(tmp_path / "deep.png")
    deep = read_gray(tmp_path / "deep.png")
    assert deep.mode == "L" and np.all(np.asarray(deep) == 0xAB)  # the high byte, not a clip to 255


def test_unreadable_and_missing_images_are_one_line(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InputError, match="notes.png: not a readable image \\(UnidentifiedImageError\\)"):
        read_gray(tmp_path / "notes.png")
    with pytest.raises(InputError, match="absent.png: no such file"):
        read_gray(tmp_path / "absent.png")


def test_an_unknown_name_suggests_the_closest_and_a_missing_export_names_the_stage(project):
    with pytest.raises(InputError, match="no detector 'thundernt'; did you mean 'thundernet'\\?"):
        model_path(project, "thundernt")
    assert model_path(project, "thundernet") == project / "data/models/onnx/thundernet.onnx"
    with pytest.raises(InputError) as missing:
        model_path(project, "one_stage.int8")
    assert str(missing.value) == (
        "no trained model for onnx at data/models/onnx/one_stage.int8.onnx; run `dvc repro onnx` first"
    )


def test_a_graph_without_a_square_gray_input_is_refused(project):
    import onnx

    path = project / "data/models/onnx/thundernet.onnx"
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    onnx.save(model, str(path))
    with pytest.raises(InputError, match="expected \\(batch, 1, S, S\\) gray pixels"):
        load_detector(project)


def test_output_names_stay_apart_when_stems_repeat(tmp_path):
    images = [Path("a/x.png"), Path("b/x.png"), Path("c/y.jpg")]
    assert [p.name for p in output_paths(images, tmp_path)] == [
        "x-0.detections.png",
        "x-1.detections.png",
        "y.detections.png",
    ]


def test_a_detector_without_class_names_numbers_its_classes():
    assert Detector(None, "m", 8, []).class_name(3) == "class 3"
