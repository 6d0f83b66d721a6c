"""Operations tests talk to real servers on loopback (Prefect, PostgreSQL + MLflow, Chromium).

`make test` installs what they need (`make services`). A missing program fails the test with what to
install; only KILN_SKIP_SERVICE_TESTS=1 turns that into a skip (for a machine where you know you cannot
install them).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"  # git-ignored: screenshots and server logs worth keeping from a run
# requests sends even loopback traffic through a configured proxy unless NO_PROXY says otherwise.
LOOPBACK = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def require(program: str, install: str) -> str:
    """The path of `program`, or fail (skip only with KILN_SKIP_SERVICE_TESTS=1) saying how to install it."""
    found = shutil.which(program) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{program}"))), None)
    if found:
        return str(found)
    message = f"{program} is not installed: `make services` ({install}) installs it"
    if os.environ.get("KILN_SKIP_SERVICE_TESTS") == "1":
        pytest.skip(message + "; skipped because KILN_SKIP_SERVICE_TESTS=1")
    pytest.fail(message + "; set KILN_SKIP_SERVICE_TESTS=1 to skip the service tests instead", pytrace=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def keep_artifact(source: Path, name: str) -> Path:
    """Copy a file worth looking at after the run into test-artifacts/ and return where it is."""
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / name
    shutil.copyfile(source, target)
    return target


@pytest.fixture(autouse=True)
def _loopback_without_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in LOOPBACK.items():
        monkeypatch.setenv(key, value)


PLANTED_PASSWORD = "planted-Secret-4711"


@dataclass(frozen=True)
class LoggedRun:
    url: str  # the MLflow server
    project: Path  # the smoke copy whose `kiln stage corpus` logged to it
    services: Path  # its pid, log and data folder
    pg_port: int
    output: str  # everything the stage printed (stdout and stderr), with a password planted in its URI


@pytest.fixture(scope="session")
def mlflow_server_run(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Iterator[LoggedRun]:
    """PostgreSQL and an MLflow server on it, started as `make mlflow-server` starts them, on free ports,
    holding the run of `kiln stage corpus` in a smoke copy: shared by the REST and the UI tests."""
    from flows.services import start_mlflow, stop_all
    from tests.pipeline.helpers import sh, smoke_project

    require("pg_ctl", "apt-get install postgresql")
    # Not pytest's tmp_path: that sits under a 0700 folder, and the cluster belongs to the `postgres` user
    # when the tests run as root.
    folder = Path(tempfile.mkdtemp(prefix="kiln-ops-pg-"))
    folder.chmod(0o711)
    pg_port = free_port()
    try:
        url = start_mlflow(folder, free_port(), pg_port=pg_port)
        project = smoke_project(repo_root, tmp_path_factory.mktemp("mlflow-server") / "repo")
        # The server asks for no credentials; the URI carries some anyway, as a user's might: none may be printed.
        with_password = url.replace("http://", f"http://kiln:{PLANTED_PASSWORD}@")
        env = {"MLFLOW_TRACKING_URI": with_password, "OMP_NUM_THREADS": "1", **LOOPBACK}
        done = sh(project, "kiln", "stage", "corpus", env=env)
        yield LoggedRun(url, project, folder, pg_port, done.stdout + done.stderr)
    finally:
        stop_all(folder)
        for log in ("mlflow.log", "pg/postgres.log"):
            if (folder / log).exists():
                keep_artifact(folder / log, f"mlflow-server-{Path(log).name}")
        shutil.rmtree(folder, ignore_errors=True)
