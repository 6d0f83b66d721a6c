"""flows/factory.py: the stage flows' Prefect settings."""

from __future__ import annotations

import pytest
from prefect.settings import get_current_settings

from flows.factory import _stage_heartbeats
from tasks.tracking import PARENT_RUN_ENV


def test_a_stage_of_a_kiln_run_sends_no_prefect_heartbeat_and_a_stage_alone_keeps_them(monkeypatch):
    """Prefect joins a flow run's heartbeat thread, asleep in whole seconds, when the run ends: up to a
    second per stage. Under `kiln run` (the MLflow parent run in the environment) the pipeline's flow run
    keeps the heartbeat; a stage run alone keeps Prefect's default."""
    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None and default >= 30  # Prefect's default: heartbeats on

    monkeypatch.setenv(PARENT_RUN_ENV, "0123456789abcdef")
    with _stage_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == default  # restored after the stage

    monkeypatch.delenv(PARENT_RUN_ENV)
    with _stage_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency == default


@pytest.mark.parametrize("value", ["", None])
def test_an_empty_parent_run_counts_as_none(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    else:
        monkeypatch.setenv(PARENT_RUN_ENV, value)
    with _stage_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency is not None
