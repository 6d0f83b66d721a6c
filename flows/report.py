"""The `report` flow: every family's metrics in one page."""

from __future__ import annotations

from prefect import flow

from tasks.report import report_task
from tasks.stage import open_stage


@flow(name="report", log_prints=True)
def report_flow() -> dict[str, float]:
    with open_stage("report", family="pipeline", sections=[]) as stage:
        return report_task(stage.env.root, stage.run)
