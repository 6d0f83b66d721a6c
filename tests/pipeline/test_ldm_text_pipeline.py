"""`ldm_text` end to end in a copy of the repo (smoke profile): images -> fid_net -> vae -> latents -> ldm_text,
then its metrics file, its outputs and its MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.pipeline.helpers import kiln_run, mlflow_client, runs_of, smoke_project, stale, summary

pytestmark = pytest.mark.pipeline

TARGETS = ("ldm_text",)


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root) -> Path:
    return smoke_project(repo_root, tmp_path_factory.mktemp("kiln") / "repo")


@pytest.fixture(scope="module")
def first_run(project):
    return kiln_run(project, *TARGETS)


def test_ldm_text_runs_on_the_latents_and_dvc_is_clean(project, first_run):
    assert summary(first_run.stdout) == {s: "ran" for s in ("images", "fid_net", "vae", "latents", "ldm_text")}
    assert stale(project, *TARGETS) == {}


def test_ldm_text_metrics_outputs_and_mlflow(project, first_run):
    report = json.loads((project / "data/metrics/ldm_text.json").read_text())
    for split in ("heldout", "train"):
        assert np.isfinite(report[f"{split}_fid"]) and 0 <= report[f"{split}_class_accuracy"] <= 1
    assert report["fid"] == report["heldout_fid"] and report["nfe"] == 2 * 4  # guided DDIM, the smoke 4 steps
    assert 0 < report["heldout_unk_rate"] < 1  # held-out wording meets <unk>, the class words do not
    grid = np.asarray(Image.open(project / "data/models/diffusion/ldm_text/samples.png"))
    assert grid.shape[0] == 2 * (10 * 17 + 1)  # one row per digit, upscaled 2x
    saved = torch.load(project / "data/models/diffusion/ldm_text/model.pt", weights_only=True)
    assert saved["config"]["unet"]["context_dim"] == saved["config"]["text_encoder"]["dim"] == 16
    run = runs_of(project, "generative", "ldm_text")[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["heldout_class_accuracy"] == pytest.approx(report["heldout_class_accuracy"])
    assert run.data.params["ldm_text_unet.context_dim"] == "16" and run.data.params["ldm_text_unet.num_classes"] == "0"
    client = mlflow_client(project)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} == {"samples/samples.png"}
