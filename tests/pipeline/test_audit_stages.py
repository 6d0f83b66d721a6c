"""The audit stages through the CLI in a copy of the project: contaminated images (test images copied from
train) make `kiln stage image_audit` exit 2 with one line naming the file and the share, and the failed
MLflow run still holds the audit figures; under a lenient threshold the same data pass and the metrics file
and the run hold exactly the planted share. `kiln stage scene_audit` fails the same way on a COCO dataset
whose test split repeats a train image."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.digits import load_digit_images
from tasks.generative.images import ImageSet, split_table
from tests.pipeline.helpers import copy_project, set_params, sh

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root):
    root = copy_project(repo_root, tmp_path_factory.mktemp("audit") / "repo")
    ink, labels = load_digit_images()
    pixels = np.round(ink * 255).astype(np.uint8).repeat(2, axis=1).repeat(2, axis=2)[:, None]
    order = np.random.default_rng(0).permutation(len(labels))
    train, val, test = order[:300], order[300:340], np.concatenate([order[340:376], order[:4]])  # 4 of 40 copied
    out = root / "data/prepared/images"
    out.mkdir(parents=True)
    for name, index in (("train", train), ("val", val), ("test", test)):
        part = ImageSet(pixels[index], labels[index], [str(d) for d in range(10)], [f"digit {i}" for i in index])
        pq.write_table(split_table(part), out / f"{name}.parquet")
    return root


def error_lines(done) -> list[str]:
    """The error lines of a failed command; Prefect's own report of the failure (traceback, failed state) is
    held back, so the error is one line among Prefect's INFO lines."""
    assert "Traceback" not in done.stderr + done.stdout
    return [line for line in done.stderr.splitlines() if "error" in line.lower()]


def stage_runs(root, stage: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`kiln.stage` = '{stage}'", order_by=["attributes.start_time ASC"])


def test_contaminated_images_fail_the_audit_with_one_line_then_pass_a_lenient_threshold(project):
    metrics_file = project / "data/metrics/image_audit.json"
    before = metrics_file.read_bytes() if metrics_file.exists() else None  # the committed one, if any
    failed = sh(project, "kiln", "stage", "image_audit", check=False)
    assert failed.returncode == 2, failed.stderr[-3000:]
    [line] = error_lines(failed)
    assert line.startswith(
        "kiln stage: error: data/prepared/images/test.parquet: test_images_exact_in_train_share = 0.1000 exceeds "
        "image_audit.max_exact_share = 0.01: 4 of 40 test images have an identical train image"
    )
    assert "(e.g. test row 36 [digit " in line and "] and train row 0 [digit " in line
    assert (metrics_file.read_bytes() if metrics_file.exists() else None) == before  # a failed audit writes nothing
    (run,) = stage_runs(project, "image_audit")
    assert run.info.status == "FAILED"
    assert run.data.metrics["test_images_exact_in_train_share"] == pytest.approx(0.1)  # the audit is in MLflow

    set_params(project, "images.yaml", "image_audit", max_exact_share=0.2, max_near_share=0.2)
    sh(project, "kiln", "stage", "image_audit")
    metrics = json.loads((project / "data/metrics/image_audit.json").read_text())
    assert metrics["test_images_exact_in_train"] == 4 and metrics["test_images_exact_in_train_share"] == 0.1
    assert metrics["test_images_near_in_train"] == 4  # the copies; no clean test image hashes near train
    assert metrics["val_images_exact_in_train"] == 0
    last = stage_runs(project, "image_audit")[-1]
    assert last.info.status == "FINISHED"
    assert last.data.metrics["test_images_near_in_train_share"] == pytest.approx(0.1)


def test_a_coco_test_split_repeating_a_train_image_fails_the_scene_audit(project):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(14, 4, 4)).repeat(8, axis=1).repeat(8, axis=2).astype(np.uint8)
    splits = {"train": images[:8], "val": images[8:10], "test": np.concatenate([images[10:14], images[[2]]])}
    for split, arrays in splits.items():
        folder = project / "data/prepared/scenes" / split
        (folder / "images").mkdir(parents=True)
        records = []
        for i, array in enumerate(arrays, start=1):
            Image.fromarray(array).save(folder / "images" / f"{i:06d}.png")
            records.append({"id": i, "file_name": f"images/{i:06d}.png", "width": 32, "height": 32})
        box = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1.0, 1.0, 4.0, 4.0], "area": 16.0, "iscrowd": 0}
        coco = {"images": records, "annotations": [box], "categories": [{"id": 1, "name": "a"}]}
        (folder / "annotations.json").write_text(json.dumps(coco))
    failed = sh(project, "kiln", "stage", "scene_audit", check=False)
    assert failed.returncode == 2, failed.stderr[-3000:]
    [line] = error_lines(failed)
    assert line.startswith(
        "kiln stage: error: data/prepared/scenes/test/annotations.json: test_images_exact_in_train_share = 0.2000 "
        "exceeds scene_audit.max_exact_share = 0.01: 1 of 5 test images have an identical train image"
    )
    assert "(e.g. test/images/000005.png and train/images/000003.png, identical pixels)" in line
