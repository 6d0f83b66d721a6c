"""The `image_audit` stage's task on a small images split with planted duplicates: test images copied from
train, and copies at other gray levels. It reports exactly the planted shares, writes and logs them, and
fails over the threshold with one line naming the file, the share and a pair."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from models.duplicates import AuditConfig
from tasks.digits import load_digit_images
from tasks.errors import ContaminationError
from tasks.generative.image_audit import ImageAuditInputs, image_audit_task
from tasks.generative.images import ImageSet, split_table
from tasks.layout import IMAGES_DIR, METRICS_DIR
from tasks.spec import StageContext

LENIENT = AuditConfig(near_hamming=2, max_exact_share=0.5, max_near_share=0.5)


class RecordingRun:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.update(metrics)


def digit_set(pixels: np.ndarray, labels: np.ndarray, name: str) -> ImageSet:
    return ImageSet(pixels, labels, [str(d) for d in range(10)], [f"{name}[{i}]" for i in range(len(labels))])


@pytest.fixture
def contaminated(tmp_path):
    """train: 300 digits; val: 40 others; test: 30 others, 4 train images copied, 6 copies at 0.9 the contrast
    and 10 levels brighter (what a re-export with other levels does; no pixel clips)."""
    ink, labels = load_digit_images()
    pixels = np.round(ink * 255).astype(np.uint8).repeat(2, axis=1).repeat(2, axis=2)[:, None]  # (N, 1, 16, 16)
    order = np.random.default_rng(0).permutation(len(labels))
    train, val, clean = order[:300], order[300:340], order[340:370]
    copied, brightened = train[:4], train[10:16]
    test_pixels = np.concatenate(
        [pixels[clean], pixels[copied], np.round(pixels[brightened] * 0.9 + 10).astype(np.uint8)]
    )
    test_labels = np.concatenate([labels[clean], labels[copied], labels[brightened]])
    splits = {
        "train": digit_set(pixels[train], labels[train], "train"),
        "val": digit_set(pixels[val], labels[val], "val"),
        "test": digit_set(test_pixels, test_labels, "test"),
    }
    out = tmp_path / IMAGES_DIR
    out.mkdir(parents=True)
    for name, part in splits.items():
        pq.write_table(split_table(part), out / f"{name}.parquet")
    return tmp_path


def run_audit(root, cfg: AuditConfig) -> tuple[dict, RecordingRun]:
    run = RecordingRun()
    metrics = image_audit_task.fn(StageContext(root, "", 0, "cpu", run), ImageAuditInputs(cfg))
    return metrics, run


def test_the_audit_finds_exactly_the_planted_shares(contaminated):
    metrics, run = run_audit(contaminated, LENIENT)
    assert metrics["test_images_audited"] == 40
    assert metrics["test_images_exact_in_train"] == 4
    assert metrics["test_images_exact_in_train_share"] == pytest.approx(4 / 40)
    assert metrics["test_images_near_in_train"] == 10  # the copies and the brighter copies, nothing else
    assert metrics["test_images_near_in_train_share"] == pytest.approx(10 / 40)
    assert metrics["val_images_exact_in_train"] == 0 and metrics["val_images_near_in_train"] == 0
    assert 0.0 <= metrics["train_same_class_pairs_near_share"] < 1e-3
    assert run.logged == metrics  # the stage's MLflow run gets the same figures
    written = json.loads((contaminated / METRICS_DIR / "image_audit.json").read_text())
    assert written == pytest.approx(metrics)


def test_a_share_over_the_threshold_fails_naming_file_share_and_pair(contaminated):
    strict = AuditConfig(near_hamming=2, max_exact_share=0.05, max_near_share=0.5)
    with pytest.raises(ContaminationError) as err:
        run_audit(contaminated, strict)
    message = str(err.value)
    assert message.startswith(
        "data/prepared/images/test.parquet: test_images_exact_in_train_share = 0.1000 exceeds "
        "image_audit.max_exact_share = 0.05: 4 of 40 test images have an identical train image"
    )
    assert "test row 30 [test[30]] and train row 0 [train[0]], identical pixels" in message
    assert "\n" not in message
    assert not (contaminated / METRICS_DIR / "image_audit.json").exists()  # a failed audit leaves no metrics file

    near_only = AuditConfig(near_hamming=2, max_exact_share=0.5, max_near_share=0.2)
    with pytest.raises(ContaminationError, match=r"test_images_near_in_train_share = 0\.2500 exceeds "):
        run_audit(contaminated, near_only)


def test_the_built_in_split_passes_the_default_thresholds(tmp_path, repo_root):
    """The committed params hold on the built-in digits as the images stage splits them."""
    from tasks.generative.images import ImagesConfig, builtin_digits, stratified_split
    from tasks.params import load_section

    params = repo_root / "params"
    images_cfg = load_section(params, "images", ImagesConfig)
    audit_cfg = load_section(params, "image_audit", AuditConfig)
    if images_cfg.source != "builtin":
        pytest.skip("params/images.yaml reads user images")
    images = builtin_digits(images_cfg.size or 16)
    out = tmp_path / IMAGES_DIR
    out.mkdir(parents=True)
    for name, index in stratified_split(images.labels, images_cfg).items():
        pq.write_table(split_table(images.subset(index)), out / f"{name}.parquet")
    metrics, _ = run_audit(tmp_path, audit_cfg)
    assert metrics["test_images_exact_in_train"] == 0  # scikit-learn's digits hold no two identical images
    assert metrics["test_images_near_in_train_share"] <= audit_cfg.max_near_share
