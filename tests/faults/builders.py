"""Writers of bad user data for the fault suite: broken images, decompression bombs, Parquet and COCO files."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np


def png_bytes(height: int = 12, width: int = 12, seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, size=(height, width), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def truncated_png(height: int = 30, width: int = 44) -> bytes:
    """A whole header (width x height) and cut-short pixel data."""
    data = png_bytes(height, width)
    return data[: len(data) * 2 // 3]


def bomb_png(side: int = 20000) -> bytes:
    """A 1-bit grayscale PNG of side x side black pixels: a few kB on disk (zlib), huge once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------ images


def image_folder(root: Path, per_class: int = 4, classes: tuple[str, ...] = ("a", "b")) -> Path:
    """A valid folder source: one subfolder per class of small PNGs."""
    for k, name in enumerate(classes):
        for i in range(per_class):
            write(root / name / f"{i}.png", png_bytes(seed=10 * k + i))
    return root


def parquet_file(path: Path, columns: dict[str, Any], schema: Any = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns, schema=schema) if schema is not None else pa.table(columns)
    pq.write_table(table, path)
    return path


def good_parquet_columns(rows: int = 8) -> dict[str, list]:
    return {"image": [png_bytes(seed=i) for i in range(rows)], "label": [i % 2 for i in range(rows)]}


# ------------------------------------------------------------------------------------ COCO


def coco_dataset(root: Path, images: int = 10, width: int = 40, height: int = 30) -> tuple[Path, Path, dict]:
    """A valid COCO dataset under `root`: `images/` and the annotations as a dict (written by `write_coco`)."""
    folder = root / "images"
    records, annotations = [], []
    for i in range(1, images + 1):
        write(folder / f"{i:03d}.png", png_bytes(height, width, seed=i))
        records.append({"id": i, "file_name": f"{i:03d}.png", "width": width, "height": height})
        annotations.append({"id": 100 + i, "image_id": i, "category_id": 1, "bbox": [2.0, 3.0, 10.0, 8.0]})
    data = {"images": records, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    return folder, root / "annotations.json", data


def write_coco(path: Path, data: Any) -> Path:
    return write(path, json.dumps(data))
