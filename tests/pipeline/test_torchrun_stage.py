"""A training stage under torchrun, in a copy of the project on the smoke profile: two CPU ranks (gloo)
train `lm@lstm` through `kiln stage`; one MLflow run (rank 0's), the stage's outputs, and `dvc commit`
leaves the stage up to date."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.pipeline.helpers import kiln_run, runs_of, sh, smoke_project, stale

pytestmark = pytest.mark.pipeline


def test_kiln_stage_under_torchrun_trains_on_two_ranks_and_logs_once(tmp_path, repo_root):
    project = smoke_project(repo_root, tmp_path / "repo")
    kiln_run(project, "corpus")
    done = sh(
        project,
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "flows.cli",
        "stage",
        "lm@lstm",
        env={"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"},
    )
    assert "test perplexity" in done.stdout + done.stderr
    metrics = json.loads((project / "data/metrics/lm/lstm.json").read_text())
    assert metrics["test_perplexity"] > 1
    (run,) = runs_of(project, "text", "lm@lstm")
    assert run.info.status == "FINISHED" and "train_loss" in run.data.metrics
    sh(project, "dvc", "commit", "--force", "lm@lstm")
    assert stale(project, "lm@lstm") == {}
