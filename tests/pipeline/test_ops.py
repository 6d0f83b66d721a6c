"""Operations, in a copy of the project on the smoke profile: a down MLflow server stops `kiln run` and
`kiln stage` before anything runs; the default DVC remote takes `dvc push` and gives a fresh clone back
everything it needs, so `kiln run` there has nothing to do.

The tests of this module share one copy.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from tests.pipeline.helpers import kiln_run, sh, smoke_project, stale, summary

pytestmark = pytest.mark.pipeline

# requests sends even loopback traffic through a configured proxy unless NO_PROXY says otherwise.
LOOPBACK = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    # Its own parent folder: the default remote is `../kiln-dvc-remote` from the repo, so it lands in it too.
    return smoke_project(repo_root, tmp_path_factory.mktemp("ops") / "repo")


def closed_port() -> int:
    """A loopback port nothing listens on: one the kernel just handed out and that was closed again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def files_under(folder: Path) -> dict[str, int]:
    """Every file below `folder` with its modification time: anything a stage wrote changes this."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", [["run", "--target", "corpus"], ["stage", "corpus"]])
def test_unreachable_tracking_server_stops_kiln_before_any_stage(project: Path, command: list[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    data_before, lock_before = files_under(project / "data"), files_under(project / ".dvc" / "tmp")
    # runtime.mlflow_tracking_uri is empty in params/runtime.yaml, so the environment variable decides.
    done = sh(project, "kiln", *command, check=False, env={"MLFLOW_TRACKING_URI": url, **LOOPBACK})
    assert done.returncode == 2, done.stderr[-3000:]
    # One line, no traceback and no Prefect server start-up before it.
    assert done.stderr.splitlines() == [
        f"kiln {command[0]}: error: MLflow tracking server {url} is unreachable: Connection refused; start it, "
        "or point runtime.mlflow_tracking_uri (params/runtime.yaml) or $MLFLOW_TRACKING_URI elsewhere"
    ]
    assert summary(done.stdout) == {}
    assert files_under(project / "data") == data_before, "a stage wrote output"
    # `--target` names are checked against dvc.yaml first (DVC stamps `btime` on its first read of a repo,
    # as `dvc status` does): no lock, no state of a run.
    lock_after = {k: v for k, v in files_under(project / ".dvc" / "tmp").items() if k != "btime"}
    assert lock_after == {k: v for k, v in lock_before.items() if k != "btime"}, "kiln took a lock before checking"


def test_default_remote_is_a_folder_beside_the_repo(project: Path) -> None:
    assert sh(project, "dvc", "remote", "default").stdout.strip() == "local"
    name, url, *_ = sh(project, "dvc", "remote", "list").stdout.split()
    assert name == "local" and Path(url) == project.parent / "kiln-dvc-remote"


def test_a_fresh_clone_pulls_from_the_default_remote_and_has_nothing_to_rerun(project: Path) -> None:
    kiln_run(project, "corpus")
    # dvc.lock, and the metrics, which live in git (cache: false), not in DVC's cache or remote
    sh(project, "git", "add", "dvc.lock", "data/metrics/corpus.json")
    sh(project, "git", "commit", "-qm", "corpus outputs")
    sh(project, "dvc", "push", "corpus")
    remote = project.parent / "kiln-dvc-remote"
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push wrote nothing to the default remote"
    assert sh(project, "dvc", "status", "--cloud", "--json", "corpus").stdout.strip() == "{}"

    # A clone beside the first resolves the same relative remote; it has no DVC cache and of data/ only what
    # git keeps (the metrics).
    clone = project.parent / "clone"
    sh(project.parent, "git", "clone", "-q", str(project), str(clone))
    assert not (clone / "data" / "prepared").exists() and not (clone / ".dvc" / "cache").exists()
    assert (clone / "data/metrics/corpus.json").read_bytes() == (project / "data/metrics/corpus.json").read_bytes()
    assert stale(clone, "corpus") != {}
    sh(clone, "dvc", "pull", "corpus")
    outputs = ("data/prepared/corpus", "data/metrics/corpus.json")
    assert {o: files_content(clone / o) for o in outputs} == {o: files_content(project / o) for o in outputs}
    assert stale(clone, "corpus") == {}
    # The tracking store is no part of this; a copy of an existing one spares MLflow's schema migrations.
    shutil.copy2(project / "mlflow.db", clone / "mlflow.db")
    assert summary(kiln_run(clone, "corpus").stdout) == {"corpus": "up to date"}


def files_content(path: Path) -> dict[str, bytes]:
    """A file's bytes, or every file's bytes below a folder, by relative name."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
