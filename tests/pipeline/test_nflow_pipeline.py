"""The normalizing flows end to end in a copy of the repo (smoke profile): images -> fid_net ->
nflow@{realnvp, cnf}, then what the metrics files, the sample grids and MLflow hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.pipeline.helpers import kiln_run, mlflow_client, runs_of, smoke_project, stale, summary

pytestmark = pytest.mark.pipeline

FLOWS = ["realnvp", "cnf"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root) -> Path:
    return smoke_project(repo_root, tmp_path_factory.mktemp("kiln") / "repo")


@pytest.fixture(scope="module")
def first_run(project):
    return kiln_run(project, *(f"nflow@{name}" for name in FLOWS))


def test_flow_stages_run_and_dvc_is_clean(project, first_run):
    assert summary(first_run.stdout) == {"images": "ran", "fid_net": "ran", "nflow@realnvp": "ran", "nflow@cnf": "ran"}
    assert stale(project, *(f"nflow@{name}" for name in FLOWS)) == {}


@pytest.mark.parametrize("name", FLOWS)
def test_flow_logs_bpd_and_fid_with_floor_and_ceiling(project, first_run, name):
    report = json.loads((project / f"data/metrics/nflow/{name}.json").read_text())
    reference = json.loads((project / "data/metrics/fid_net.json").read_text())
    assert report["fid_floor"] == pytest.approx(reference["fid_floor"])
    assert report["fid_ceiling"] == pytest.approx(reference["fid_ceiling"])
    assert report["test_bpd_images"] == 40 and report["fid_samples"] == 40
    assert 0 < report["test_bpd"] < 12 and np.isfinite(report["fid"]) and report["fid"] >= 0
    run = runs_of(project, "generative", f"nflow@{name}")[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_bpd"] == pytest.approx(report["test_bpd"])
    assert run.data.metrics["fid"] == pytest.approx(report["fid"])
    assert run.data.params[f"{'realnvp' if name == 'realnvp' else 'cnf_unet'}.image_size"] == "16"  # from the data
    client = mlflow_client(project)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} == {"samples/samples.png"}
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val_loss")] == [10, 20]
    # 8 columns of 16 px images with 1 px gaps, upscaled 2x; the checkpoints load with weights_only
    grid = np.asarray(Image.open(project / f"data/models/nflow/{name}/samples.png"))
    assert grid.shape == (2 * (5 * 17 + 1), 2 * (8 * 17 + 1))
    saved = torch.load(project / f"data/models/nflow/{name}/model.pt", weights_only=True)
    assert saved["model"] == ("realnvp" if name == "realnvp" else "unet")
    assert torch.load(project / f"data/models/nflow/{name}/checkpoint.pt", weights_only=True)["step"] == 20


def test_cnf_reports_its_solver_and_trace(project, first_run):
    report = json.loads((project / "data/metrics/nflow/cnf.json").read_text())
    assert (report["trace"], report["sample_solver"], report["likelihood_solver"]) == ("hutchinson", "rk4", "rk4")
    assert report["sample_nfe"] == report["likelihood_nfe"] == 8  # 2 RK4 steps in the smoke profile
