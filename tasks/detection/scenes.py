"""Detection family data: the `scenes` stage's compute (no Prefect, no MLflow here).

Built-in scenes are composed from scikit-learn's 8x8 digits: the 1797 digits are first split into
disjoint train/val/test pools (stratified, seeded), so test scenes show digits never seen in training.
Each scene is a gray canvas with a few upscaled digits (boxes: the exact ink extent), background clutter
that is not a digit (lines, noise patches, digit fragments, digits too small to count) and pixel noise.
A user COCO dataset is validated whole, split by image and written in the same layout:

    <out>/<split>/images/<id:06d>.png     8-bit grayscale, `canvas` x `canvas`
    <out>/<split>/annotations.json        COCO: info, images, annotations, categories

Ids start at 1 (COCO's convention; pycocotools' matcher reads a ground-truth id 0 as "unmatched").
Boxes are COCO xywh in continuous pixel coordinates: ink in pixel columns c0..c1 gives x = c0,
w = c1 - c0 + 1 (as models/detection/boxes.py reads them).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.digits import load_digit_images
from tasks.errors import InputError
from tasks.io import atomic_path
from tasks.layout import SPLITS
from tasks.spec import StageContext, StageSpec

INK_LEVEL = 64  # a pixel (uint8) is ink at >= this level; boxes are the tight extent of such pixels
PLACE_TRIES = 50  # positions tried per digit before it is dropped from the scene
SCENE_TRIES = 20  # scenes redrawn when fewer than min_digits fit
DIGIT_CATEGORIES = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]


class ScenesError(InputError):
    """Unusable detection data: the message names the file (or config field) and the record at fault.
    Always one line: a line break (from a file name, say) is written as its escape."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


@dataclass(frozen=True)
class ScenesConfig:
    """`params/detection.yaml: scenes`: where the detection data comes from and how scenes are drawn.

    Defaults are the default profile's values (a small ThunderNet reaches AP50 >= 0.5 on a few minutes of
    CPU). With source "coco" the image counts and digit/scale/clutter fields are unused: the user's images
    are split by image with val_fraction/test_fraction and letterboxed onto `canvas` x `canvas`.
    """

    source: Literal["builtin", "coco"] = "builtin"
    coco_images: str = ""  # with source coco: the folder the annotations' file_name values are relative to
    coco_annotations: str = ""  # with source coco: a COCO JSON file
    canvas: int = 128  # side of the square canvas in pixels; a multiple of 32 (the detectors' stride)
    train_images: int = 1500
    val_images: int = 200
    test_images: int = 300
    min_digits: int = 1  # digits per scene, drawn uniformly in [min_digits, max_digits]
    max_digits: int = 6
    min_scale: int = 16  # side of the upscaled 8x8 digit in pixels (its ink box is ~3/4 of that)
    max_scale: int = 40
    max_overlap: float = 0.2  # max IoU between two digits' boxes in a scene
    clutter: int = 3  # non-digit distractors per scene
    noise: float = 0.05  # std of gaussian pixel noise on [0, 1]
    seed: int = 0
    val_fraction: float = 0.15  # builtin: share of the 1797 digits in the val pool; coco: of the images
    test_fraction: float = 0.15

    def __post_init__(self) -> None:
        if self.source not in ("builtin", "coco"):
            raise ValueError(f"source must be 'builtin' or 'coco', got {self.source!r}")
        if self.source == "coco":
            for name in ("coco_images", "coco_annotations"):
                if not getattr(self, name):
                    raise ValueError(f"{name} must name a path when source is 'coco'")
        if self.canvas < 32 or self.canvas % 32:
            raise ValueError(f"canvas must be a positive multiple of 32, got {self.canvas}")
        for name in ("train_images", "val_images", "test_images", "min_digits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_digits < self.min_digits:
            raise ValueError(f"max_digits must be >= min_digits ({self.min_digits}), got {self.max_digits}")
        if self.min_scale < 8:
            raise ValueError(f"min_scale must be >= 8 (the digits' native size), got {self.min_scale}")
        if not self.min_scale <= self.max_scale <= self.canvas:
            raise ValueError(
                f"max_scale must be in [min_scale, canvas] = [{self.min_scale}, {self.canvas}], got {self.max_scale}"
            )
        if not 0.0 <= self.max_overlap < 1.0:
            raise ValueError(f"max_overlap must be in [0, 1), got {self.max_overlap}")
        if self.clutter < 0:
            raise ValueError(f"clutter must be >= 0, got {self.clutter}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {getattr(self, name)}")

    def split_images(self, split: str) -> int:
        return {"train": self.train_images, "val": self.val_images, "test": self.test_images}[split]


# ------------------------------------------------------------------------------- digit pools


def digit_pools(labels: np.ndarray, cfg: ScenesConfig) -> dict[str, np.ndarray]:
    """Disjoint train/val/test index pools into the digits, stratified by class and seeded."""
    rng = np.random.default_rng([cfg.seed, 0x9001])
    pools: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, round(len(idx) * cfg.test_fraction))
        n_val = max(1, round(len(idx) * cfg.val_fraction))
        pools["test"].append(idx[:n_test])
        pools["val"].append(idx[n_test : n_test + n_val])
        pools["train"].append(idx[n_test + n_val :])
    return {s: np.sort(np.concatenate(parts)) for s, parts in pools.items()}


# ------------------------------------------------------------------------------ composition


def _taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1-D linear interpolation with half-pixel centres (align_corners=False): for each output position the two
    input indices it reads and their float32 weights."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    return lo, hi, np.float32(1.0) - frac, frac


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a (h, w) float image, equal to torch's F.interpolate(mode="bilinear",
    align_corners=False) without antialiasing (the tests hold the two equal).

    Two taps per output pixel, weighted elementwise: the same float32 operations in the same order on every
    CPU. The interpolation-matrix form (`resize_bilinear_ref`) goes through BLAS, whose kernel numpy picks per
    CPU; an FMA kernel rounds differently, which moved 9 pixels of 2,000 scenes by one gray level between
    machines and made the scenes' bytes differ."""
    image = image.astype(np.float32)
    lo, hi, w_lo, w_hi = _taps(height, image.shape[0])
    rows = image[lo] * w_lo[:, None] + image[hi] * w_hi[:, None]  # (height, w)
    lo, hi, w_lo, w_hi = _taps(width, image.shape[1])
    return rows[:, lo] * w_lo + rows[:, hi] * w_hi  # (height, width)


def resize_bilinear_ref(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`resize_bilinear` as two matrix products with the (n_out, n_in) interpolation matrices."""

    def matrix(n_out: int, n_in: int) -> np.ndarray:
        lo, hi, w_lo, w_hi = _taps(n_out, n_in)
        m = np.zeros((n_out, n_in), dtype=np.float32)
        np.add.at(m, (np.arange(n_out), lo), w_lo)
        np.add.at(m, (np.arange(n_out), hi), w_hi)
        return m

    return matrix(height, image.shape[0]) @ image.astype(np.float32) @ matrix(width, image.shape[1]).T


def ink_box(patch: np.ndarray) -> tuple[int, int, int, int] | None:
    """The tight (x, y, w, h) of the pixels >= INK_LEVEL of a uint8 patch; None when it has no ink."""
    mask = patch >= INK_LEVEL
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of one box a (4,) against boxes b (n, 4), both xywh."""
    ix = np.clip(np.minimum(a[0] + a[2], b[:, 0] + b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[1] + a[3], b[:, 1] + b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = ix * iy
    return inter / (a[2] * a[3] + b[:, 2] * b[:, 3] - inter)


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W) uint8
    boxes: np.ndarray  # (n, 4) float64 xywh, the tight ink extent of each digit
    labels: np.ndarray  # (n,) int64 digit 0..9
    digit_index: np.ndarray  # (n,) int64 index into load_digits(), for provenance and the pool test


def _digit_patch(digit: np.ndarray, rng: np.random.Generator, lo: int, hi: int) -> np.ndarray:
    """A digit upscaled to a square-ish size in [lo, hi] (aspect within 4:5..5:4) at a random contrast,
    quantised to uint8 so its ink box is exact in the written PNG."""
    side = rng.uniform(lo, hi)
    aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    h = int(np.clip(round(side * math.sqrt(aspect)), lo, hi))
    w = int(np.clip(round(side / math.sqrt(aspect)), lo, hi))
    contrast = rng.uniform(0.7, 1.0)
    return np.round(np.clip(resize_bilinear(digit, h, w) * contrast, 0, 1) * 255).astype(np.uint8)


def _place_digits(rng: np.random.Generator, digits: np.ndarray, pool: np.ndarray, cfg: ScenesConfig):
    canvas = np.zeros((cfg.canvas, cfg.canvas), dtype=np.uint8)
    boxes: list[np.ndarray] = []
    chosen: list[int] = []
    for _ in range(int(rng.integers(cfg.min_digits, cfg.max_digits + 1))):
        index = int(rng.choice(pool))
        patch = _digit_patch(digits[index], rng, cfg.min_scale, cfg.max_scale)
        inner = ink_box(patch)
        if inner is None:
            continue
        h, w = patch.shape
        for _ in range(PLACE_TRIES):
            x0, y0 = int(rng.integers(0, cfg.canvas - w + 1)), int(rng.integers(0, cfg.canvas - h + 1))
            box = np.array([x0 + inner[0], y0 + inner[1], inner[2], inner[3]], dtype=np.float64)
            if not boxes or iou_xywh(box, np.stack(boxes)).max() <= cfg.max_overlap:
                region = canvas[y0 : y0 + h, x0 : x0 + w]
                np.maximum(region, patch, out=region)  # ink over background
                boxes.append(box)
                chosen.append(index)
                break
    return canvas, boxes, chosen


def _draw_clutter(rng: np.random.Generator, digits: np.ndarray, pool: np.ndarray, cfg: ScenesConfig) -> np.ndarray:
    """A float [0, 1] layer of `cfg.clutter` distractors, none of which reads as a whole digit."""
    size = cfg.canvas
    layer = np.zeros((size, size), dtype=np.float32)

    def paste(patch: np.ndarray) -> None:
        h, w = min(patch.shape[0], size), min(patch.shape[1], size)
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        region = layer[y0 : y0 + h, x0 : x0 + w]
        np.maximum(region, patch[:h, :w], out=region)

    for _ in range(cfg.clutter):
        kind = rng.choice(["line", "patch", "fragment", "tiny"], p=[0.35, 0.2, 0.3, 0.15])
        level = rng.uniform(0.35, 1.0)
        if kind == "line":  # a thin stroke, longer and straighter than any digit's
            length = rng.uniform(0.15, 0.6) * size
            angle = rng.uniform(0, math.pi)
            x, y = rng.uniform(0, size, 2)
            t = np.linspace(0.0, 1.0, int(length * 2) + 2)
            xs = np.round(x + t * length * math.cos(angle)).astype(np.int64)
            ys = np.round(y + t * length * math.sin(angle)).astype(np.int64)
            thick = int(rng.integers(1, 3))
            xs, ys = np.concatenate([xs + d for d in range(thick)]), np.concatenate([ys] * thick)
            keep = (xs >= 0) & (xs < size) & (ys >= 0) & (ys < size)
            np.maximum.at(layer, (ys[keep], xs[keep]), np.float32(level))
        elif kind == "patch":  # a small blob of speckle
            h, w = rng.integers(2, 7, size=2)
            paste(rng.uniform(0, level, size=(h, w)).astype(np.float32))
        elif kind == "fragment":  # at most a quarter of a digit, at digit scale: a stroke, not a digit
            digit = digits[int(rng.choice(pool))]
            ch, cw = rng.integers(2, 5, size=2)
            r0, c0 = int(rng.integers(0, 9 - ch)), int(rng.integers(0, 9 - cw))
            factor = rng.uniform(cfg.min_scale, cfg.max_scale) / 8
            crop = digit[r0 : r0 + ch, c0 : c0 + cw]
            paste(resize_bilinear(crop, max(2, round(ch * factor)), max(2, round(cw * factor))) * level)
        else:  # a whole digit far below min_scale: texture, not an object to detect
            digit = digits[int(rng.choice(pool))]
            side = int(rng.integers(3, max(4, cfg.min_scale // 3) + 1))
            paste(resize_bilinear(digit, side, side) * level)
    return layer


def compose_scene(
    seed: list[int], digits: np.ndarray, labels: np.ndarray, pool: np.ndarray, cfg: ScenesConfig
) -> Scene:
    """One scene from digits[pool]. The digits and the clutter/noise draw from separate streams of
    `seed`, so clutter and noise never move a box."""
    rng = np.random.default_rng([*seed, 0])
    for _ in range(SCENE_TRIES):
        ink, boxes, chosen = _place_digits(rng, digits, pool, cfg)
        if len(boxes) >= cfg.min_digits:
            break
    else:
        raise ScenesError(
            f"scenes: could not place min_digits={cfg.min_digits} digits of up to "
            f"max_scale={cfg.max_scale} px on a canvas={cfg.canvas} canvas with "
            f"max_overlap={cfg.max_overlap}; lower min_digits/max_scale or raise canvas"
        )
    image = ink.astype(np.float32) / 255.0
    if cfg.clutter or cfg.noise:
        other = np.random.default_rng([*seed, 1])
        image = np.maximum(image, _draw_clutter(other, digits, pool, cfg))
        if cfg.noise:
            image = image + other.normal(0.0, cfg.noise, size=image.shape).astype(np.float32)
    image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    index = np.array(chosen, dtype=np.int64)
    return Scene(image, np.stack(boxes).reshape(-1, 4), labels[index], index)


def build_split(cfg: ScenesConfig, split: str, digits: np.ndarray, labels: np.ndarray, pool: np.ndarray) -> list[Scene]:
    k = SPLITS.index(split)
    return [compose_scene([cfg.seed, k, i], digits, labels, pool, cfg) for i in range(cfg.split_images(split))]


def scenes_to_coco(scenes: list[Scene], split: str, cfg: ScenesConfig) -> dict[str, Any]:
    images, annotations = [], []
    for image_id, scene in enumerate(scenes, start=1):
        images.append(
            {"id": image_id, "file_name": f"images/{image_id:06d}.png", "width": cfg.canvas, "height": cfg.canvas}
        )
        for box, label, index in zip(scene.boxes, scene.labels, scene.digit_index):
            x, y, w, h = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "digit_index": int(index),
                }
            )
    return {
        "info": {
            "description": "Kiln digit scenes from scikit-learn's digits",
            "split": split,
            "seed": cfg.seed,
            "source": "builtin",
        },
        "images": images,
        "annotations": annotations,
        "categories": DIGIT_CATEGORIES,
    }


# -------------------------------------------------------------------------------- COCO input


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def _open_image(path: Path):
    """The PIL image at `path`, fully decoded (so a truncated file fails here, not later); a decompression
    bomb (more pixels than PIL's MAX_IMAGE_PIXELS, the warning level included) raises too."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(path)
        try:
            image.load()
        except BaseException:
            image.close()
            raise
    return image


def _image_problem(err: BaseException) -> str:
    from PIL import Image, UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):
        return "not an image format Pillow knows"
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too many pixels: {err}"
    return f"{type(err).__name__}: {err}"


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symbolic link followed, lies inside the resolved folder `root`. Decided
    from the path alone, the same whether or not a file is there."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError, ValueError):  # a link loop or an unusable name: not provably inside
        return False


def validate_coco(data: dict, images_dir: Path | None, where: str) -> None:
    """Raise ScenesError (a ValueError) naming `where` and the record at the first problem: missing keys,
    wrong types, duplicate ids, annotations on unknown images or categories, boxes with non-positive size
    or outside their image, a dataset without annotations, and (with `images_dir`) file names that lead
    outside `images_dir` (`..`, absolute, or a symbolic link out; refused before the file is looked at, so
    the message is the same whether something is there or not) and image files that are missing,
    unreadable (truncated, not an image, a decompression bomb) or not of the declared size."""

    def fail(record: str, problem: str) -> None:
        raise ScenesError(f"{where}: {record}: {problem}")

    if not isinstance(data, dict):
        fail("<file>", f"expected a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            fail("<file>", f"missing key {key!r}")
        if not isinstance(data[key], list):
            fail(key, f"expected a list, got {type(data[key]).__name__}")

    def records(key: str, required: tuple[str, ...]):
        seen: dict[int, int] = {}
        for i, record in enumerate(data[key]):
            if not isinstance(record, dict):
                fail(f"{key}[{i}]", f"expected an object, got {type(record).__name__}")
            name = f"{key}[{i}] (id {record.get('id')!r})"
            for field in required:
                if field not in record:
                    fail(name, f"missing key {field!r}")
            if not _is_int(record["id"]):
                fail(name, f"id must be an integer, got {record['id']!r}")
            if record["id"] in seen:
                fail(name, f"duplicate id {record['id']} (also {key}[{seen[record['id']]}])")
            seen[record["id"]] = i
            yield name, record

    categories = set()
    for name, cat in records("categories", ("id", "name")):
        if not isinstance(cat["name"], str):
            fail(name, f"name must be a string, got {cat['name']!r}")
        categories.add(cat["id"])
    if not categories:
        fail("categories", "no categories")

    root = None if images_dir is None else Path(images_dir).resolve()
    sizes: dict[int, tuple[int, int]] = {}
    for name, img in records("images", ("id", "file_name", "width", "height")):
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            fail(name, f"file_name must be a non-empty string, got {img['file_name']!r}")
        for field in ("width", "height"):
            if not _is_int(img[field]) or img[field] < 1:
                fail(name, f"{field} must be a positive integer, got {img[field]!r}")
        if images_dir is not None:
            path = images_dir / img["file_name"]
            if not _inside(path, root):
                fail(name, f"file_name {img['file_name']!r} leads outside the images folder {images_dir}")
            if not path.is_file():
                fail(name, f"image file {path} is missing")
            try:
                with _open_image(path) as im:
                    actual = im.size
            except Exception as err:  # Pillow raises several types for unreadable files
                fail(name, f"image file {path} is not a readable image ({_image_problem(err)})")
            if actual != (img["width"], img["height"]):
                fail(
                    name,
                    f"image file {path} is {actual[0]}x{actual[1]}, the record says {img['width']}x{img['height']}",
                )
        sizes[img["id"]] = (img["width"], img["height"])
    if not sizes:
        fail("images", "no images")

    for name, ann in records("annotations", ("id", "image_id", "category_id", "bbox")):
        for field in ("image_id", "category_id"):
            if not _is_int(ann[field]):
                fail(name, f"{field} must be an integer, got {ann[field]!r}")
        if ann["image_id"] not in sizes:
            fail(name, f"image_id {ann['image_id']!r} is not an image id")
        if ann["category_id"] not in categories:
            fail(name, f"category_id {ann['category_id']!r} is not a category id")
        box = ann["bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            fail(name, f"bbox must be [x, y, width, height] numbers, got {box!r}")
        x, y, w, h = box
        if w <= 0 or h <= 0:
            fail(name, f"bbox {box} has non-positive width or height")
        width, height = sizes[ann["image_id"]]
        tol = 1e-3  # float round-off in exported boxes, not a box that leaves the image
        if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
            fail(name, f"bbox {box} lies outside its image {ann['image_id']} ({width}x{height})")
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
            fail(name, f"iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
        if "area" in ann and (not _is_number(ann["area"]) or ann["area"] < 0):
            fail(name, f"area must be a number >= 0, got {ann['area']!r}")
    if not data["annotations"]:
        fail("annotations", "no annotations; the detectors need boxes to train on and to score")


def read_coco(path: Path, images_dir: Path | None = None) -> dict:
    """A COCO JSON file, parsed and validated (image files too, when `images_dir` is given)."""
    if not path.is_file():
        raise ScenesError(f"{path}: no such COCO annotations file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ScenesError(f"{path}: not valid JSON: {err}") from err
    validate_coco(data, images_dir, str(path))
    return data


def split_coco_images(data: dict, cfg: ScenesConfig, where: str) -> dict[str, list[dict]]:
    """Images split by a seeded shuffle with the configured fractions, each split in source-id order."""
    images = sorted(data["images"], key=lambda im: im["id"])
    order = np.random.default_rng([cfg.seed, 0xC0C0]).permutation(len(images))
    n_test, n_val = round(len(images) * cfg.test_fraction), round(len(images) * cfg.val_fraction)
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    boxed = {ann["image_id"] for ann in data["annotations"] if not ann.get("iscrowd", 0)}
    for split in SPLITS:
        if not len(parts[split]):
            raise ScenesError(
                f"{where}: the {split} split is empty ({len(images)} images with val_fraction="
                f"{cfg.val_fraction}, test_fraction={cfg.test_fraction}); give more images"
            )
        if not any(images[i]["id"] in boxed for i in parts[split]):
            # The detectors train on train, select on val and score on test: each needs ground-truth boxes.
            raise ScenesError(
                f"{where}: the {split} split's {len(parts[split])} image(s) have no annotations (with iscrowd 0); "
                f"train, val and test each need boxes: annotate more images or change seed, val_fraction or "
                f"test_fraction"
            )
    return {split: [images[i] for i in sorted(parts[split])] for split in SPLITS}


def _letterbox(path: Path, canvas: int) -> tuple[np.ndarray, float, float]:
    """The image as grayscale, scaled so its longer side is `canvas` and padded right/bottom with 0;
    and the x, y scale factors its boxes take."""
    from PIL import Image

    try:
        with _open_image(path) as im:
            gray = im.convert("L")
    except Exception as err:  # validated before, so only a file changed since lands here
        raise ScenesError(f"{path}: not a readable image ({_image_problem(err)})") from err
    w, h = gray.size
    scale = canvas / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.zeros((canvas, canvas), dtype=np.uint8)
    out[:nh, :nw] = np.asarray(gray.resize((nw, nh), Image.Resampling.BILINEAR))
    return out, nw / w, nh / h


def _coco_split(
    data: dict, images: list[dict], images_dir: Path, split: str, cfg: ScenesConfig, source: str, write_to: Path
) -> dict[str, Any]:
    categories = sorted(data["categories"], key=lambda c: c["id"])
    by_image: dict[int, list[dict]] = {}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann)
    out_images, out_annotations = [], []
    for image_id, img in enumerate(images, start=1):
        pixels, sx, sy = _letterbox(images_dir / img["file_name"], cfg.canvas)
        _write_png(pixels, write_to / "images" / f"{image_id:06d}.png")
        out_images.append(
            {
                "id": image_id,
                "file_name": f"images/{image_id:06d}.png",
                "width": cfg.canvas,
                "height": cfg.canvas,
                "source_id": img["id"],
                "source_file": img["file_name"],
            }
        )
        for ann in by_image.get(img["id"], []):
            x, y, w, h = ann["bbox"]
            x, y = min(max(x, 0.0), img["width"]), min(max(y, 0.0), img["height"])
            w, h = min(w, img["width"] - x), min(h, img["height"] - y)  # round-off within the tolerance
            area = ann.get("area", w * h)
            out_annotations.append(
                {
                    "id": len(out_annotations) + 1,
                    "image_id": image_id,
                    "category_id": ann["category_id"],
                    "bbox": [x * sx, y * sy, w * sx, h * sy],
                    "area": float(area) * sx * sy,
                    "iscrowd": int(ann.get("iscrowd", 0)),
                    "source_id": ann["id"],
                }
            )
    return {
        "info": {
            "description": "Kiln scenes from a user COCO dataset",
            "split": split,
            "seed": cfg.seed,
            "source": source,
        },
        "images": out_images,
        "annotations": out_annotations,
        "categories": [{"id": c["id"], "name": c["name"]} for c in categories],
    }


# ------------------------------------------------------------------------------------ output


def _write_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def split_stats(coco: dict) -> dict[str, float]:
    boxes = np.array([a["bbox"] for a in coco["annotations"]], dtype=np.float64).reshape(-1, 4)
    n = len(coco["images"])
    side = np.sqrt(boxes[:, 2] * boxes[:, 3])
    return {
        "images": float(n),
        "boxes": float(len(boxes)),
        "boxes_per_image": len(boxes) / n if n else 0.0,
        "mean_box_size": float(side.mean()) if len(side) else 0.0,  # sqrt(w * h), pixels
        "mean_box_width": float(boxes[:, 2].mean()) if len(boxes) else 0.0,
        "mean_box_height": float(boxes[:, 3].mean()) if len(boxes) else 0.0,
    }


def _resolve(root: Path, path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else Path(root) / path


def write_scenes(cfg: ScenesConfig, out_dir: Path, root: Path) -> dict[str, dict[str, float]]:
    """Write every split under `out_dir` in one atomic swap; return per-split stats. A user dataset is
    validated whole before anything is written."""
    out_dir = Path(out_dir)
    if cfg.source == "builtin":
        digits, labels = load_digit_images()
        pools = digit_pools(labels, cfg)
        scenes = {split: build_split(cfg, split, digits, labels, pools[split]) for split in SPLITS}
        with atomic_path(out_dir, directory=True) as tmp:
            stats = {}
            for split in SPLITS:
                coco = scenes_to_coco(scenes[split], split, cfg)
                for image_id, scene in enumerate(scenes[split], start=1):
                    _write_png(scene.image, tmp / split / "images" / f"{image_id:06d}.png")
                _write_json(tmp / split / "annotations.json", coco)
                stats[split] = split_stats(coco)
        return stats

    annotations = _resolve(root, cfg.coco_annotations)
    images_dir = _resolve(root, cfg.coco_images)
    if not images_dir.is_dir():
        raise ScenesError(f"{images_dir}: coco_images names no folder")
    data = read_coco(annotations, images_dir)
    parts = split_coco_images(data, cfg, str(annotations))
    with atomic_path(out_dir, directory=True) as tmp:
        stats = {}
        for split in SPLITS:
            coco = _coco_split(data, parts[split], images_dir, split, cfg, str(annotations), tmp / split)
            _write_json(tmp / split / "annotations.json", coco)
            stats[split] = split_stats(coco)
    return stats


def _write_json(path: Path, data: Any) -> None:
    # Inside the stage's atomic folder already: a plain write (the folder is renamed whole).
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def labels_digest(coco: dict) -> str:
    """What a detector depends on in a split's labels: sha256 (first 16 hex digits) of its categories' ids and
    names, sorted by id (their order in the file does not matter; a renamed or renumbered one does). A trained
    detector records it; the stages that use one refuse it when the scenes now say otherwise."""
    import hashlib

    categories = sorted([int(c["id"]), str(c["name"])] for c in coco["categories"])
    return hashlib.sha256(json.dumps(categories, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------ loader


def load_split(split_dir: Path) -> tuple[np.ndarray, list[dict[str, np.ndarray]], dict]:
    """A written split for training and evaluation: images (N, H, W) uint8 and per image
    {"boxes": (n, 4) float32 xyxy pixels, "labels": (n,) int64 category index 0..C-1} (crowd boxes left
    out), both ordered by image id, and the parsed COCO dict (the evaluation's ground truth)."""
    from PIL import Image

    split_dir = Path(split_dir)
    path = split_dir / "annotations.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the scenes stage first (dvc repro scenes)")
    coco = read_coco(path, split_dir)
    category_index = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    records = sorted(coco["images"], key=lambda im: im["id"])
    shapes = {(im["height"], im["width"]) for im in records}
    if len(shapes) != 1:
        raise ScenesError(f"{path}: images: sizes differ ({sorted(shapes)}); a split has one image size")
    height, width = shapes.pop()
    images = np.empty((len(records), height, width), dtype=np.uint8)
    for i, im in enumerate(records):
        with Image.open(split_dir / im["file_name"]) as png:
            images[i] = np.asarray(png.convert("L"))
    by_image: dict[int, list[dict]] = {im["id"]: [] for im in records}
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
        if not ann.get("iscrowd", 0):
            by_image[ann["image_id"]].append(ann)
    targets = []
    for im in records:
        anns = by_image[im["id"]]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        targets.append(
            {
                "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                "labels": np.array([category_index[a["category_id"]] for a in anns], dtype=np.int64),
            }
        )
    return images, targets, coco


# ------------------------------------------------------------------------------------- stage task


@dataclass(frozen=True)
class ScenesInputs:
    scenes: ScenesConfig


@task(name="scenes", cache_policy=NO_CACHE)
def scenes_task(ctx: StageContext, inputs: ScenesInputs) -> dict[str, float]:
    root, cfg, run = ctx.root, inputs.scenes, ctx.run
    from tasks.io import write_json
    from tasks.layout import METRICS_DIR, SCENES_DIR

    stats = write_scenes(cfg, root / SCENES_DIR, root)
    metrics = {f"{split}_{key}": float(value) for split, values in stats.items() for key, value in values.items()}
    write_json(root / METRICS_DIR / "scenes.json", metrics)
    for split in SPLITS:
        run.log_artifact(root / SCENES_DIR / split / "annotations.json", f"scenes/{split}")
    run.log_metrics(metrics)
    return metrics


SPEC = StageSpec(name="scenes", family="detection", task=scenes_task, inputs=ScenesInputs, seeded=False)
