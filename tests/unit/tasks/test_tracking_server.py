"""The MLflow server check `kiln run` and `kiln stage` make first: a server that answers passes, one
that is down fails within the timeout, naming the URI; local stores are never probed."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.tracking import TrackingServerUnreachable, check_tracking_server


@pytest.fixture(autouse=True)
def no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    # requests sends even loopback traffic through a configured proxy unless NO_PROXY says otherwise.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@contextmanager
def http_server(status: int) -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on a free loopback port answering every GET with `status`; yields its base
    URL and the paths it was asked for."""
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            body = b"OK"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port() -> int:
    """A loopback port nothing listens on: one the kernel just handed out and that was closed again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_server_that_answers_passes_and_is_asked_for_health_under_its_path() -> None:
    with http_server(200) as (url, paths):
        check_tracking_server(url)
        check_tracking_server(url + "/mlflow/")  # a server behind a path prefix, given with a trailing slash
    assert paths == ["/health", "/mlflow/health"]


def test_a_server_that_answers_with_a_client_error_is_reachable() -> None:
    # A 401 or 404 (a login wall, a proxy without /health) still means something answers there.
    with http_server(404) as (url, paths):
        check_tracking_server(url)
    assert paths == ["/health"]


def test_a_gateway_reporting_the_server_down_fails() -> None:
    with http_server(503) as (url, _):
        with pytest.raises(TrackingServerUnreachable, match=rf"{url} answered GET /health with 503"):
            check_tracking_server(url)


def test_a_closed_port_fails_at_once_naming_the_uri() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    start = time.perf_counter()
    with pytest.raises(
        TrackingServerUnreachable,
        match=rf"^MLflow tracking server {url} is unreachable: "
        "Connection refused$",
    ):
        check_tracking_server(url)
    assert time.perf_counter() - start < 2.0, "a refused connection must not be retried"


def test_a_server_that_accepts_but_never_answers_times_out() -> None:
    # The kernel completes the TCP handshake from the listen backlog; nothing ever reads or replies.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.perf_counter()
        with pytest.raises(TrackingServerUnreachable, match=rf"{url} did not answer within 0.5 s"):
            check_tracking_server(url, timeout_s=0.5)
        assert time.perf_counter() - start < 3.0


def test_a_password_in_the_uri_stays_out_of_the_message() -> None:
    port = closed_port()
    with pytest.raises(TrackingServerUnreachable) as raised:
        check_tracking_server(f"https://alice:s3cret@127.0.0.1:{port}")
    assert f"https://***@127.0.0.1:{port}" in str(raised.value) and "s3cret" not in str(raised.value)


@pytest.mark.parametrize("uri", ["sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns", "databricks"])
def test_local_and_non_http_stores_are_not_probed(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{uri} was probed over HTTP")

    monkeypatch.setattr(requests, "get", no_network)
    check_tracking_server(uri)


def test_a_dvc_experiment_copy_tracks_into_the_projects_store(monkeypatch, tmp_path):
    from tasks.tracking import dvc_experiment_tags, resolve_tracking_uri

    project, copy = tmp_path / "repo", tmp_path / "repo/.dvc/tmp/exps/tmpabc"
    copy.mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert resolve_tracking_uri("sqlite:///mlflow.db", copy) == f"sqlite:///{copy.resolve()}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.setenv("DVC_EXP_NAME", "urban-dace")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    assert resolve_tracking_uri("sqlite:///mlflow.db", copy) == f"sqlite:///{project.resolve()}/mlflow.db"
    assert resolve_tracking_uri("http://127.0.0.1:5001", copy) == "http://127.0.0.1:5001"
    assert dvc_experiment_tags() == {"dvc.exp.name": "urban-dace", "dvc.exp.baseline_rev": "a" * 40}


def test_experiments_are_model_training_with_a_description_and_default_is_gone(tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks.tracking import ensure_experiment

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_experiment_by_name("Default") is not None  # MLflow creates it with the store
    experiment = client.get_experiment(ensure_experiment(client, "text"))
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"].startswith("Kiln, text:")
    assert [e.name for e in client.search_experiments()] == ["text"]
    assert ensure_experiment(client, "text") == experiment.experiment_id  # found again, not re-created


def test_a_run_left_running_by_a_dead_process_is_marked_killed(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from tasks.tracking import ensure_experiment, mark_orphans_killed

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = ensure_experiment(client, "text")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()

    def running(pid: int, stage: str = "ngram", on: str = host) -> str:
        tags = {"kiln.stage": stage, "kiln.pid": str(pid), "kiln.host": on}
        return client.create_run(experiment, run_name=stage, tags=tags).info.run_id

    orphan, alive = running(int(dead.stdout)), running(os.getpid())
    elsewhere, other_stage = running(int(dead.stdout), on="another-host"), running(int(dead.stdout), stage="corpus")
    assert mark_orphans_killed(client, experiment, "ngram") == [orphan]
    assert client.get_run(orphan).info.status == "KILLED"
    assert {client.get_run(r).info.status for r in (alive, elsewhere, other_stage)} == {"RUNNING"}
