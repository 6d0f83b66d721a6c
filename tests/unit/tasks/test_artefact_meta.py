"""Artefacts know what they were trained on: `require_meta` refuses a mismatch or a missing record with one line
naming the file, the key and the stage to rerun; the images' and the scenes' digests change with what models
depend on, and only with that."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from tasks.detection.scenes import DIGIT_CATEGORIES, labels_digest
from tasks.errors import InputError
from tasks.generative.images import ImageSet, images_digest, split_table
from tasks.layout import FID_NET_DIR, IMAGES_DIR
from tasks.training import StaleArtefact, read_model_meta, require_meta, save_model

# --------------------------------------------------------------------------------- require_meta


def test_require_meta_passes_on_a_match(tmp_path):
    require_meta(tmp_path, tmp_path / "m.pt", {"a": "1", "b": "2", "extra": "x"}, {"a": "1", "b": "2"}, "s")


def test_require_meta_refuses_a_mismatch_in_one_line(tmp_path):
    path = tmp_path / "data/models/fid_net/model.pt"
    with pytest.raises(StaleArtefact) as err:
        require_meta(tmp_path, path, {"images_digest": "aaaa"}, {"images_digest": "bbbb"}, "fid_net")
    assert isinstance(err.value, InputError)
    assert str(err.value) == (
        "data/models/fid_net/model.pt was trained on other data (images_digest: aaaa vs bbbb): "
        "rerun `dvc repro fid_net` (or `kiln run --target fid_net`)"
    )


def test_require_meta_refuses_a_missing_key(tmp_path):
    path = tmp_path / "data/models/detector/one_stage/model.pt"
    with pytest.raises(StaleArtefact) as err:
        require_meta(
            tmp_path, path, {"labels_digest": "x"}, {"labels_digest": "x", "input_size": "64"}, "detector@one_stage"
        )
    assert str(err.value) == (
        "data/models/detector/one_stage/model.pt records no input_size: "
        "rerun `dvc repro detector@one_stage` (or `kiln run --target detector@one_stage`)"
    )
    assert "\n" not in str(err.value)


def test_a_path_outside_the_root_is_named_whole(tmp_path):
    with pytest.raises(StaleArtefact, match=r"^/elsewhere/model.pt records no k: rerun `dvc repro s`"):
        require_meta(tmp_path, Path("/elsewhere/model.pt"), {}, {"k": "v"}, "s")


def test_read_model_meta_reads_what_save_model_recorded(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        n: int = 2

    save_model(tmp_path / "a.pt", "linear", Cfg(), nn.Linear(2, 2), meta={"images_digest": "0123"})
    save_model(tmp_path / "b.pt", "linear", Cfg(), nn.Linear(2, 2))
    assert read_model_meta(tmp_path / "a.pt") == {"images_digest": "0123"}
    assert read_model_meta(tmp_path / "b.pt") == {}
    with pytest.raises(FileNotFoundError):
        read_model_meta(tmp_path / "c.pt")


# -------------------------------------------------------------------------------- images_digest


def _write_images(root: Path, classes: list[str], size: int, channels: int = 1) -> str:
    """An images stage output the way `images_task` writes it: one Parquet per split, shape and classes in the
    schema metadata."""
    n = 3 * len(classes)
    images = ImageSet(
        np.zeros((n, channels, size, size), dtype=np.uint8),
        np.arange(n, dtype=np.int64) % len(classes),
        classes,
        [f"img{i}" for i in range(n)],
    )
    out = root / IMAGES_DIR
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        pq.write_table(split_table(images), out / f"{split}.parquet")
    return images_digest(root)


def test_images_digest_is_stable_and_short_hex(tmp_path):
    digest = _write_images(tmp_path / "a", ["0", "1", "2"], 8)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert _write_images(tmp_path / "b", ["0", "1", "2"], 8) == digest


def test_images_digest_changes_with_a_class_name_the_classes_the_size_and_the_channels(tmp_path):
    base = _write_images(tmp_path / "base", ["0", "1", "2"], 8)
    renamed = _write_images(tmp_path / "renamed", ["0", "1", "x"], 8)
    more = _write_images(tmp_path / "more", ["0", "1", "2", "3"], 8)
    larger = _write_images(tmp_path / "larger", ["0", "1", "2"], 16)
    rgb = _write_images(tmp_path / "rgb", ["0", "1", "2"], 8, channels=3)
    assert len({base, renamed, more, larger, rgb}) == 5


def test_images_digest_needs_the_images_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the images stage first"):
        images_digest(tmp_path)


def test_a_fid_net_trained_on_other_images_is_refused_before_use(tmp_path):
    from models.generative.fid_net import FIDNet, FIDNetConfig
    from tasks.generative.fid import check_fid_net, image_meta, load_fid_net

    _write_images(tmp_path, ["0", "1", "2"], 8)
    cfg = FIDNetConfig(in_channels=1, image_size=8, num_classes=3)
    path = tmp_path / FID_NET_DIR / "model.pt"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    save_model(path, "fid_net", cfg, FIDNet(cfg), meta=image_meta(tmp_path))
    check_fid_net(tmp_path)
    assert isinstance(load_fid_net(tmp_path), FIDNet)

    recorded = images_digest(tmp_path)
    current = _write_images(tmp_path, ["0", "1", "two"], 8)
    for refuse in (check_fid_net, load_fid_net):
        with pytest.raises(StaleArtefact) as err:
            refuse(tmp_path)
        assert str(err.value) == (
            f"data/models/fid_net/model.pt was trained on other data (images_digest: {recorded} vs {current}): "
            "rerun `dvc repro fid_net` (or `kiln run --target fid_net`)"
        )


def test_a_latents_cache_of_other_images_is_refused(tmp_path):
    from tasks.generative.vae import latent_model_meta, latents_digest, read_latents
    from tasks.layout import LATENTS_DIR

    _write_images(tmp_path, ["0", "1"], 8)
    cache = tmp_path / LATENTS_DIR
    cache.mkdir(parents=True)
    np.save(cache / "train.npy", np.zeros((2, 4, 2, 2), dtype=np.float32))
    import pandas as pd

    pd.DataFrame({"row": [0, 1], "label": [0, 1], "source": ["a", "b"]}).to_parquet(cache / "train.parquet")
    meta = {"scale_factor": 1.5, "shape": [4, 2, 2], "images_digest": images_digest(tmp_path)}
    (cache / "latents.json").write_text(json.dumps(meta))
    assert read_latents(tmp_path, "train").scale_factor == 1.5
    digest = latents_digest(tmp_path)
    assert latent_model_meta(tmp_path) == {"images_digest": images_digest(tmp_path), "latents_digest": digest}
    (cache / "latents.json").write_text(json.dumps({**meta, "scale_factor": 2.0}))
    assert latents_digest(tmp_path) != digest

    _write_images(tmp_path, ["0", "1"], 16)
    with pytest.raises(
        StaleArtefact, match=r"^data/cache/latents/latents.json was trained on other data .*dvc repro latents"
    ):
        read_latents(tmp_path, "train")


# -------------------------------------------------------------------------------- labels_digest


def test_labels_digest_ignores_the_order_of_the_categories():
    coco = {"categories": DIGIT_CATEGORIES}
    shuffled = {"categories": DIGIT_CATEGORIES[::-1]}
    assert labels_digest(coco) == labels_digest(shuffled)
    assert len(labels_digest(coco)) == 16


def test_labels_digest_changes_with_a_name_an_id_or_a_category():
    base = labels_digest({"categories": DIGIT_CATEGORIES})
    renamed = [dict(c, name="seven") if c["name"] == "7" else c for c in DIGIT_CATEGORIES]
    renumbered = [dict(c, id=c["id"] - 1) for c in DIGIT_CATEGORIES]
    fewer = DIGIT_CATEGORIES[:-1]
    digests = {base, *(labels_digest({"categories": c}) for c in (renamed, renumbered, fewer))}
    assert len(digests) == 4


def test_labels_digest_ignores_other_category_fields():
    plain = [{"id": c["id"], "name": c["name"]} for c in DIGIT_CATEGORIES]
    assert labels_digest({"categories": plain}) == labels_digest({"categories": DIGIT_CATEGORIES})


def test_map_refuses_predictions_made_on_other_labels(tmp_path):
    from tasks.detection.detectors import read_checked_predictions, read_predictions, write_predictions
    from tasks.layout import DETECTOR_DIR

    class FakeSplit:
        coco = {"categories": DIGIT_CATEGORIES}
        images = np.zeros((1, 32, 32), dtype=np.uint8)

    path = tmp_path / DETECTOR_DIR / "one_stage" / "predictions_test.json"
    path.parent.mkdir(parents=True)
    records = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}]
    trained = {"labels_digest": labels_digest(FakeSplit.coco), "input_size": "32"}
    write_predictions(path, records, trained)
    assert read_predictions(path) == (records, trained)
    assert read_checked_predictions(tmp_path, "one_stage", FakeSplit()) == records

    FakeSplit.images = np.zeros((1, 48, 48), dtype=np.uint8)
    with pytest.raises(StaleArtefact) as err:
        read_checked_predictions(tmp_path, "one_stage", FakeSplit())
    assert str(err.value) == (
        "data/models/detector/one_stage/predictions_test.json was trained on other data (input_size: 32 vs 48): "
        "rerun `dvc repro detector@one_stage` (or `kiln run --target detector@one_stage`)"
    )
    path.write_text(json.dumps(records))  # a bare record list, from before predictions recorded their meta
    with pytest.raises(StaleArtefact, match=r"predictions_test.json records no labels_digest: rerun `dvc repro"):
        read_checked_predictions(tmp_path, "one_stage", FakeSplit())
