"""Parallel stages, in a copy of the project on the smoke profile with `runtime.max_parallel: 2`: independent
branches overlap in time, the stages fork from the run's pre-imported process, DVC ends as clean as after a
serial run, a second run executes nothing; the same through Prefect's Dask task runner on a local cluster.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.pipeline.helpers import copy_project, kiln_run, runs_of, set_params, sh, smoke_project, stale, summary

pytestmark = pytest.mark.pipeline

TARGETS = ("ngram", "scenes")  # corpus -> ngram, and scenes: two independent branches
STAGES = {"corpus", "ngram", "scenes"}


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root) -> Path:
    # The smoke profile runs one stage at a time (a parallel run pays its fork server's imports); this copy
    # allows two.
    project = smoke_project(repo_root, tmp_path_factory.mktemp("kiln") / "repo")
    set_params(project, "runtime.yaml", "runtime", max_parallel=2)
    # Long enough that the scenes run spans the text branch's start, however the two subprocesses'
    # start-ups (imports) are delayed by the other test worker.
    set_params(project, "detection.yaml", "scenes", train_images=1200)
    sh(project, "git", "commit", "-qam", "max_parallel 2")
    return project


@pytest.fixture(scope="module")
def first_run(project) -> subprocess.CompletedProcess:
    return kiln_run(project, *TARGETS)


def interval(project: Path, experiment: str, stage: str) -> tuple[int, int]:
    run = runs_of(project, experiment, stage)[0]
    assert run.info.status == "FINISHED"
    return run.info.start_time, run.info.end_time


def test_independent_branches_overlap_in_time(project, first_run):
    assert summary(first_run.stdout) == dict.fromkeys(STAGES, "ran")
    text = (interval(project, "text", "corpus")[0], interval(project, "text", "ngram")[1])
    scenes = interval(project, "detection", "scenes")
    overlap_ms = min(text[1], scenes[1]) - max(text[0], scenes[0])
    print(f"text branch {text}, scenes {scenes}: overlap {overlap_ms} ms")
    assert overlap_ms > 0, f"corpus -> ngram {text} and scenes {scenes} did not overlap"


def test_the_stages_fork_from_one_pre_imported_process(first_run):
    """flows/forkserver.py: one server per run; a server that failed to start would leave the stages to start
    as processes, which the run says instead."""
    log = first_run.stdout + first_run.stderr
    found = {
        s: re.search(rf"{re.escape(s)}: forked from the run's pre-imported process \(pid (\d+)\)", log) for s in STAGES
    }
    assert all(found.values()), log[-4000:]
    assert len({match.group(1) for match in found.values()}) == 1
    assert "fork server is not running" not in log


def test_dvc_is_clean_as_after_a_serial_repro_and_a_second_run_executes_nothing(project, first_run, tmp_path):
    assert stale(project, *TARGETS) == {}
    assert summary(kiln_run(project, *TARGETS).stdout) == dict.fromkeys(STAGES, "up to date")
    other = copy_project(project, tmp_path / "repo")
    sh(other, "dvc", "repro", *TARGETS)
    from ruamel.yaml import YAML

    ours = YAML(typ="safe").load((project / "dvc.lock").read_text())
    theirs = YAML(typ="safe").load((other / "dvc.lock").read_text())
    assert ours == theirs


def test_a_failed_stage_still_skips_its_dependents(project, first_run):
    set_params(project, "data.yaml", "corpus", source="path", path="missing.txt")
    try:
        failed = kiln_run(project, *TARGETS, check=False)
        assert failed.returncode == 1
        table = summary(failed.stderr)
        assert table["corpus"] == "failed" and table["ngram"] == "skipped"
        assert table["scenes"] == "up to date"
    finally:
        sh(project, "git", "checkout", "--", "params/data.yaml")


def test_dask_task_runner_runs_two_stages(project, first_run):
    set_params(project, "runtime.yaml", "runtime", task_runner="dask")  # a local cluster of 2 workers
    set_params(project, "data.yaml", "corpus", min_count=3)
    set_params(project, "detection.yaml", "scenes", clutter=1)
    try:
        done = kiln_run(project, "corpus", "scenes")
        assert summary(done.stdout) == {"corpus": "ran", "scenes": "ran"}
        assert stale(project, "corpus", "scenes") == {}
    finally:
        sh(project, "git", "checkout", "--", "params/runtime.yaml", "params/data.yaml", "params/detection.yaml")
