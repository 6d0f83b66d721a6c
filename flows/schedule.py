"""The end-to-end run on a schedule: `kiln serve --cron EXPR` and the deployment in `prefect.yaml`.

`scheduled_run` is what `kiln run` does, as one flow a Prefect deployment can start: it takes the repo's
run lock (a scheduled run that finds a `kiln run` still going fails at once, naming it), checks the MLflow
server, then runs the end-to-end flow as a subflow. Schedules need a real Prefect server
(`make prefect-server`): the temporary local API that `kiln run` starts has no scheduler.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow

DEPLOYMENT = "kiln-cron"


class NoPrefectServer(RuntimeError):
    """No Prefect server is configured, and the temporary local API has no scheduler."""


@flow(name="kiln-scheduled-run", log_prints=True)
def scheduled_run(targets: list[str] | None = None, root: str | None = None) -> list[dict]:
    """`kiln run [--target ...]` in the project at `root` (default: the working directory's)."""
    from flows.pipeline import configured_pipeline_flow, require_tracking_server
    from flows.run_lock import exclusive_run
    from tasks.runtime import load_runtime, repo_root

    project = repo_root(Path(root) if root else None)
    os.chdir(project)  # stages resolve data/ and the default sqlite store from the working directory
    require_tracking_server(project)
    # The same flow as `kiln run`, with the task runner params/runtime.yaml asks for.
    pipeline_flow = configured_pipeline_flow(load_runtime(project / "params"))
    with exclusive_run(project):
        outcomes = pipeline_flow(targets=targets or None)
    return [{"stage": o.stage, "status": o.status, "seconds": round(o.seconds, 2)} for o in outcomes]


def serve(cron: str, targets: list[str] | None, root: Path, name: str = DEPLOYMENT) -> None:
    """Register the deployment with its cron schedule and run its flow runs here until interrupted."""
    from prefect.settings import PREFECT_API_URL

    if not (os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()):
        raise NoPrefectServer(
            "kiln serve needs a Prefect server (the temporary local API cannot schedule): "
            "`make prefect-server`, then export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    scheduled_run.serve(
        name=name,
        cron=cron,
        parameters={"targets": targets or None, "root": str(root)},
        description=f"kiln run {' '.join('--target ' + t for t in targets or [])}".strip(),
    )
