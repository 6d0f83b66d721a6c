"""`controlnet` end to end in a copy of the repo (smoke profile): images -> fid_net -> diffusion@ddpm ->
controlnet, then its metrics file, its outputs (edge maps, grid, weights) and its MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.pipeline.helpers import kiln_run, mlflow_client, runs_of, smoke_project, stale, summary

pytestmark = pytest.mark.pipeline

TARGETS = ("controlnet",)


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root) -> Path:
    return smoke_project(repo_root, tmp_path_factory.mktemp("kiln") / "repo")


@pytest.fixture(scope="module")
def first_run(project):
    return kiln_run(project, *TARGETS)


def test_controlnet_runs_after_its_base_and_dvc_is_clean(project, first_run):
    assert summary(first_run.stdout) == {s: "ran" for s in ("images", "fid_net", "diffusion@ddpm", "controlnet")}
    assert stale(project, *TARGETS) == {}


def test_controlnet_metrics_outputs_and_mlflow(project, first_run):
    report = json.loads((project / "data/metrics/controlnet.json").read_text())
    for key in ("fid", "fid_base", "fid_floor", "fid_ceiling", "class_accuracy", "class_accuracy_base"):
        assert np.isfinite(report[key]), key
    for key in ("edge_f1_control", "edge_f1_base", "edge_f1_control_exact", "edge_f1_base_exact"):
        assert 0 <= report[key] <= 1, key
    assert report["edge_f1_control_exact"] <= report["edge_f1_control"]  # a tolerance only adds matches
    assert report["fid_samples"] == 40 and report["trainable_parameters"] > 0
    # Held-out conditions: 40 val images' edges, scored against all 360 test images (not their own source).
    assert report["condition_images"] == 40 and report["fid_reference_images"] == 360
    out = project / "data/models/controlnet"
    for split, n in (("train", 1167), ("val", 270), ("test", 360)):
        edges = np.load(out / "edges" / f"{split}.npy")
        assert edges.shape == (n, 1, 16, 16) and set(np.unique(edges)) <= {0, 1}
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["model"] == "controlnet" and saved["config"]["hint_channels"] == [4]
    grid = np.asarray(Image.open(out / "samples.png"))  # 4 rows of condition | controlled | base, upscaled 2x
    assert grid.shape == (2 * (4 * 17 + 1), 2 * (3 * 17 + 1))
    run = runs_of(project, "generative", "controlnet")[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["edge_f1_control"] == pytest.approx(report["edge_f1_control"])
    assert run.data.metrics["fid_floor"] == pytest.approx(report["fid_floor"])
    assert run.data.params["controlnet_train.steps"] == "10"
    client = mlflow_client(project)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} == {"samples/samples.png"}
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val_loss")]


def test_second_run_executes_nothing(project, first_run):
    again = kiln_run(project, *TARGETS)
    assert set(summary(again.stdout).values()) == {"up to date"}
