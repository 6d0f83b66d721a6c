"""The one flow factory: a Prefect flow for each stage spec. A flow only wires: open the stage (params,
seed, MLflow run), call the spec's task with its context and inputs, then log the models it trained
(tasks/model_logging.py) to the same run."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from prefect import flow

from tasks.model_logging import log_stage_models
from tasks.spec import StageSpec
from tasks.stage import open_stage
from tasks.tracking import PARENT_RUN_ENV

_FLOWS: dict[str, Callable[..., Any]] = {}


def stage_flow_of(spec: StageSpec) -> Callable[..., Any]:
    """The Prefect flow of `spec` (named after the stage; a foreach takes its item as the parameter)."""
    if spec.name in _FLOWS:
        return _FLOWS[spec.name]

    def run(item: str = "") -> dict[str, Any]:
        with open_stage(spec, item) as stage:
            metrics = spec.task(stage.context, stage.inputs)
            log_stage_models(spec.name, stage.context, metrics)  # outputs written: log what it trained
            return metrics

    run.__name__ = f"{spec.name}_flow"
    run.__doc__ = (spec.task.__doc__ or "").strip() or f"The `{spec.name}` stage."
    _FLOWS[spec.name] = flow(name=spec.name, log_prints=True)(run)
    return _FLOWS[spec.name]


def stage_flow(name: str) -> Callable[[], Any]:
    """A call that runs stage `name` (`lm@lstm`: flow `lm` with item `lstm`)."""
    from flows.registry import get_spec

    spec, item = get_spec(name)
    f = stage_flow_of(spec)

    def call() -> Any:
        with _stage_heartbeats():
            return f(item) if item else f()

    return call


def _stage_heartbeats() -> AbstractContextManager[Any]:
    """No Prefect heartbeat for a stage of a `kiln run` (its MLflow run nested under the pipeline's); a stage
    run alone (`kiln stage`, `dvc repro`) keeps Prefect's default (one every 180 s).

    Prefect sends a flow run's heartbeats from a thread that sleeps in whole seconds, and joins that thread
    when the run ends: every flow run ends up to a second late (a flow that takes 0.25 s took 1.17 s). Under
    `kiln run` the pipeline's flow run keeps its heartbeat, which is what says the run is alive (or, with a
    zombie-flow automation, that it crashed), and the pipeline itself records a stage whose process dies."""
    return without_heartbeats() if os.environ.get(PARENT_RUN_ENV) else nullcontext()


def without_heartbeats() -> AbstractContextManager[Any]:
    """Prefect settings under which the flow runs started inside send no heartbeat."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def family_flows(family: str) -> dict[str, Callable[..., Any]]:
    """Stage name -> Prefect flow for every spec of one family package (`tasks/<family>/`)."""
    from flows.registry import all_specs

    return {spec.name: stage_flow_of(spec) for spec in all_specs() if spec.family == family}
