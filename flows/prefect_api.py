"""One local Prefect API for a whole `kiln run`.

Without a configured `PREFECT_API_URL`, Prefect starts a temporary server per process (~6 s). The
end-to-end run starts one itself and exports its URL, so every flow of the run, in this process or in a
`dvc repro` child, reports to the same API and appears in the same run history. A configured server
(`PREFECT_API_URL`, e.g. from `prefect server start`) is used as it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def local_prefect_api(timeout_s: int = 90) -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=timeout_s)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
            # Deliver queued logs and events while the server is still there to take them.
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
