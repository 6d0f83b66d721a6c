"""`kiln detect`: run an exported detector on image files through onnxruntime, print what it finds and draw it.

The model is the `onnx` stage's output (data/models/onnx/<name>.onnx, or <name>.int8.onnx) or a version in the
project's MLflow model registry (`models:/kiln-thundernet@newest`). Either is the GrayscaleDetector graph of
tasks/detection/onnx_export.py: input `pixels` float32 (batch, 1, S, S), gray in [0, 1] (uint8 / 255), and
outputs boxes (x1, y1, x2, y2 in input pixels), scores, labels (class index 0..C-1, the scenes' categories in
id order) and image_index, with decoding and NMS inside the graph. Nothing here imports a stage module
(Prefect, the training code): the detector names come from the model registry, models/detection/detectors.py.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import InputError, shown_path
from tasks.layout import ONNX_DIR, SCENES_DIR

DRAW_SIDE = 256  # small scenes are drawn upscaled to about this side, so the labels stay legible
COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990"]


@dataclass
class Detector:
    session: Any  # onnxruntime.InferenceSession
    source: str  # what was loaded: a path or a models:/ URI
    input_size: int  # S of the (batch, 1, S, S) input
    class_names: list[str]

    def class_name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else f"class {label}"


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the input image's pixels
    label: int
    name: str
    score: float


@dataclass
class ImageDetections:
    path: Path
    size: tuple[int, int]  # the input image's width, height
    detections: list[Detection]


# ------------------------------------------------------------------------------------------- loading


def _session(model: str | bytes):
    """An onnxruntime CPU session, quiet: the same options as the `onnx` stage's parity run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def detector_names() -> list[str]:
    """The detector registry's names (the `onnx` stage exports each); `<name>.int8` is its int8 twin."""
    from models.detection.detectors import DETECTORS

    return list(DETECTORS)


def model_path(root: Path, name: str) -> Path:
    """data/models/onnx/<name>.onnx for a registry name or its `.int8` twin; an unknown name is one line with
    the names and the closest one."""
    names = detector_names()
    known = [*names, *(f"{n}.int8" for n in names)]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(f"no detector {name!r}{hint} (detectors: {', '.join(known)}, or a models:/ URI)")
    path = root / ONNX_DIR / f"{name}.onnx"
    if not path.is_file():
        raise InputError(f"no trained model for onnx at {shown_path(root, path)}; run `dvc repro onnx` first")
    return path


def _registry_model(root: Path, uri: str) -> bytes:
    """The ONNX bytes of a registered model version, from the project's tracking store (runtime params)."""
    import os

    import mlflow.onnx
    from mlflow.exceptions import MlflowException

    from tasks.runtime import load_runtime
    from tasks.tracking import redact_uri, resolve_tracking_uri

    tracking = resolve_tracking_uri(load_runtime(root / "params").tracking_uri(), root)
    # Through the environment for this call only, not mlflow.set_tracking_uri: no store stays set in the process.
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, tracking))
    try:
        return mlflow.onnx.load_model(uri).SerializeToString()
    except (MlflowException, OSError, ValueError) as err:
        problem = " ".join(str(err).split())
        raise InputError(f"{uri}: cannot load it from the registry at {redact_uri(tracking)} ({problem})") from err
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def scene_class_names(root: Path) -> list[str]:
    """The scenes' category names in id order (label k is the k-th), or [] when there are no scenes."""
    path = root / SCENES_DIR / "train" / "annotations.json"
    if not path.is_file():
        return []
    categories = json.loads(path.read_text())["categories"]
    return [str(c["name"]) for c in sorted(categories, key=lambda c: c["id"])]


def load_detector(root: Path, model: str | None = None) -> Detector:
    """The detector `model`: a registry name (default: the first), `<name>.int8`, or a `models:/` URI."""
    if model and model.startswith("models:/"):
        source, session = model, _session(_registry_model(root, model))
    else:
        path = model_path(root, model or detector_names()[0])
        source, session = shown_path(root, path), _session(str(path))
    shape = session.get_inputs()[0].shape  # [batch, 1, S, S]
    if len(shape) != 4 or shape[1] != 1 or not isinstance(shape[2], int) or shape[2] != shape[3]:
        raise InputError(f"{source}: input of shape {shape}; expected (batch, 1, S, S) gray pixels")
    return Detector(session, source, int(shape[2]), scene_class_names(root))


# ------------------------------------------------------------------------------------------- images


def read_gray(path: Path):
    """An image file as 8-bit gray (PIL mode L), as the scenes are read; one line if it cannot be."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I;16"):  # 16-bit gray: keep the high byte, not convert()'s clipping
                return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
            return image.convert("L")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: not a readable image ({type(err).__name__})") from err


def letterbox(gray, size: int) -> tuple[np.ndarray, float]:
    """(1, 1, size, size) float32 in [0, 1] and the scale: the image scaled (aspect kept) so its longer side is
    `size`, on the scenes' black background at the top left, so a box maps back by dividing by the scale."""
    from PIL import Image

    w, h = gray.size
    scale = size / max(w, h)
    if (w, h) != (size, size):
        gray = gray.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    canvas = np.zeros((size, size), dtype=np.float32)
    pixels = np.asarray(gray, dtype=np.float32) / 255.0
    canvas[: pixels.shape[0], : pixels.shape[1]] = pixels
    return canvas[None, None], scale


def detect(detector: Detector, path: Path, score_threshold: float) -> ImageDetections:
    """The detections on one image with score >= score_threshold, boxes in the image's own pixels."""
    gray = read_gray(path)
    x, scale = letterbox(gray, detector.input_size)
    inputs = {detector.session.get_inputs()[0].name: x}
    boxes, scores, labels, _ = detector.session.run(None, inputs)
    w, h = gray.size
    found = []
    for box, score, label in sorted(zip(boxes, scores, labels), key=lambda d: -float(d[1])):
        if float(score) < score_threshold:
            continue
        x1, y1, x2, y2 = (float(v) / scale for v in box)
        clipped = (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            continue  # wholly in the letterbox's padding: nothing of the image is in it
        found.append(Detection(clipped, int(label), detector.class_name(int(label)), float(score)))
    return ImageDetections(path, (w, h), found)


def format_detections(result: ImageDetections) -> str:
    w, h = result.size
    lines = [f"{result.path} ({w}x{h}): {len(result.detections)} detection(s)"]
    for d in result.detections:
        box = ", ".join(f"{v:.1f}" for v in d.box)
        lines.append(f"  {d.name:<10} {d.score:.3f}  [{box}]")
    return "\n".join(lines)


def draw_detections(result: ImageDetections, out: Path) -> Path:
    """The image with its boxes and "name score" labels, upscaled when small, as PNG at `out`."""
    from PIL import Image, ImageDraw

    from tasks.io import atomic_path

    image = read_gray(result.path).convert("RGB")
    k = max(1, DRAW_SIDE // max(image.size))
    if k > 1:
        image = image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    for d in result.detections:
        colour = COLOURS[d.label % len(COLOURS)]
        x1, y1, x2, y2 = (v * k for v in d.box)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=max(1, k // 2))
        draw.text((x1 + 2, max(0.0, y1 - 11)), f"{d.name} {d.score:.2f}", fill=colour)
    with atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
    return out


def output_paths(images: list[Path], out: Path) -> list[Path]:
    """<stem>.detections.png in `out` per image; a stem met twice gets its position too (a/x.png, b/x.png)."""
    stems = [p.stem for p in images]
    return [
        out / (f"{s}.detections.png" if stems.count(s) == 1 else f"{s}-{i}.detections.png") for i, s in enumerate(stems)
    ]
