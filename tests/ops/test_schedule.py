"""Scheduled end-to-end runs: `kiln serve --cron` registers a deployment with a cron schedule on a real
Prefect server (started the way `make prefect-server` starts it, on a free loopback port), and a run of
that deployment (`prefect deployment run`) reproduces the target and leaves its `kiln run` parent run in
the project's MLflow store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from flows.services import start_prefect, stop_process
from tests.ops.conftest import free_port, keep_artifact
from tests.pipeline.helpers import ENV, runs_of, sh, smoke_project

pytestmark = pytest.mark.pipeline

FLOW, DEPLOYMENT, CRON = "kiln-scheduled-run", "kiln-cron", "0 3 * * *"


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("prefect-server")
    api = start_prefect(folder, free_port())
    yield api, folder
    stop_process(folder, "prefect")
    keep_artifact(folder / "prefect.log", "prefect-server.log")


def wait_for_deployment(api: str, serving: subprocess.Popen, log: Path, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert serving.poll() is None, f"kiln serve exited with {serving.returncode}:\n{log.read_text()[-4000:]}"
        answer = requests.get(f"{api}/deployments/name/{FLOW}/{DEPLOYMENT}", timeout=5)
        if answer.status_code == 200:
            return answer.json()
        time.sleep(0.5)
    raise AssertionError(f"no deployment {FLOW}/{DEPLOYMENT} after {timeout_s:g} s:\n{log.read_text()[-4000:]}")


def test_kiln_serve_schedules_the_end_to_end_run_and_a_run_completes(
    prefect_api, tmp_path: Path, repo_root: Path
) -> None:
    api, _ = prefect_api
    project = smoke_project(repo_root, tmp_path / "repo")
    env = {
        **ENV,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serving = subprocess.Popen(
            ["kiln", "serve", "--cron", CRON, "--target", "corpus"],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deployment = wait_for_deployment(api, serving, log)
        (schedule,) = deployment["schedules"]
        assert schedule["schedule"]["cron"] == CRON and schedule["active"]
        assert deployment["parameters"] == {"targets": ["corpus"], "root": str(project)}

        done = sh(
            project,
            "prefect",
            "deployment",
            "run",
            f"{FLOW}/{DEPLOYMENT}",
            "--watch",
            "--watch-interval",
            "1",
            "--watch-timeout",
            "120",
            check=False,
            env=env,
        )
        assert done.returncode == 0 and "Completed" in done.stdout, (
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\nkiln serve:\n{log.read_text()[-6000:]}"
        )
    finally:
        os.killpg(serving.pid, signal.SIGTERM)
        try:
            serving.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(serving.pid, signal.SIGKILL)
            serving.wait()
        keep_artifact(log, "kiln-serve.log")

    # What `kiln run --target corpus` leaves: the stage's outputs, locked, and the MLflow parent run with
    # the stage's run nested under it.
    assert (project / "data" / "prepared" / "corpus" / "train.parquet").is_file()
    assert "corpus:" in (project / "dvc.lock").read_text()
    (parent,) = runs_of(project, "pipeline", "kiln run")
    assert parent.info.status == "FINISHED" and parent.data.metrics["stages_ran"] == 1
    (stage,) = runs_of(project, "text", "corpus")
    assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_prefect_yaml_deploys_a_cron_deployment_to_a_process_work_pool(
    prefect_api, tmp_path: Path, repo_root: Path
) -> None:
    api, _ = prefect_api
    # A copy of what `prefect deploy` reads, so the deploy cannot touch the working tree.
    folder = tmp_path / "deploy"
    for name in ("prefect.yaml", "flows/schedule.py", "flows/__init__.py"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes((repo_root / name).read_bytes())
    env = {**ENV, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect-client")}
    sh(folder, "prefect", "work-pool", "create", "kiln-process", "--type", "process", env=env)
    sh(folder, "prefect", "--no-prompt", "deploy", "--name", "nightly", env=env)
    answer = requests.get(f"{api}/deployments/name/{FLOW}/nightly", timeout=5)
    assert answer.status_code == 200, answer.text
    deployment = answer.json()
    assert deployment["work_pool_name"] == "kiln-process"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    assert deployment["entrypoint"] == "flows/schedule.py:scheduled_run"
    # Without pull steps in prefect.yaml, the worker runs the flow in the folder it was deployed from.
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(folder)}}
    ], deployment["pull_steps"]
