"""One local Prefect API for a whole `kiln run`, and one shared by the `kiln stage`s of a `dvc repro`.

Without a configured `PREFECT_API_URL`, Prefect starts a temporary server per process (~6 s). The
end-to-end run starts one itself and exports its URL, so every flow of the run, in this process or in a
`dvc repro` child, reports to the same API and appears in the same run history. A configured server
(`PREFECT_API_URL`, e.g. from `prefect server start`) is used as it is.

That server dies with the process that started it, even on `kill -9` (Linux's parent-death signal), so a
killed run leaves no server holding its port.

`dvc repro` and `dvc exp run` start one `kiln stage` per stage. Alone, each would start its own server;
instead the first one starts a small keeper process (`python -m flows.prefect_api keep`) that runs the
server for the project (state under .kiln/prefect/), and every later stage of the chain reuses it. Each
user holds a lease (a file named after its PID) while its flow runs; the keeper stops the server
$KILN_PREFECT_IDLE_S seconds (default 60) after the last lease ends or its holder dies, or at once when
the project folder goes away. Starting, reusing and stopping happen under one file lock, so two stages
started together share one server and none is stopped while a stage is about to use it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from tasks.processes import process_alive

PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent() -> None:
    """In the forked child before exec: SIGTERM when the parent dies (a no-op off Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def start_child_server(timeout_s: float = 90):
    """Prefect's temporary API server, started as a child that this process's death ends; `.api_url`,
    `.stop()`."""
    # Prefect keeps one server object per `port` argument, None included: without a port of its own, a
    # second server in this process would be the first one, and stopping it would stop the first.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = _server_class()(port)
    server.start(timeout=timeout_s)
    return server


def _server_class():
    from prefect.server.api.server import SubprocessASGIServer

    class ChildServer(SubprocessASGIServer):
        """Prefect's temporary API server, started as a child that its parent's death ends."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            popen = subprocess.Popen

            def with_parent_death(*args, **kwargs):
                return popen(*args, preexec_fn=die_with_parent, **kwargs)

            # Prefect builds the server's command line itself; only the spawn is wrapped.
            with mock.patch.object(subprocess, "Popen", with_parent_death):
                return super()._run_uvicorn_command()

    return ChildServer


def _configured() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None


@contextmanager
def _using(url: str) -> Iterator[str]:
    """Point this process's flows at `url`; on the way out deliver the queued logs and events while the
    server is still there to take them (a failed run too: else Prefect's log worker retries against a
    stopped server at exit)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10)
                EventsWorker.drain_all(timeout=10)
    finally:
        os.environ.pop("PREFECT_API_URL", None)


@contextmanager
def local_prefect_api(timeout_s: int = 90) -> Iterator[str]:
    """The configured API, else a server of this process's own for as long as the block runs."""
    configured = _configured()
    if configured:
        yield configured
        return
    server = start_child_server(timeout_s)
    try:
        with _using(server.api_url) as url:
            yield url
    finally:
        server.stop()


# ------------------------------------------------------------------------------ the shared server

STATE_DIR = Path(".kiln") / "prefect"
IDLE_ENV = "KILN_PREFECT_IDLE_S"
DEFAULT_IDLE_S = 60.0


@contextmanager
def _locked(state: Path) -> Iterator[None]:
    with open(state / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def _live_server(state: Path) -> str | None:
    try:
        record = json.loads((state / "server.json").read_text())
    except (OSError, ValueError):
        return None
    if process_alive(int(record["pid"])) and _healthy(record["url"]):
        return str(record["url"])
    return None


def _live_leases(state: Path) -> list[int]:
    """PIDs of the lease holders still alive; a dead holder's lease (a stage killed with -9) is removed."""
    live = []
    for lease in (state / "leases").glob("*"):
        if lease.name.isdigit() and process_alive(int(lease.name)):
            live.append(int(lease.name))
        else:
            lease.unlink(missing_ok=True)
    return live


def _start_keeper(state: Path, timeout_s: float) -> str:
    idle = os.environ.get(IDLE_ENV, str(DEFAULT_IDLE_S))
    (state / "server.json").unlink(missing_ok=True)
    with open(state / "server.log", "ab") as log:
        keeper = subprocess.Popen(
            [sys.executable, "-m", "flows.prefect_api", "keep", str(state), "--idle", idle],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # not in the stage's process group: a Ctrl-C of one stage spares it
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        url = _live_server(state)
        if url:
            return url
        if keeper.poll() is not None:
            break
        time.sleep(0.2)
    keeper.kill()
    tail = (state / "server.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the shared Prefect server did not start (log {state / 'server.log'}):\n{tail}")


@contextmanager
def shared_prefect_api(root: Path, timeout_s: float = 90) -> Iterator[str]:
    """The configured API, else the project's shared server (started when none runs), leased for as
    long as the block runs."""
    configured = _configured()
    if configured:
        yield configured
        return
    state = root / STATE_DIR
    (state / "leases").mkdir(parents=True, exist_ok=True)
    lease = state / "leases" / str(os.getpid())
    with _locked(state):
        url = _live_server(state) or _start_keeper(state, timeout_s)
        lease.write_text("")
    try:
        with _using(url):
            yield url
    finally:
        lease.unlink(missing_ok=True)


def keep(state: Path, idle_s: float) -> None:
    """The keeper: run the server, publish its URL, stop it once no lease has been live for `idle_s`."""
    server = start_child_server()  # it dies with this process, however this process ends
    record = state / "server.json"
    staged = state / f".server.json.{os.getpid()}"
    staged.write_text(json.dumps({"url": server.api_url, "pid": os.getpid()}))
    staged.replace(record)
    last_used = time.monotonic()
    try:
        while True:
            time.sleep(1.0)
            if not state.is_dir():
                return
            if _live_leases(state):
                last_used = time.monotonic()
                continue
            if time.monotonic() - last_used < idle_s:
                continue
            with _locked(state):  # no stage takes a lease between this look and the withdrawal
                if _live_leases(state):
                    last_used = time.monotonic()
                    continue
                record.unlink(missing_ok=True)
                return
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.prefect_api", description="The shared Prefect server.")
    sub = parser.add_subparsers(dest="command", required=True)
    keeper = sub.add_parser("keep", help="run the server for a project until it has been idle")
    keeper.add_argument("state", type=Path)
    keeper.add_argument("--idle", type=float, default=DEFAULT_IDLE_S)
    args = parser.parse_args(argv)
    keep(args.state, args.idle)


if __name__ == "__main__":
    main()
