"""The scenes stage's compute: built-in digit scenes with exact boxes, COCO validation, the user-dataset
path and the training loader."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.detection.scenes import (
    INK_LEVEL,
    ScenesConfig,
    ScenesError,
    build_split,
    compose_scene,
    digit_pools,
    iou_xywh,
    load_digit_images,
    load_split,
    resize_bilinear,
    resize_bilinear_ref,
    validate_coco,
    write_scenes,
)
from tests.conftest import reference

SMALL = ScenesConfig(
    canvas=64,
    train_images=12,
    val_images=4,
    test_images=6,
    min_digits=1,
    max_digits=4,
    min_scale=12,
    max_scale=28,
    max_overlap=0.3,
    clutter=3,
    noise=0.05,
    seed=3,
)
CLEAN = replace(SMALL, clutter=0, noise=0.0, train_images=40, max_digits=6)


@pytest.fixture(scope="module")
def digits():
    images, labels = load_digit_images()
    return images, labels, digit_pools(labels, SMALL)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    stats = write_scenes(SMALL, root / "out", root)
    return root / "out", stats


# ------------------------------------------------------------------------------ composition


def test_resize_matches_torch_interpolate():
    torch = reference("torch")
    F = torch.nn.functional
    image = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    for h, w in [(16, 16), (13, 29), (48, 40), (8, 8), (5, 3)]:
        ours = resize_bilinear(image, h, w)
        ref = F.interpolate(torch.from_numpy(image)[None, None], size=(h, w), mode="bilinear", align_corners=False)[
            0, 0
        ].numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-5)
        np.testing.assert_allclose(ours, resize_bilinear_ref(image, h, w), atol=1e-6)


def test_pools_are_disjoint_stratified_and_complete(digits):
    _, labels, pools = digits
    train, val, test = (set(pools[s].tolist()) for s in ("train", "val", "test"))
    assert not train & test and not train & val and not val & test
    assert len(train | val | test) == len(labels) == 1797
    for split, fraction in (("val", SMALL.val_fraction), ("test", SMALL.test_fraction)):
        counts = np.bincount(labels[pools[split]], minlength=10)
        expected = np.bincount(labels, minlength=10) * fraction
        assert np.all(np.abs(counts - expected) <= 1)
    again = digit_pools(labels, SMALL)
    assert all(np.array_equal(pools[s], again[s]) for s in pools)
    other = digit_pools(labels, replace(SMALL, seed=4))
    assert not np.array_equal(pools["test"], other["test"])


def test_scenes_are_deterministic_for_a_seed_and_differ_for_another(digits):
    images, labels, pools = digits
    a = build_split(SMALL, "train", images, labels, pools["train"])
    b = build_split(SMALL, "train", images, labels, pools["train"])
    c = build_split(replace(SMALL, seed=4), "train", images, labels, pools["train"])
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.boxes, y.boxes) for x, y in zip(a, b))
    assert sum(np.array_equal(x.image, y.image) for x, y in zip(a, c)) == 0


def test_boxes_are_inside_tight_counted_and_overlap_bounded(digits):
    images, labels, pools = digits
    cfg = CLEAN
    scenes = build_split(cfg, "train", images, labels, pools["train"])
    counts = [len(s.boxes) for s in scenes]
    assert min(counts) >= cfg.min_digits and max(counts) <= cfg.max_digits and max(counts) > 1
    overlapping = 0
    for scene in scenes:
        ink = scene.image >= INK_LEVEL
        boxes = scene.boxes.astype(int)
        assert np.array_equal(boxes, scene.boxes)  # whole pixels: the ink extent
        covered = np.zeros_like(ink)
        for x, y, w, h in boxes:
            covered[y : y + h, x : x + w] = True
        # Clean scenes (no clutter, no noise): every ink pixel belongs to some digit's box ...
        assert not (ink & ~covered).any()
        for i, (x, y, w, h) in enumerate(boxes):
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= cfg.canvas and y + h <= cfg.canvas
            # ... each box edge touches ink (tight from inside) ...
            assert ink[y, x : x + w].any() and ink[y + h - 1, x : x + w].any()
            assert ink[y : y + h, x].any() and ink[y : y + h, x + w - 1].any()
            # ... and the lines just outside it are background wherever no other digit's box reaches.
            others = np.zeros_like(ink)
            for j, (ox, oy, ow, oh) in enumerate(boxes):
                if j != i:
                    others[oy : oy + oh, ox : ox + ow] = True
            free = ~others
            if y > 0:
                assert not (ink[y - 1, x : x + w] & free[y - 1, x : x + w]).any()
            if y + h < cfg.canvas:
                assert not (ink[y + h, x : x + w] & free[y + h, x : x + w]).any()
            if x > 0:
                assert not (ink[y : y + h, x - 1] & free[y : y + h, x - 1]).any()
            if x + w < cfg.canvas:
                assert not (ink[y : y + h, x + w] & free[y : y + h, x + w]).any()
            if i:
                iou = iou_xywh(scene.boxes[i], scene.boxes[:i])
                assert iou.max() <= cfg.max_overlap + 1e-12
                overlapping += int((iou > 0).any())
    assert overlapping > 0  # the bound is exercised: some digits do overlap


def test_clutter_and_noise_never_move_a_box(digits):
    images, labels, pools = digits
    busy = replace(CLEAN, clutter=6, noise=0.1)
    for i in range(10):
        clean = compose_scene([0, 0, i], images, labels, pools["train"], CLEAN)
        noisy = compose_scene([0, 0, i], images, labels, pools["train"], busy)
        assert np.array_equal(clean.boxes, noisy.boxes) and np.array_equal(clean.labels, noisy.labels)
        assert not np.array_equal(clean.image, noisy.image)
        assert (noisy.image.astype(int) - clean.image).std() > 0.05 * 255 * 0.5


def test_impossible_min_digits_is_an_error_naming_the_fields(digits):
    images, labels, pools = digits
    cfg = replace(CLEAN, canvas=32, min_digits=5, max_digits=5, min_scale=28, max_scale=32, max_overlap=0.0)
    with pytest.raises(ScenesError, match="min_digits=5"):
        compose_scene([0, 0, 0], images, labels, pools["train"], cfg)


# ----------------------------------------------------------------------------- written data


def test_written_layout_validates_and_round_trips(written, digits):
    out, stats = written
    images, labels, pools = digits
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    for split in ("train", "val", "test"):
        coco = json.loads((out / split / "annotations.json").read_text())
        validate_coco(coco, out / split, str(out / split / "annotations.json"))
        n = SMALL.split_images(split)
        assert sorted(p.name for p in (out / split / "images").iterdir()) == [f"{i:06d}.png" for i in range(1, n + 1)]
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert stats[split]["images"] == n and stats[split]["boxes"] == len(coco["annotations"])

        arrays, targets, loaded = load_split(out / split)
        assert arrays.shape == (n, SMALL.canvas, SMALL.canvas) and arrays.dtype == np.uint8
        assert loaded == coco
        scenes = build_split(SMALL, split, images, labels, pools[split])
        for array, target, scene in zip(arrays, targets, scenes):
            np.testing.assert_array_equal(array, scene.image)  # the PNG is lossless
            xyxy = np.concatenate([scene.boxes[:, :2], scene.boxes[:, :2] + scene.boxes[:, 2:]], axis=1)
            np.testing.assert_array_equal(target["boxes"], xyxy.astype(np.float32))
            assert target["boxes"].dtype == np.float32 and target["labels"].dtype == np.int64
            np.testing.assert_array_equal(target["labels"], scene.labels)  # digit d = category d + 1 = index d

        used = {a["digit_index"] for a in coco["annotations"]}
        assert used <= set(pools[split].tolist())
        if split == "test":
            assert not used & set(pools["train"].tolist())  # test scenes show unseen digits


def test_written_annotations_load_in_pycocotools(written):
    coco_module = reference("pycocotools.coco")
    out, stats = written
    gt = coco_module.COCO(str(out / "test" / "annotations.json"))
    assert len(gt.getImgIds()) == SMALL.test_images and len(gt.getAnnIds()) == stats["test"]["boxes"]
    assert sorted(gt.getCatIds()) == list(range(1, 11))


# --------------------------------------------------------------------------- COCO validation


def make_dataset(folder: Path, n: int = 10) -> dict:
    """A small valid COCO dataset with images of mixed sizes and modes on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(n):
        w, h = (40 + 4 * i, 30) if i % 2 else (30, 50)
        pixels = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.jpg" if i % 3 == 0 else folder / f"img{i}.png")
        images.append(
            {"id": 100 + i, "file_name": f"img{i}.jpg" if i % 3 == 0 else f"img{i}.png", "width": w, "height": h}
        )
        for k in range(i % 3):
            annotations.append(
                {
                    "id": 1000 + len(annotations),
                    "image_id": 100 + i,
                    "category_id": 7 + 2 * k,
                    "bbox": [2.0 + k, 3.0, 10.5, 8.0],
                    "area": 84.0,
                    "iscrowd": 0,
                }
            )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
    }


def _set(path, value):
    def edit(d):
        *keys, last = path
        for k in keys:
            d = d[k]
        d[last] = value

    return edit


def _delete(path):
    def edit(d):
        *keys, last = path
        for k in keys:
            d = d[k]
        del d[last]

    return edit


def _append(key, index):
    return lambda d: d[key].append(copy.deepcopy(d[key][index]))


BAD = {
    "missing image file": (_set(("images", 1, "file_name"), "nope.png"), r"images\[1\] \(id 101\).*nope.png.*missing"),
    "zero width box": (_set(("annotations", 0, "bbox"), [1, 1, 0, 5]), r"annotations\[0\] \(id 1000\).*non-positive"),
    "negative height box": (
        _set(("annotations", 2, "bbox"), [1, 1, 3, -2]),
        r"annotations\[2\] \(id 1002\).*non-positive",
    ),
    "box outside the image": (
        _set(("annotations", 1, "bbox"), [35.0, 3.0, 10.0, 8.0]),
        r"annotations\[1\] \(id 1001\).*outside",
    ),
    "box at negative x": (
        _set(("annotations", 1, "bbox"), [-2.0, 3.0, 10.0, 8.0]),
        r"annotations\[1\] \(id 1001\).*outside",
    ),
    "unknown category": (_set(("annotations", 0, "category_id"), 3), r"annotations\[0\] \(id 1000\).*category_id 3"),
    "unknown image": (_set(("annotations", 0, "image_id"), 5), r"annotations\[0\] \(id 1000\).*image_id 5"),
    "duplicate image id": (_set(("images", 3, "id"), 101), r"images\[3\] \(id 101\).*duplicate id 101.*images\[1\]"),
    "duplicate annotation id": (_append("annotations", 1), r"annotations\[\d+\] \(id 1001\).*duplicate id 1001"),
    "duplicate category id": (_append("categories", 0), r"categories\[2\] \(id 7\).*duplicate id 7"),
    "missing annotation key": (
        _delete(("annotations", 1, "bbox")),
        r"annotations\[1\] \(id 1001\).*missing key 'bbox'",
    ),
    "missing image key": (_delete(("images", 2, "height")), r"images\[2\] \(id 102\).*missing key 'height'"),
    "missing top-level key": (_delete(("categories",)), r"<file>.*missing key 'categories'"),
    "wrong declared size": (_set(("images", 1, "width"), 99), r"images\[1\] \(id 101\).*44x30.*99x30"),
    "malformed bbox": (_set(("annotations", 0, "bbox"), [1, 2, 3]), r"annotations\[0\] \(id 1000\).*bbox"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validate_coco_names_file_and_record(tmp_path, case):
    data = make_dataset(tmp_path / "images")
    validate_coco(copy.deepcopy(data), tmp_path / "images", "ann.json")  # the clean dataset passes
    edit, pattern = BAD[case]
    edit(data)
    with pytest.raises(ValueError, match=r"^ann\.json: " + pattern):
        validate_coco(data, tmp_path / "images", "ann.json")


def test_user_coco_dataset_is_split_letterboxed_and_renumbered(tmp_path):
    data = make_dataset(tmp_path / "user" / "images")
    (tmp_path / "user" / "ann.json").write_text(json.dumps(data))
    cfg = replace(
        SMALL,
        source="coco",
        coco_images="user/images",
        coco_annotations="user/ann.json",
        val_fraction=0.2,
        test_fraction=0.2,
    )
    stats = write_scenes(cfg, tmp_path / "out", tmp_path)
    assert {s: int(v["images"]) for s, v in stats.items()} == {"train": 6, "val": 2, "test": 2}
    sources = {image["id"]: image for image in data["images"]}
    seen = []
    for split in ("train", "val", "test"):
        arrays, targets, coco = load_split(tmp_path / "out" / split)
        assert arrays.shape == (len(coco["images"]), 64, 64)
        assert [im["id"] for im in coco["images"]] == list(range(1, len(coco["images"]) + 1))
        assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
        assert [c["id"] for c in coco["categories"]] == [7, 9]
        for im, target in zip(coco["images"], targets):
            source = sources[im["source_id"]]
            scale = 64 / max(source["width"], source["height"])
            originals = [a for a in data["annotations"] if a["image_id"] == source["id"]]
            expected = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in originals)]).reshape(-1, 4)
            np.testing.assert_allclose(target["boxes"], expected * scale, rtol=0.02)
            assert target["labels"].tolist() == [(a["category_id"] - 7) // 2 for a in originals]
        seen += [im["source_id"] for im in coco["images"]]
    assert sorted(seen) == sorted(sources)  # every image in exactly one split
    again = replace(cfg)
    write_scenes(again, tmp_path / "out2", tmp_path)
    for split in ("train", "val", "test"):
        assert (tmp_path / "out" / split / "annotations.json").read_text() == (
            tmp_path / "out2" / split / "annotations.json"
        ).read_text()


def test_bad_user_dataset_leaves_nothing_behind(tmp_path):
    data = make_dataset(tmp_path / "user" / "images")
    data["annotations"][-1]["bbox"] = [0, 0, 500, 5]
    (tmp_path / "user" / "ann.json").write_text(json.dumps(data))
    cfg = replace(SMALL, source="coco", coco_images="user/images", coco_annotations="user/ann.json")
    with pytest.raises(ScenesError, match=r"ann\.json: annotations\[\d+\] \(id \d+\).*outside"):
        write_scenes(cfg, tmp_path / "data" / "scenes", tmp_path)
    assert not (tmp_path / "data").exists()
    # A previous good output survives a failed rewrite untouched, with no temporaries beside it.
    write_scenes(SMALL, tmp_path / "data" / "scenes", tmp_path)
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "data").rglob("*"))
    (tmp_path / "user" / "ann.json").write_text("{not json")
    with pytest.raises(ScenesError, match=r"ann\.json: not valid JSON"):
        write_scenes(cfg, tmp_path / "data" / "scenes", tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "data").rglob("*")) == before


# --------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("source", "folder"),
        ("canvas", 100),
        ("canvas", 0),
        ("train_images", 0),
        ("min_digits", 0),
        ("max_digits", 0),
        ("min_scale", 4),
        ("max_scale", 200),
        ("max_overlap", 1.0),
        ("clutter", -1),
        ("noise", -0.1),
        ("val_fraction", 0.0),
        ("test_fraction", 0.7),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        replace(SMALL, **{field: value})


def test_coco_source_needs_both_paths():
    with pytest.raises(ValueError, match="coco_annotations"):
        replace(SMALL, source="coco", coco_images="imgs")


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


def coco_source(tmp_path: Path, edit=None) -> ScenesConfig:
    data = make_dataset(tmp_path / "user" / "images")
    if edit is not None:
        edit(data)
    (tmp_path / "user" / "ann.json").write_text(json.dumps(data))
    return replace(SMALL, source="coco", coco_images="user/images", coco_annotations="user/ann.json")


def scenes_error(tmp_path: Path, cfg: ScenesConfig, match: str) -> str:
    with pytest.raises(ScenesError, match=match) as caught:
        write_scenes(cfg, tmp_path / "data" / "scenes", tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    assert not (tmp_path / "data").exists()  # refused before anything is written
    return message


OUTSIDE = {  # file_name for images[1] (id 101), given the outside file's name
    "dot-dot": lambda tmp, name: f"../../secret/{name}",
    "absolute": lambda tmp, name: str(tmp / "secret" / name),
    "symlink": lambda tmp, name: f"link-{name}",
}


@pytest.mark.parametrize("case", sorted(OUTSIDE))
def test_file_name_outside_the_images_folder_is_refused_alike_whether_there_or_not(tmp_path, case):
    (tmp_path / "secret").mkdir()
    Image.fromarray(np.zeros((30, 44), np.uint8)).save(tmp_path / "secret" / "real.png")  # img1's declared size
    messages = []
    for name in ("real.png", "ghost.png"):  # ghost.png is never made
        file_name = OUTSIDE[case](tmp_path, name)
        if case == "symlink":
            (tmp_path / "user" / "images").mkdir(parents=True, exist_ok=True)
            (tmp_path / "user" / "images" / file_name).symlink_to(tmp_path / "secret" / name)
        cfg = coco_source(tmp_path, _set(("images", 1, "file_name"), file_name))
        message = scenes_error(
            tmp_path, cfg, r"^.*user/ann\.json: images\[1\] \(id 101\): file_name .* leads outside the images folder"
        )
        if case == "symlink":
            assert "secret" not in message  # names the link, never where it leads
        messages.append(message.replace(name, "NAME"))
    assert messages[0] == messages[1]


def test_symlink_that_stays_inside_the_images_folder_is_fine(tmp_path):
    folder = tmp_path / "user" / "images"
    make_dataset(folder)
    (folder / "same.png").symlink_to(folder / "img1.png")
    cfg = coco_source(tmp_path, _set(("images", 1, "file_name"), "same.png"))
    assert write_scenes(cfg, tmp_path / "out", tmp_path)["train"]["images"] > 0


def test_dataset_without_annotations_is_refused_at_validation(tmp_path):
    cfg = coco_source(tmp_path, _set(("annotations",), []))
    scenes_error(tmp_path, cfg, r"user/ann\.json: annotations: no annotations; the detectors need boxes")


def test_split_without_boxes_is_refused_before_writing(tmp_path):
    from tasks.detection.scenes import split_coco_images

    cfg = coco_source(tmp_path)
    data = json.loads((tmp_path / "user" / "ann.json").read_text())
    parts = split_coco_images(data, cfg, "ann.json")
    elsewhere = {im["id"] for split in ("val", "test") for im in parts[split]}
    for split, keep in (("train", elsewhere), ("test", {im["id"] for im in parts["train"] + parts["val"]})):
        edited = dict(data, annotations=[a for a in data["annotations"] if a["image_id"] in keep])
        assert edited["annotations"]  # the dataset has boxes, just none in this split
        (tmp_path / "user" / "ann.json").write_text(json.dumps(edited))
        scenes_error(tmp_path, cfg, rf"user/ann\.json: the {split} split's \d+ image\(s\) have no annotations")


def test_non_integer_ids_in_annotations_are_named_not_a_type_error(tmp_path):
    data = make_dataset(tmp_path / "images")
    data["annotations"][0]["image_id"] = [101]
    with pytest.raises(ScenesError, match=r"^ann\.json: annotations\[0\] \(id 1000\): image_id must be an integer"):
        validate_coco(data, tmp_path / "images", "ann.json")


def truncated_png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, size=(30, 44), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3]  # a whole header (44x30), cut-short pixels


BAD_COCO_IMAGES = {
    "truncated png": (truncated_png, (44, 30), r"not a readable image \(OSError: image file is truncated"),
    "decompression bomb": (lambda: bomb_png(20000), (20000, 20000), r"not a readable image \(too many pixels: "),
}


@pytest.mark.parametrize("case", sorted(BAD_COCO_IMAGES))
def test_bad_coco_image_is_one_line_naming_the_file(tmp_path, case):
    make, (width, height), pattern = BAD_COCO_IMAGES[case]

    def edit(data):
        data["images"][1].update(file_name="bad.png", width=width, height=height)

    cfg = coco_source(tmp_path, edit)
    data = make()
    assert len(data) < 100_000  # small on disk
    (tmp_path / "user" / "images" / "bad.png").write_bytes(data)
    scenes_error(tmp_path, cfg, r"user/ann\.json: images\[1\] \(id 101\): image file .*/bad\.png is " + pattern)


def test_letterbox_refuses_a_bad_image_naming_it(tmp_path):
    from tasks.detection.scenes import _letterbox

    (tmp_path / "cut.png").write_bytes(truncated_png())
    with pytest.raises(ScenesError, match=r"cut\.png: not a readable image \(OSError: image file is truncated"):
        _letterbox(tmp_path / "cut.png", 64)
