"""Metrics and plot tables live in git (`cache: false`, not ignored), as DVC's own examples keep them: on a
fresh clone, with no DVC cache and no remote, every metrics file dvc.yaml declares is there, `dvc metrics
show` and `dvc metrics diff` read them at HEAD without "failed to load", and `dvc exp show` has no missing
("!") cell."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from tests.pipeline.helpers import sh

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def clone(tmp_path_factory, repo_root) -> Path:
    dest = tmp_path_factory.mktemp("clone") / "repo"
    sh(repo_root, "git", "clone", "-q", str(repo_root), str(dest))
    return dest


def declared_metrics(clone: Path) -> set[str]:
    shown = json.loads(sh(clone, "dvc", "metrics", "show", "--json").stdout)
    return {path for rev in shown.values() for path in rev.get("data", {})}


def test_every_declared_metrics_file_is_in_the_clone(clone):
    metrics = declared_metrics(clone)
    assert "data/metrics/onnx.json" in metrics and len(metrics) >= 20, sorted(metrics)
    assert not [m for m in metrics if not (clone / m).is_file()]
    tracked = set(sh(clone, "git", "ls-files", "data/metrics").stdout.split())
    assert metrics <= tracked, sorted(metrics - tracked)


def test_dvc_metrics_show_and_diff_read_head_on_a_fresh_clone(clone):
    shown = sh(clone, "dvc", "metrics", "show", "--json")
    assert "failed to load" not in shown.stderr and not any(
        "error" in rev for rev in json.loads(shown.stdout).values()
    ), shown.stderr
    diff = sh(clone, "dvc", "metrics", "diff", "HEAD", "--json")
    assert "failed to load" not in diff.stderr, diff.stderr
    assert json.loads(diff.stdout) == {}  # the clone's workspace is HEAD


def test_dvc_exp_show_has_no_missing_cell_on_a_fresh_clone(clone):
    rows = list(csv.DictReader(io.StringIO(sh(clone, "dvc", "exp", "show", "--csv").stdout)))
    assert rows and "test_perplexity" in ",".join(rows[0])
    missing = sorted({k for row in rows for k, v in row.items() if v == "!"})
    assert not missing, missing
