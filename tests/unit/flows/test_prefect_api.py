"""flows/prefect_api.py's shared server: the `kiln stage`s of a `dvc repro` use one Prefect server per
project, started by the first, reused by the next, stopped once no stage has used it for the idle time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

from flows.prefect_api import IDLE_ENV, STATE_DIR, shared_prefect_api
from tasks.processes import process_alive

USE_IT = "import sys; from pathlib import Path; from flows.prefect_api import shared_prefect_api\n" + (
    "with shared_prefect_api(Path(sys.argv[1])) as url: print(url)"
)


def listening(url: str) -> bool:
    parsed = urlparse(url)
    with socket.socket() as probe:
        return probe.connect_ex((parsed.hostname, parsed.port)) == 0


def test_stages_share_one_server_and_it_stops_when_idle(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv(IDLE_ENV, "2")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    state = tmp_path / STATE_DIR
    with shared_prefect_api(tmp_path) as url:
        keeper = json.loads((state / "server.json").read_text())["pid"]
        assert keeper != os.getpid() and listening(url)
        assert (state / "leases" / str(os.getpid())).is_file()
        # Another stage while this one holds its lease: the same server, no second keeper.
        other = subprocess.run([sys.executable, "-c", USE_IT, str(tmp_path)], env=env, capture_output=True, text=True)
        assert other.returncode == 0, other.stderr[-2000:]
        assert other.stdout.strip() == url
        time.sleep(3)  # past the idle time, but a lease is held: it keeps running
        assert process_alive(keeper) and listening(url)
    assert not (state / "leases" / str(os.getpid())).exists()
    deadline = time.monotonic() + 30
    while process_alive(keeper) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not process_alive(keeper), "the keeper outlived its idle time"
    assert not (state / "server.json").exists() and not listening(url)


def test_a_dead_holders_lease_does_not_keep_the_server(tmp_path):
    from flows.prefect_api import _live_leases

    leases = tmp_path / "leases"
    leases.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (leases / str(dead.pid)).write_text("")
    (leases / str(os.getpid())).write_text("")
    assert _live_leases(tmp_path) == [os.getpid()]
    assert sorted(p.name for p in leases.iterdir()) == [str(os.getpid())]


def test_kiln_runs_server_boots_in_a_thread_and_outlives_it_until_stopped(monkeypatch):
    """`kiln run` boots its server in a thread while it checks the params. The server is a child whose
    parent-death signal follows the thread that started it, so the thread must stay until the server stops:
    once a first version let it end, the server died a moment after answering."""
    from flows.prefect_api import booting_prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with booting_prefect_api() as api:
        url = api.url()
        time.sleep(1.0)  # a server tied to an ended thread is gone by now
        assert listening(url)
        with api.serving() as served:
            assert served == url and os.environ["PREFECT_API_URL"] == url
    assert not listening(url)
    assert "PREFECT_API_URL" not in os.environ


def test_a_run_stopped_before_it_used_its_server_says_nothing_of_it(monkeypatch):
    """A params error stops `kiln run` while its server boots: the user reads the error, not Prefect's
    "Starting temporary server" and "Stopping temporary server" of a server the run never used."""
    import logging

    from flows.prefect_api import booting_prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    seen: list[str] = []

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Record()
    logging.getLogger("prefect").addHandler(handler)
    try:
        try:
            with booting_prefect_api() as api:
                url = api.url()
                raise ValueError("params/lm.yaml: a bad value")
        except ValueError:
            pass
        assert not listening(url)
        assert not [m for m in seen if "temporary server" in m], seen
        with booting_prefect_api() as api, api.serving():  # used: both messages, as Prefect prints them
            pass
        assert [m.split(" on ")[0] for m in seen if "temporary server" in m] == [
            "Starting temporary server",
            "Stopping temporary server",
        ], seen
    finally:
        logging.getLogger("prefect").removeHandler(handler)
