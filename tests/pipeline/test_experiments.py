"""DVC experiments and MLflow together, as a DVC user sweeps: two queued experiments (`dvc exp run --queue
-S ...`, `dvc queue start`) each run in a temporary copy of the repo that DVC deletes afterwards, yet
their MLflow runs land in the project's store, tagged with the experiment's name and baseline commit,
and `dvc exp show` lists both with their metrics.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest

from tests.pipeline.helpers import kiln_run, runs_of, sh, smoke_project

pytestmark = pytest.mark.pipeline

ORDERS = (2, 4)  # the smoke profile's ngram.order is 3: both points differ from the baseline


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root) -> Path:
    project = smoke_project(repo_root, tmp_path_factory.mktemp("kiln") / "repo")
    kiln_run(project, "ngram")
    # The baseline a queued experiment starts from is a commit: its dvc.lock and metrics in git, the data
    # in the local DVC cache (where kiln run put it).
    sh(project, "git", "add", "dvc.lock", "data/metrics", "data/plots")
    sh(project, "git", "commit", "-qm", "baseline")
    return project


def wait_for_queue(project: Path, experiments: int, timeout_s: float = 600) -> str:
    """`dvc queue status` once its worker has ended `experiments` experiments (Success or Failed). Polled:
    `dvc queue logs -f` cannot wait for an experiment the worker has not picked up yet (DVC answers "in
    queue but has not been started", or "not a valid queued experiment name" while it moves it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = sh(project, "dvc", "queue", "status").stdout
        if status.count("Success") + status.count("Failed") >= experiments:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(2.0)


@pytest.fixture(scope="module")
def sweep(project) -> str:
    for order in ORDERS:
        sh(
            project,
            "dvc",
            "exp",
            "run",
            "ngram",
            "--queue",
            "-n",
            f"order{order}",
            "-S",
            f"params/lm.yaml:ngram.order={order}",
        )
    sh(project, "dvc", "queue", "start", "-j", "1")
    status = wait_for_queue(project, len(ORDERS))
    assert "Failed" not in status, status
    return sh(project, "git", "rev-parse", "HEAD").stdout.strip()


def test_a_queued_sweep_logs_both_experiments_to_the_project_store(project, sweep):
    runs = runs_of(project, "text", "ngram")
    swept = {r.data.tags.get("dvc.exp.name"): r for r in runs if "dvc.exp.name" in r.data.tags}
    assert set(swept) == {f"order{o}" for o in ORDERS}, sorted(swept)
    for order in ORDERS:
        run = swept[f"order{order}"]
        assert run.info.status == "FINISHED"
        assert run.data.params["ngram.order"] == str(order)
        assert run.data.tags["dvc.exp.baseline_rev"] == sweep
        assert run.data.metrics["test_perplexity"] > 1
    # Each experiment ran in a temporary copy that DVC has deleted: no store was left behind there.
    assert not list((project / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))


def test_dvc_exp_show_lists_both_experiments_with_their_metrics(project, sweep):
    shown = json.loads(sh(project, "dvc", "exp", "show", "--json").stdout)
    (baseline,) = [entry for entry in shown if entry["rev"] == sweep]
    experiments = {e["name"]: e for e in baseline.get("experiments") or []}
    assert {f"order{o}" for o in ORDERS} <= set(experiments), sorted(experiments)
    for order in ORDERS:
        (rev,) = experiments[f"order{order}"]["revs"]
        data = rev["data"]
        assert data["params"]["params/lm.yaml"]["data"]["ngram"]["order"] == order
        metrics = data["metrics"]["data/metrics/ngram.json"]["data"]
        assert metrics, f"order{order}: no ngram metrics"
    # --only-changed keeps the swept param, and no cell of the baseline or the experiments is missing ("!").
    rows = list(csv.DictReader(io.StringIO(sh(project, "dvc", "exp", "show", "--only-changed", "--csv").stdout)))
    assert "ngram.order" in rows[0], sorted(rows[0])
    assert {row["Experiment"] for row in rows} >= {f"order{o}" for o in ORDERS}
    assert not [(row["Experiment"], k) for row in rows for k, v in row.items() if v == "!"]


def test_dvc_exp_run_cannot_interleave_with_kiln_run(project, sweep):
    """`kiln run` holds DVC's repo lock for its whole length, as `dvc repro` does: a workspace `dvc exp
    run -S ...` started meanwhile stops at once, before writing its param into the workspace."""
    import subprocess
    import time

    import zc.lockfile

    from tests.pipeline.helpers import ENV, prefect_api

    params = (project / "params/lm.yaml").read_text()
    run = subprocess.Popen(
        ["kiln", "run", "--force", "--target", "ngram"],
        cwd=project,
        env={**ENV, "PREFECT_API_URL": prefect_api()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the run holds DVC's lock
            try:
                zc.lockfile.LockFile(str(project / ".dvc/tmp/lock")).close()
            except zc.lockfile.LockError:
                break
            assert run.poll() is None, run.stdout.read() if run.stdout else ""
            time.sleep(0.1)
        else:
            raise AssertionError("kiln run never took DVC's lock")
        exp = sh(project, "dvc", "exp", "run", "ngram", "-S", "params/lm.yaml:ngram.order=5", check=False)
        assert exp.returncode != 0 and "Unable to acquire lock" in exp.stderr, exp.stderr
        assert (project / "params/lm.yaml").read_text() == params
    finally:
        out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
