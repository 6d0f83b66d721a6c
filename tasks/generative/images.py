"""Image data and its metric: the `images` stage (built-in digits, an image folder or a Parquet file,
stratified splits), the `fid_net` stage (the dataset's FID feature network and classifier, with the FID
floor and ceiling) and `FIDEvaluator`, which every generator stage scores its samples with.

The split contract is one Parquet file per split: `label` (int64), `pixels` (binary, C*H*W uint8 bytes
in C, H, W order) and `source` (where each image came from), with the shape and class names in the
schema metadata. Models see pixels as float in [-1, 1].
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import Tensor

from tasks.errors import InputError
from tasks.io import atomic_path, write_json
from tasks.layout import IMAGES_DIR, METRICS_DIR, PLOTS_DIR
from tasks.phases import in_phase
from tasks.spec import StageContext, StageSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


class ImageDataError(InputError):
    """Unusable input images; the message names the file (and the record). Always one line: a line break
    (from a file name, say) is written as its escape."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


@dataclass(frozen=True)
class ImagesConfig:
    """`params/images.yaml: images`: where the images come from, their size and the split."""

    source: Literal["builtin", "folder", "parquet"]  # builtin: scikit-learn's 8x8 digits (1,797 images)
    path: str  # folder: one subfolder per class; parquet: columns `image` (encoded bytes) and `label`
    size: int  # side in pixels after a bilinear resize; 0 keeps the source size (which must then be one size)
    channels: Literal[1, 3]  # 1: grayscale, 3: RGB
    val_fraction: float
    test_fraction: float
    split_seed: int

    def __post_init__(self) -> None:
        if self.source != "builtin" and not self.path:
            raise ValueError(f"path must name the {self.source} when source is {self.source!r}")
        if self.size < 0:
            raise ValueError(f"size must be >= 0 (0 keeps the source size), got {self.size}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {getattr(self, name)}")


@dataclass
class ImageSet:
    pixels: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64 in [0, K)
    classes: list[str]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.pixels[index], self.labels[index], self.classes, [self.sources[i] for i in index])


# ------------------------------------------------------------------------------------- reading


def resize_images(pixels: np.ndarray, size: int) -> np.ndarray:
    """(N, C, h, w) uint8 -> (N, C, size, size) uint8, bilinear (antialiased when shrinking)."""
    if size == 0 or pixels.shape[2:] == (size, size):
        return pixels
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float()
    y = F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < max(pixels.shape[2:])
    )
    return y.round().clamp(0, 255).to(torch.uint8).numpy()


def builtin_digits(size: int) -> ImageSet:
    """scikit-learn's digits: 8x8 with 17 gray levels (0..16), scaled to 0..255 and resized to `size`."""
    from tasks.digits import load_digit_images

    ink, labels = load_digit_images()  # (1797, 8, 8) in [0, 1]
    pixels = np.round(ink * 255).astype(np.uint8)[:, None]
    return ImageSet(
        resize_images(pixels, size),
        labels,
        [str(d) for d in range(10)],
        [f"sklearn.datasets.load_digits[{i}]" for i in range(len(labels))],
    )


def _decode(data: bytes | Path, channels: int, where: str) -> np.ndarray:
    """One image as (C, H, W) uint8, fully decoded inside the guard: a truncated file, a file that is no
    image and a decompression bomb (more pixels than PIL's MAX_IMAGE_PIXELS) are ImageDataErrors."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
                image.load()  # decode it all here, so a truncated file fails inside the guard
                array = np.array(image.convert("L" if channels == 1 else "RGB"))
    except UnidentifiedImageError as err:
        raise ImageDataError(f"{where}: not a readable image (not an image format Pillow knows)") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDataError(f"{where}: not a readable image (too many pixels: {err})") from err
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... for a bad file
        raise ImageDataError(f"{where}: not a readable image ({type(err).__name__}: {err})") from err
    return array[None] if channels == 1 else array.transpose(2, 0, 1)  # (C, H, W)


def _stack(arrays: list[np.ndarray], where: list[str], size: int) -> np.ndarray:
    if size:
        return np.concatenate([resize_images(a[None], size) for a in arrays])
    first = arrays[0].shape[1:]
    for array, name in zip(arrays, where):
        if array.shape[1:] != first:
            raise ImageDataError(
                f"{name}: image is {array.shape[2]}x{array.shape[1]} but {where[0]} is "
                f"{first[1]}x{first[0]}; set images.size to resize them to one size"
            )
    return np.stack(arrays)


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symbolic link followed, lies inside the (resolved) folder `root`."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError, ValueError):  # a link loop or an unusable name: not provably inside
        return False


def _refuse_outside(link: Path, folder: Path) -> ImageDataError:
    # Names the link only: where it points (and whether that exists) stays out of the message.
    return ImageDataError(
        f"{link}: a symbolic link that leads outside {folder}; images must lie inside the folder (copy them in)"
    )


def read_image_folder(path: Path, channels: int, size: int) -> ImageSet:
    if not path.is_dir():
        raise ImageDataError(f"{path}: no such folder (images.path, with source: folder)")
    root = path.resolve()
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ImageDataError(f"{path}: expected one subfolder of images per class, found none")
    for name in classes:
        if not _inside(path / name, root):
            raise _refuse_outside(path / name, path)
    files = [
        (f, k)
        for k, name in enumerate(classes)
        for f in sorted((path / name).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    empty = [name for name in classes if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in (path / name).iterdir())]
    if empty and len(empty) < len(classes):
        # A class without images would still take a label id: every model would learn a class it never sees.
        raise ImageDataError(f"{path / empty[0]}: class folder without image files; remove it or add images")
    if not files:
        raise ImageDataError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    for f, _ in files:
        if not _inside(f, root):
            raise _refuse_outside(f, path)
    arrays = [_decode(f, channels, str(f)) for f, _ in files]
    names = [str(f) for f, _ in files]
    return ImageSet(_stack(arrays, names, size), np.array([k for _, k in files], dtype=np.int64), classes, names)


def _is_image_column(kind: pa.DataType) -> bool:
    """Encoded bytes, or the Hugging Face struct {bytes, path} (only `bytes` is read); all-null columns pass
    here and are refused row by row, with the row named."""
    if pa.types.is_struct(kind):
        return kind.get_field_index("bytes") >= 0 and _is_image_column(kind.field("bytes").type)
    return any(
        check(kind)
        for check in (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary, pa.types.is_null)
    )


def read_image_parquet(path: Path, channels: int, size: int) -> ImageSet:
    if not path.is_file():
        raise ImageDataError(f"{path}: no such file (images.path, with source: parquet)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as err:  # not Parquet, or a damaged file
        problem = " ".join(str(err).split())  # Arrow's messages span lines
        raise ImageDataError(f"{path}: not a readable Parquet file ({type(err).__name__}: {problem})") from err
    for column in ("image", "label"):
        if column not in table.column_names:
            raise ImageDataError(f"{path}: missing column {column!r} (has {', '.join(table.column_names)})")
    kind = table.schema.field("image").type
    if not _is_image_column(kind):
        raise ImageDataError(
            f"{path}: column 'image' holds {kind}; it must hold encoded image bytes (binary) "
            "or {bytes, path} structs with the bytes filled in"
        )
    if table.num_rows == 0:
        raise ImageDataError(f"{path}: no rows; columns 'image' and 'label' need at least one image")
    arrays, names = [], []
    for row, value in enumerate(table.column("image").to_pylist()):
        where = f"{path}: row {row}"
        if isinstance(value, dict):  # the Hugging Face layout: {"bytes": ..., "path": ...}; `path` is never read
            if value.get("bytes") is None and value.get("path") is not None:
                raise ImageDataError(
                    f"{where}: column 'image' gives a path but no bytes; paths in the file are not read; "
                    "embed the image bytes in the file"
                )
            value = value.get("bytes")
        if not isinstance(value, bytes):
            raise ImageDataError(f"{where}: column 'image' must hold encoded image bytes, got {type(value).__name__}")
        arrays.append(_decode(value, channels, where))
        names.append(where)
    raw = table.column("label").to_pylist()
    if any(v is None for v in raw):
        raise ImageDataError(f"{path}: row {raw.index(None)}: missing label")
    classes = sorted({str(v) for v in raw}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    index = {name: k for k, name in enumerate(classes)}
    labels = np.array([index[str(v)] for v in raw], dtype=np.int64)
    return ImageSet(_stack(arrays, names, size), labels, classes, names)


SOURCES = {
    "builtin": lambda cfg, root: builtin_digits(cfg.size or 16),
    "folder": lambda cfg, root: read_image_folder(root / cfg.path, cfg.channels, cfg.size),
    "parquet": lambda cfg, root: read_image_parquet(root / cfg.path, cfg.channels, cfg.size),
}


def stratified_split(labels: np.ndarray, cfg: ImagesConfig) -> dict[str, np.ndarray]:
    """Train/val/test indices with every class in the same proportions in each split."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    if counts.min() < 3:
        raise ImageDataError(
            f"class {int(counts.argmin())} has {counts.min()} image(s); each class needs >= 3 "
            "to appear in train, val and test"
        )
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=cfg.test_fraction, stratify=labels, random_state=cfg.split_seed)
    val_share = cfg.val_fraction / (1 - cfg.test_fraction)
    train_idx, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=cfg.split_seed)
    return {"train": np.sort(train_idx), "val": np.sort(val), "test": np.sort(test)}


def split_table(images: ImageSet) -> pa.Table:
    n, c, h, w = images.pixels.shape
    flat = images.pixels.reshape(n, -1)
    table = pa.table(
        {
            "label": pa.array(images.labels, pa.int64()),
            "pixels": pa.array([row.tobytes() for row in flat], pa.binary()),
            "source": pa.array(images.sources, pa.string()),
        }
    )
    meta = {
        "kiln.channels": str(c),
        "kiln.height": str(h),
        "kiln.width": str(w),
        "kiln.classes": json.dumps(images.classes),
    }
    return table.replace_schema_metadata(meta)


@in_phase("loading")
def read_images(root: Path, split: str) -> ImageSet:
    path = root / IMAGES_DIR / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the images stage first")
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    shape = (int(meta["kiln.channels"]), int(meta["kiln.height"]), int(meta["kiln.width"]))
    blob = b"".join(table.column("pixels").to_pylist())
    pixels = np.frombuffer(blob, dtype=np.uint8).reshape(len(table), *shape).copy()
    return ImageSet(
        pixels,
        table.column("label").to_numpy().astype(np.int64),
        json.loads(meta["kiln.classes"]),
        table.column("source").to_pylist(),
    )


def images_digest(root: Path) -> str:
    """What every image model depends on in the images stage's output: sha256 (16 hex) of the channels, height,
    width, number of classes and class names (the train split's schema metadata; the splits share them).
    A trained model records it; a stage that loads one refuses it when the data now say otherwise."""
    path = root / IMAGES_DIR / "train.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the images stage first")
    meta = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
    classes = json.loads(meta["kiln.classes"])
    fields = {
        "channels": int(meta["kiln.channels"]),
        "height": int(meta["kiln.height"]),
        "width": int(meta["kiln.width"]),
        "num_classes": len(classes),
        "classes": [str(c) for c in classes],
    }
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def to_model_range(pixels: np.ndarray | Tensor) -> Tensor:
    """uint8 pixels -> float in [-1, 1]."""
    return torch.as_tensor(pixels).float() / 127.5 - 1.0


def to_pixels(x: Tensor) -> np.ndarray:
    """Model-range images (any float range) -> uint8 pixels, clipped."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def image_grid(pixels: np.ndarray, columns: int) -> np.ndarray:
    """(N, C, H, W) uint8 -> one (rows * (H + 1) + 1, columns * (W + 1) + 1[, 3]) uint8 picture, 1 px gaps."""
    n, c, h, w = pixels.shape
    rows = -(-n // columns)
    grid = np.full((c, rows * (h + 1) + 1, columns * (w + 1) + 1), 128, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, columns)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = pixels[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def write_png(array: np.ndarray, path: Path, upscale: int = 1) -> Path:
    from PIL import Image

    image = Image.fromarray(array)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def class_grid(images: ImageSet, per_class: int) -> np.ndarray:
    """A grid with one row per class: the first `per_class` images of each."""
    rows = [images.pixels[np.flatnonzero(images.labels == k)[:per_class]] for k in range(len(images.classes))]
    return image_grid(np.concatenate(rows), per_class)


# ------------------------------------------------------------------------------ images stage


@dataclass(frozen=True)
class ImagesInputs:
    images: ImagesConfig


@task(name="images", cache_policy=NO_CACHE)
def images_task(ctx: StageContext, inputs: ImagesInputs) -> dict[str, float]:
    root, cfg, run = ctx.root, inputs.images, ctx.run
    images = SOURCES[cfg.source](cfg, root)
    splits = {name: images.subset(index) for name, index in stratified_split(images.labels, cfg).items()}
    out = root / IMAGES_DIR
    with atomic_path(out, directory=True) as tmp:
        for name, part in splits.items():
            pq.write_table(split_table(part), tmp / f"{name}.parquet")
    _, c, h, w = images.pixels.shape
    metrics: dict[str, float] = {
        "classes": float(len(images.classes)),
        "channels": float(c),
        "height": float(h),
        "width": float(w),
        **{f"{s}_images": float(len(p)) for s, p in splits.items()},
    }
    write_json(root / METRICS_DIR / "images.json", metrics)
    for name in ("train", "test"):
        frame = pd.DataFrame({"label": splits[name].labels, "source": splits[name].sources})
        run.log_input(frame, source=str(out / f"{name}.parquet"), name=f"images-{name}", context=name)
    grid = root / PLOTS_DIR / "images_test_grid.png"
    write_png(class_grid(splits["test"], per_class=10), grid, upscale=2)
    run.log_artifact(grid, "samples")
    run.log_metrics(metrics)
    print(
        f"images: {len(images)} images of {c}x{h}x{w}, {len(images.classes)} classes; "
        + ", ".join(f"{s} {len(p)}" for s, p in splits.items())
    )
    return metrics


SPEC = StageSpec(name="images", family="generative", task=images_task, inputs=ImagesInputs, seeded=False)
