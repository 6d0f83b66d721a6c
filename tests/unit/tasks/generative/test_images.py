"""The image data readers, the split contract and the FID network helpers (tasks/generative/images.py)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from models.generative.fid import InceptionV3Pool3
from models.generative.fid_net import FeatureExtractor, FIDNet, FIDNetConfig
from tasks.generative.fid import FIDConfig, fid_extractor
from tasks.generative.images import (
    ImageDataError,
    ImagesConfig,
    builtin_digits,
    image_grid,
    read_image_folder,
    read_image_parquet,
    resize_images,
    split_table,
    stratified_split,
    to_model_range,
    to_pixels,
)


def images_config(**overrides) -> ImagesConfig:
    base = dict(source="builtin", path="", size=16, channels=1, val_fraction=0.15, test_fraction=0.2, split_seed=0)
    return ImagesConfig(**{**base, **overrides})


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_builtin_digits_are_the_sklearn_digits_resized():
    from sklearn.datasets import load_digits

    raw = load_digits()
    native = builtin_digits(8)
    assert native.pixels.shape == (1797, 1, 8, 8) and native.pixels.dtype == np.uint8
    # 17 gray levels 0..16 scaled to 0..255 exactly
    np.testing.assert_array_equal(native.pixels[:, 0], np.round(raw.images / 16 * 255).astype(np.uint8))
    np.testing.assert_array_equal(native.labels, raw.target)
    big = builtin_digits(16)
    assert big.pixels.shape == (1797, 1, 16, 16)
    # bilinear upsampling keeps the mean ink of each image (up to rounding and the border clamp)
    assert np.abs(big.pixels.mean(axis=(1, 2, 3)) - native.pixels.mean(axis=(1, 2, 3))).max() < 6


def test_stratified_split_is_disjoint_complete_and_balanced():
    labels = builtin_digits(8).labels
    parts = stratified_split(labels, images_config())
    joined = np.concatenate(list(parts.values()))
    assert len(joined) == len(labels) == len(np.unique(joined))
    for name, share in (("test", 0.2), ("val", 0.15)):
        per_class = np.bincount(labels[parts[name]], minlength=10) / np.bincount(labels)
        assert np.abs(per_class - share).max() < 0.02, name
    assert stratified_split(labels, images_config())["test"].tolist() == parts["test"].tolist()  # seeded
    assert stratified_split(labels, images_config(split_seed=1))["test"].tolist() != parts["test"].tolist()


def test_split_needs_three_images_per_class():
    with pytest.raises(ImageDataError, match="class 1 has 2 image"):
        stratified_split(np.array([0, 0, 0, 0, 1, 1]), images_config())


def test_folder_reader_classes_sizes_and_errors(tmp_path):
    for k, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((12, 12), 40 * k + i, np.uint8)).save(tmp_path / name / f"{i}.png")
    images = read_image_folder(tmp_path, channels=1, size=0)
    assert images.classes == ["cat", "dog"] and images.pixels.shape == (6, 1, 12, 12)
    assert images.labels.tolist() == [0, 0, 0, 1, 1, 1] and images.pixels[4, 0, 0, 0] == 41
    rgb = read_image_folder(tmp_path, channels=3, size=8)
    assert rgb.pixels.shape == (6, 3, 8, 8)

    Image.fromarray(np.zeros((10, 14), np.uint8)).save(tmp_path / "dog" / "wide.png")
    with pytest.raises(ImageDataError, match=r"wide\.png: image is 14x10 but .* is 12x12; set images.size"):
        read_image_folder(tmp_path, channels=1, size=0)
    assert read_image_folder(tmp_path, channels=1, size=12).pixels.shape == (7, 1, 12, 12)

    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ImageDataError, match=r"broken\.png: not a readable image"):
        read_image_folder(tmp_path, channels=1, size=12)
    with pytest.raises(ImageDataError, match="no such folder"):
        read_image_folder(tmp_path / "missing", channels=1, size=0)


def test_parquet_reader_both_layouts_and_bad_rows(tmp_path):
    images = [np.full((6, 6), v, np.uint8) for v in (0, 100, 200)]
    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": [png_bytes(a) for a in images], "label": ["b", "a", "b"]}), path)
    got = read_image_parquet(path, channels=1, size=0)
    assert got.classes == ["a", "b"] and got.labels.tolist() == [1, 0, 1]
    assert got.pixels[:, 0, 0, 0].tolist() == [0, 100, 200]

    hf = tmp_path / "hf.parquet"  # Hugging Face datasets' image struct
    pq.write_table(pa.table({"image": [{"bytes": png_bytes(a), "path": None} for a in images], "label": [3, 1, 2]}), hf)
    assert read_image_parquet(hf, channels=1, size=4).pixels.shape == (3, 1, 4, 4)

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": [png_bytes(images[0]), b"garbage"], "label": [0, 1]}), bad)
    with pytest.raises(ImageDataError, match=r"bad\.parquet: row 1: not a readable image"):
        read_image_parquet(bad, channels=1, size=0)
    no_label = tmp_path / "nolabel.parquet"
    pq.write_table(pa.table({"image": [png_bytes(images[0])]}), no_label)
    with pytest.raises(ImageDataError, match="missing column 'label'"):
        read_image_parquet(no_label, channels=1, size=0)


def test_split_table_round_trips_pixels_and_metadata(tmp_path):
    digits = builtin_digits(16)
    part = digits.subset(np.arange(0, 50, 7))
    pq.write_table(split_table(part), tmp_path / "test.parquet")
    table = pq.read_table(tmp_path / "test.parquet")
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["kiln.height"] == "16" and meta["kiln.channels"] == "1"
    blob = b"".join(table.column("pixels").to_pylist())
    np.testing.assert_array_equal(np.frombuffer(blob, np.uint8).reshape(part.pixels.shape), part.pixels)


def test_pixel_range_conversions_and_resize():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(pixels)
    assert x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(to_pixels(x), pixels)
    np.testing.assert_array_equal(to_pixels(torch.full((1, 1, 2, 2), 3.0)), np.full((1, 1, 2, 2), 255))
    assert resize_images(pixels, 16) is pixels
    constant = np.full((2, 3, 10, 10), 77, np.uint8)
    np.testing.assert_array_equal(resize_images(constant, 4), np.full((2, 3, 4, 4), 77))


def test_image_grid_layout():
    pixels = np.stack([np.full((1, 2, 3), v, np.uint8) for v in range(5)])
    grid = image_grid(pixels, columns=2)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1)
    assert grid[1, 1] == 0 and grid[1, 5] == 1 and grid[4, 1] == 2 and grid[7, 1] == 4
    assert grid[7, 5] == 128  # the empty sixth cell stays background


def test_fid_net_features_and_config_checks():
    net = FIDNet(FIDNetConfig(in_channels=1, image_size=16, num_classes=10, channels=[8, 16], feature_dim=12))
    extractor = FeatureExtractor(net).eval()
    x = torch.randn(5, 1, 16, 16)
    assert extractor(x).shape == (5, 12) and extractor.num_features == 12
    assert net(x).shape == (5, 10)
    with pytest.raises(ValueError, match="divisible"):
        FIDNetConfig(image_size=12, channels=[8, 8, 8])


def test_fid_extractor_loads_user_inception_weights(tmp_path):
    weights = tmp_path / "pt_inception.pth"
    torch.manual_seed(0)
    reference = InceptionV3Pool3(normalize_input=False)
    torch.save({**reference.state_dict(), "fc.weight": torch.zeros(3, 2048)}, weights)  # a full net's head is dropped
    extractor = fid_extractor(
        tmp_path,
        FIDConfig(samples=10, batch_size=4, inception_weights=weights.name, bound_draws=2, headline_draws=1),
        torch.device("cpu"),
    )
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(extractor(x), reference(x))
    with pytest.raises(FileNotFoundError, match="fid.inception_weights"):
        fid_extractor(
            tmp_path,
            FIDConfig(samples=10, batch_size=4, inception_weights="nope.pth", bound_draws=2, headline_draws=1),
            torch.device("cpu"),
        )


# ------------------------------------------------------------------ bad user data: one line, named


def bomb_png(side: int) -> bytes:
    """A 1-bit grayscale PNG of side x side black pixels: a few kB on disk (zlib), huge once decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    data = png_bytes(np.random.default_rng(0).integers(0, 255, size=(32, 32), dtype=np.uint8))
    return data[: len(data) * 2 // 3]  # the header is whole, the pixel data cut short


def one_line_error(call, match: str) -> str:
    with pytest.raises(ImageDataError, match=match) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    return message


def class_folder(root, n: int = 3, side: int = 12):
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((side, side), 10 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


BAD_IMAGES = {
    "truncated png": (truncated_png, r"not a readable image \(OSError: image file is truncated"),
    "not an image": (lambda: b"hello, not an image\n" * 10, r"not a readable image \(not an image format"),
    "decompression bomb": (lambda: bomb_png(20000), r"not a readable image \(too many pixels: .*decompression bomb"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_folder_bad_image_is_one_line_naming_the_file(tmp_path, case):
    make, pattern = BAD_IMAGES[case]
    folder = class_folder(tmp_path / "data")
    data = make()
    assert case != "decompression bomb" or len(data) < 100_000  # small on disk, 400M pixels decoded
    (folder / "dog" / "bad.png").write_bytes(data)
    one_line_error(lambda: read_image_folder(folder, channels=1, size=8), r"dog/bad\.png: " + pattern)


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_parquet_bad_image_is_one_line_naming_the_row(tmp_path, case):
    make, pattern = BAD_IMAGES[case]
    good = png_bytes(np.zeros((6, 6), np.uint8))
    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": [good, good, make()], "label": [0, 1, 0]}), path)
    one_line_error(lambda: read_image_parquet(path, channels=1, size=0), r"images\.parquet: row 2: " + pattern)
    hf = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in (good, make())], "label": [0, 1]}), hf)
    one_line_error(lambda: read_image_parquet(hf, channels=3, size=4), r"hf\.parquet: row 1: " + pattern)


def test_decompression_bomb_warning_level_is_refused_too(tmp_path, monkeypatch):
    # Between MAX_IMAGE_PIXELS and twice that, Pillow only warns; the reader refuses it all the same.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = class_folder(tmp_path / "data", side=30)  # 900 pixels: under the limit
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(folder / "cat" / "big.png")  # 1600: the warning range
    one_line_error(lambda: read_image_folder(folder, channels=1, size=8), r"cat/big\.png: .*too many pixels")


def test_mixed_sizes_name_one_file_of_each_size(tmp_path):
    folder = class_folder(tmp_path / "data")
    Image.fromarray(np.zeros((9, 15), np.uint8)).save(folder / "dog" / "odd.png")
    message = one_line_error(
        lambda: read_image_folder(folder, channels=1, size=0), r"dog/odd\.png: image is 15x9 but .*cat/0\.png is 12x12"
    )
    assert "images.size" in message


def test_file_name_with_a_line_break_stays_one_line(tmp_path):
    folder = class_folder(tmp_path / "data")
    (folder / "dog" / "two\nlines.png").write_bytes(b"junk")
    one_line_error(lambda: read_image_folder(folder, channels=1, size=8), r"two\\nlines\.png: not a readable image")


BAD_PARQUET = {
    "not parquet": (lambda p: p.write_bytes(b"PAR1 but not really " * 20), r"not a readable Parquet file"),
    "no image column": (
        lambda p: pq.write_table(pa.table({"picture": [b"x"], "label": [0]}), p),
        r"missing column 'image' \(has picture, label\)",
    ),
    "image column of ints": (
        lambda p: pq.write_table(pa.table({"image": [1, 2, 3], "label": [0, 1, 0]}), p),
        r"column 'image' holds int64; it must hold encoded image bytes",
    ),
    "zero rows": (
        lambda p: pq.write_table(pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64())}), p),
        r"no rows; columns 'image' and 'label' need at least one image",
    ),
    "duplicate image column": (
        lambda p: pq.write_table(
            pa.Table.from_arrays(
                [pa.array([b"x"]), pa.array([b"y"]), pa.array([0])], names=["image", "image", "label"]
            ),
            p,
        ),
        r"not a readable Parquet file \(ArrowInvalid: Multiple matches for FieldRef.Name\(image\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PARQUET))
def test_bad_parquet_is_one_line_naming_file_and_column(tmp_path, case):
    write, pattern = BAD_PARQUET[case]
    path = tmp_path / "user.parquet"
    write(path)
    one_line_error(lambda: read_image_parquet(path, channels=1, size=8), r"^.*user\.parquet: " + pattern)


@pytest.mark.parametrize("exists", [True, False])
def test_folder_refuses_a_symlink_out_without_naming_its_target(tmp_path, exists):
    folder = class_folder(tmp_path / "data")
    secret = tmp_path / "secret_place"
    secret.mkdir()
    if exists:
        Image.fromarray(np.zeros((12, 12), np.uint8)).save(secret / "target.png")
    (folder / "dog" / "link.png").symlink_to(secret / "target.png")
    message = one_line_error(
        lambda: read_image_folder(folder, channels=1, size=0), r"dog/link\.png: a symbolic link that leads outside"
    )
    assert "secret_place" not in message and "target" not in message
    (folder / "dog" / "link.png").unlink()

    (folder / "bird").symlink_to(secret, target_is_directory=True)  # a whole class folder linked out
    message = one_line_error(
        lambda: read_image_folder(folder, channels=1, size=0), r"data/bird: a symbolic link that leads outside"
    )
    assert "secret_place" not in message


def test_folder_follows_a_symlink_that_stays_inside(tmp_path):
    folder = class_folder(tmp_path / "data")
    (folder / "dog" / "again.png").symlink_to(folder / "cat" / "1.png")
    images = read_image_folder(folder, channels=1, size=0)
    assert len(images) == 7 and images.pixels[-1, 0, 0, 0] == 10


def test_parquet_path_field_is_never_read(tmp_path, monkeypatch):
    # Only the struct's `bytes` is decoded; a `path` (here to a real image outside) is refused unopened.
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(outside)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    good = png_bytes(np.zeros((6, 6), np.uint8))
    path = tmp_path / "hf.parquet"
    rows = [{"bytes": good, "path": "ok.png"}, {"bytes": None, "path": str(outside)}]
    pq.write_table(pa.table({"image": rows, "label": [0, 1]}), path)
    one_line_error(
        lambda: read_image_parquet(path, channels=1, size=0), r"hf\.parquet: row 1: column 'image' gives a path but no"
    )
    only_paths = tmp_path / "paths.parquet"  # a struct with no `bytes` field at all
    pq.write_table(pa.table({"image": [{"path": str(outside)}], "label": [0]}), only_paths)
    one_line_error(lambda: read_image_parquet(only_paths, channels=1, size=0), r"paths\.parquet: column 'image' holds")
    assert not any(str(fp) == str(outside) for fp in opened)
