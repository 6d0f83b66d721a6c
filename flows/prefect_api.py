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
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
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


class _SubprocessWithParentDeath:
    """The `subprocess` module as Prefect's server module sees it while it spawns the server: its `Popen`
    adds the parent-death signal."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs) -> subprocess.Popen:  # noqa: N802 - stands in for subprocess.Popen
        return subprocess.Popen(*args, preexec_fn=die_with_parent, **kwargs)


def _server_class():
    import prefect.server.api.server as server_module

    class ChildServer(server_module.SubprocessASGIServer):
        """Prefect's temporary API server, started as a child that its parent's death ends."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Prefect builds the server's command line itself; only the spawn is wrapped, and only as
            # Prefect's module sees it (other threads may start processes meanwhile: kiln run boots the
            # server in a thread).
            with mock.patch.object(server_module, "subprocess", _SubprocessWithParentDeath()):
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


class _HeldRecords(logging.Filter):
    """Keeps back the log records of one thread until `release`: the booting server's "Starting temporary
    server ..." is printed once the run uses it, so a run that a params error stops prints its one error
    line, not the start and stop of a server it never used."""

    def __init__(self, thread_name: str) -> None:
        super().__init__()
        self.thread_name = thread_name
        self.held: list[logging.LogRecord] = []
        self.released = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.released and record.threadName == self.thread_name:
            self.held.append(record)
            return False
        return True

    def release(self, logger: logging.Logger) -> None:
        self.released = True
        logger.removeFilter(self)
        for record in self.held:
            logger.handle(record)
        self.held.clear()


class BootingAPI:
    """The configured API, else a server of this process's own that starts booting, in a thread, when this
    object is made: the caller's next steps (`kiln run` checks every params section, which imports every
    stage module) overlap its start, about 6 s that are mostly the server process's own imports."""

    def __init__(self, timeout_s: int = 90) -> None:
        self._configured = _configured()
        self._server = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._held = _HeldRecords("kiln-prefect-api")
        self._ready, self._stopped = threading.Event(), threading.Event()
        if not self._configured:
            logging.getLogger("prefect").addFilter(self._held)
            self._thread = threading.Thread(target=self._boot, args=(timeout_s,), name="kiln-prefect-api", daemon=True)
            self._thread.start()

    def _boot(self, timeout_s: int) -> None:
        try:
            self._server = start_child_server(timeout_s)
        except BaseException as err:  # noqa: BLE001 - raised in the caller's thread, by url()
            self._error = err
        finally:
            self._ready.set()
        # The server gets SIGTERM when the thread that started it exits (PR_SET_PDEATHSIG follows the
        # thread, not the process), so this thread lives as long as the server does.
        self._stopped.wait()

    def url(self) -> str:
        """The API's URL, once the server answers."""
        if self._configured:
            return self._configured
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self._server.api_url

    @contextmanager
    def serving(self) -> Iterator[str]:
        """This process's flows report to the API while the block runs."""
        if self._configured:
            yield self._configured
            return
        url = self.url()
        self._held.release(logging.getLogger("prefect"))  # "Starting temporary server on ...", as before
        with _using(url) as url:
            yield url

    def stop(self) -> None:
        """Stop the server of our own, once it has finished starting (a no-op for a configured API)."""
        if self._thread is not None:
            self._ready.wait()
            if self._server is not None:
                unused = not self._held.released
                logger = logging.getLogger("prefect")
                logger.disabled = unused  # nor its "Stopping temporary server"
                try:
                    self._server.stop()
                finally:
                    logger.disabled = False
                self._server = None
            logging.getLogger("prefect").removeFilter(self._held)
            self._stopped.set()
            self._thread.join()


@contextmanager
def booting_prefect_api(timeout_s: int = 90) -> Iterator[BootingAPI]:
    """A `BootingAPI`, its server stopped when the block ends."""
    api = BootingAPI(timeout_s)
    try:
        yield api
    finally:
        api.stop()


@contextmanager
def local_prefect_api(timeout_s: int = 90) -> Iterator[str]:
    """The configured API, else a server of this process's own for as long as the block runs."""
    with booting_prefect_api(timeout_s) as api, api.serving() as url:
        yield url


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
