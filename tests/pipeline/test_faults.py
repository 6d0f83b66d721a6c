"""Faults, in a copy of the project on the smoke profile: a `kiln run` killed mid-training leaves no
partial output and the rerun resumes from the checkpoint; a transient stage failure is retried as
`runtime.stage_retries` says; a second `kiln run` refuses while one holds the repo.

Two stages exist only in the copy's dvc.yaml, as `dvc repro --single-item` runs any command that is not
`kiln stage NAME`: `flaky` fails as many times as `faults/failures_left` says, then succeeds; `hold`
runs until the test creates `faults/release`. The tests of this module share one copy.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.pipeline.helpers import ENV, kiln_run, prefect_api, runs_of, set_params, sh, smoke_project, stale, summary

pytestmark = pytest.mark.pipeline

FLAKY = """\
import sys
from pathlib import Path

with open("faults/attempts.log", "a") as log:
    log.write("attempt\\n")
budget = Path("faults/failures_left")
left = int(budget.read_text()) if budget.exists() else 0
if left:
    budget.write_text(str(left - 1))
    sys.exit(f"flaky: transient failure ({left} left)")
Path("data/flaky").mkdir(parents=True, exist_ok=True)
Path("data/flaky/ok.txt").write_text("ok\\n")
"""

HOLD = """\
import sys
import time
from pathlib import Path

Path("faults/holding").touch()
deadline = time.monotonic() + 300
while not Path("faults/release").exists():
    if time.monotonic() > deadline:
        sys.exit("hold: never released")
    time.sleep(0.05)
Path("data/hold").mkdir(parents=True, exist_ok=True)
Path("data/hold/done.txt").write_text("done\\n")
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    from ruamel.yaml import YAML

    project = smoke_project(repo_root, tmp_path_factory.mktemp("faults") / "repo")
    (project / "faults").mkdir()
    (project / "faults" / "flaky.py").write_text(FLAKY)
    (project / "faults" / "hold.py").write_text(HOLD)
    yaml = YAML()
    dvc_yaml = project / "dvc.yaml"
    document = yaml.load(dvc_yaml.read_text())
    for name in ("flaky", "hold"):
        # A dependency, so that DVC does not treat the stage as always changed.
        document["stages"][name] = {
            "cmd": f"python faults/{name}.py",
            "deps": [f"faults/{name}.py"],
            "outs": [f"data/{name}"],
        }
    with open(dvc_yaml, "w") as out:
        yaml.dump(document, out)
    sh(project, "git", "add", "dvc.yaml", "faults")
    sh(project, "git", "commit", "-qm", "fault stages")
    return project


def temp_leftovers(project: Path) -> list[Path]:
    """What tasks/io.py's atomic writer leaves when it is stopped between its temp file and the rename."""
    return [p for p in (project / "data").rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def wait_for(path: Path, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} before {path} appeared\n{log.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout_s} s\n{log.read_text()[-6000:]}")
        time.sleep(0.02)


def start_kiln_run(project: Path, target: str, log: Path, own_api: bool = False) -> subprocess.Popen:
    """`kiln run --target TARGET` in the background, in its own process group (it starts a Prefect API
    server and maybe `dvc repro` children), with its output in `log`. `own_api`: without the test
    worker's Prefect API, so that the run starts its own (whose fate after a kill is tested)."""
    env = (
        {k: v for k, v in ENV.items() if k != "PREFECT_API_URL"}
        if own_api
        else {**ENV, "PREFECT_API_URL": prefect_api()}
    )
    with open(log, "w") as out:
        return subprocess.Popen(
            ["kiln", "run", "--target", target],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc), e.g. the Prefect API server `kiln run` started."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found += [int(c) for c in text.split()]
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed child whose new parent has not reaped it yet is dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until_dead(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if running(p)]


def open_runs(project: Path) -> list[str]:
    """Names of the runs the project's MLflow store still has RUNNING, in any experiment."""
    from tests.pipeline.helpers import mlflow_client

    client = mlflow_client(project)
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_name for r in client.search_runs(ids, "attributes.status = 'RUNNING'")]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_a_run_killed_mid_training_leaves_no_partial_output_and_the_rerun_resumes(
    project: Path, tmp_path: Path
) -> None:
    import torch

    lm_yaml = project / "params" / "lm.yaml"
    smoke = lm_yaml.read_text()
    # Long enough to still be training when the first checkpoint appears: checkpoints ~1 s apart, so
    # the kill lands between two checkpoint writes, not inside one.
    steps = 3000
    set_params(project, "lm.yaml", "lm_train", steps=steps, checkpoint_every=1000, eval_every=steps, log_every=1000)
    out_dir = project / "data" / "models" / "lm" / "lstm"
    try:
        log = tmp_path / "killed.log"
        killed = start_kiln_run(project, "lm@lstm", log, own_api=True)
        try:
            wait_for(out_dir / "checkpoint.pt", killed, timeout_s=300, log=log)
            server = children(killed.pid)  # the Prefect API the run started
            assert server, "kiln run started no child process"
            os.kill(killed.pid, signal.SIGKILL)  # the run alone, as the OOM killer would: not its group
            killed.wait()
            # Its server got the parent-death signal: no orphan keeps the port.
            assert wait_until_dead(server, timeout_s=10) == []
        finally:
            stop(killed)
        assert killed.returncode == -signal.SIGKILL
        assert sorted(open_runs(project)) == ["kiln run", "lm@lstm"]  # what a kill -9 leaves behind
        assert not (out_dir / "model.pt").exists()
        assert not (project / "data" / "metrics" / "lm" / "lstm.json").exists()
        assert temp_leftovers(project) == []
        # The checkpoint was renamed into place whole, so it loads.
        interrupted_at = torch.load(out_dir / "checkpoint.pt", weights_only=True)["step"]
        assert 0 < interrupted_at < steps and interrupted_at % 1000 == 0

        # The kernel dropped the killed run's lock, DVC's checkpoint out is persistent: the rerun resumes.
        resumed = kiln_run(project, "lm@lstm")
        assert summary(resumed.stdout) == {"corpus": "up to date", "lm@lstm": "ran"}
        assert re.search(
            rf"lm@lstm: resuming from \S+/checkpoint\.pt at step {interrupted_at}\b", resumed.stdout + resumed.stderr
        )  # print() goes through Prefect's logger
        run = runs_of(project, "text", "lm@lstm")[0]
        assert run.info.status == "FINISHED" and run.data.metrics["resumed_from_step"] == interrupted_at
        # The rerun ended the dead process's runs KILLED (their PID is gone): nothing is left RUNNING.
        assert runs_of(project, "text", "lm@lstm")[1].info.status == "KILLED"
        assert open_runs(project) == []
        assert torch.load(out_dir / "checkpoint.pt", weights_only=True)["step"] == steps
        assert (out_dir / "model.pt").is_file() and temp_leftovers(project) == []
        assert stale(project, "lm@lstm") == {}
    finally:
        lm_yaml.write_text(smoke)


def test_a_transient_failure_is_retried_as_many_times_as_stage_retries_says(project: Path) -> None:
    runtime_yaml = project / "params" / "runtime.yaml"
    smoke = runtime_yaml.read_text()
    attempts, budget = project / "faults" / "attempts.log", project / "faults" / "failures_left"
    try:
        set_params(project, "runtime.yaml", "runtime", stage_retries=0, retry_delay_s=0.0)
        budget.write_text("1")
        failed = kiln_run(project, "flaky", check=False)
        assert failed.returncode == 1
        assert summary(failed.stderr) == {"flaky": "failed"}
        assert "flaky: transient failure (1 left)" in failed.stdout + failed.stderr
        assert re.search(
            r"\| flaky \| failed \| [\d.]+ \| RuntimeError: dvc repro --single-item flaky exited with \d+ \|",
            failed.stderr,
        )
        assert attempts.read_text().count("attempt") == 1

        set_params(project, "runtime.yaml", "runtime", stage_retries=1)
        budget.write_text("1")
        attempts.unlink()
        ran = kiln_run(project, "flaky")
        assert summary(ran.stdout) == {"flaky": "ran"}
        assert attempts.read_text().count("attempt") == 2, "one failed attempt, one retry"
        assert (project / "data" / "flaky" / "ok.txt").is_file() and stale(project, "flaky") == {}
    finally:
        runtime_yaml.write_text(smoke)


def test_a_second_kiln_run_refuses_while_the_first_holds_the_repo(project: Path, tmp_path: Path) -> None:
    log = tmp_path / "first.log"
    first = start_kiln_run(project, "hold", log)
    try:
        # `hold` runs inside the first run, so the first run holds the repo lock for certain now.
        wait_for(project / "faults" / "holding", first, timeout_s=300, log=log)
        second = kiln_run(project, "corpus", check=False)
        assert second.returncode == 3
        assert re.fullmatch(
            rf"kiln run: another kiln run \(pid {first.pid}\) is running in \S+ and holds "
            r"\S+kiln-run\.lock; wait for it to finish, or stop it",
            second.stderr.strip(),
        )
        assert summary(second.stdout) == {}
        (project / "faults" / "release").touch()
        assert first.wait(timeout=300) == 0, log.read_text()[-6000:]
    finally:
        stop(first)
    assert summary(log.read_text()) == {"hold": "ran"}


def test_sigterm_ends_a_run_within_10_s_with_its_runs_failed(project: Path, tmp_path: Path) -> None:
    lm_yaml = project / "params" / "lm.yaml"
    smoke = lm_yaml.read_text()
    set_params(project, "lm.yaml", "lm_train", steps=100000, checkpoint_every=500, eval_every=100000, log_every=500)
    out_dir = project / "data" / "models" / "lm" / "lstm"
    (out_dir / "checkpoint.pt").unlink(missing_ok=True)  # so the wait below sees this run's first checkpoint
    try:
        log = tmp_path / "terminated.log"
        process = start_kiln_run(project, "lm@lstm", log)
        try:
            wait_for(out_dir / "checkpoint.pt", process, timeout_s=300, log=log)
            server = children(process.pid)
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
            assert time.monotonic() - start < 10
        finally:
            stop(process)
        assert process.returncode != 0
        assert wait_until_dead(server, timeout_s=5) == []
        assert runs_of(project, "text", "lm@lstm")[0].info.status == "FAILED"
        assert runs_of(project, "pipeline", "kiln run")[0].info.status == "FAILED"
        assert open_runs(project) == []
    finally:
        lm_yaml.write_text(smoke)
