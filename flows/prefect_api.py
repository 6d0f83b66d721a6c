"""One local Prefect API for a whole `kiln run`.

Without a configured `PREFECT_API_URL`, Prefect starts a temporary server per process (~6 s). The
end-to-end run starts one itself and exports its URL, so every flow of the run, in this process or in a
`dvc repro` child, reports to the same API and appears in the same run history. A configured server
(`PREFECT_API_URL`, e.g. from `prefect server start`) is used as it is.

The server process dies with the process that started it, even on `kill -9` (Linux's parent-death
signal), so a killed run leaves no server holding its port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

PR_SET_PDEATHSIG = 1  # prctl(2)


def _die_with_parent() -> None:
    """In the forked child before exec: SIGTERM when the parent dies (a no-op off Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _server_class():
    from prefect.server.api.server import SubprocessASGIServer

    class ChildServer(SubprocessASGIServer):
        """Prefect's temporary API server, started as a child that its parent's death ends."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            popen = subprocess.Popen

            def with_parent_death(*args, **kwargs):
                return popen(*args, preexec_fn=_die_with_parent, **kwargs)

            # Prefect builds the server's command line itself; only the spawn is wrapped.
            with mock.patch.object(subprocess, "Popen", with_parent_death):
                return super()._run_uvicorn_command()

    return ChildServer


@contextmanager
def local_prefect_api(timeout_s: int = 90) -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    server = _server_class()()
    server.start(timeout=timeout_s)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                # Deliver queued logs and events while the server is still there to take them (a failed
                # run too: else Prefect's log worker retries against the stopped server at exit).
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10)
                EventsWorker.drain_all(timeout=10)
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
