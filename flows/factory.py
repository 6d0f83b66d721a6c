"""The one flow factory: a Prefect flow for each stage spec. A flow only wires: open the stage (params,
seed, MLflow run), call the spec's task with its context and inputs, then log the models it trained
(tasks/model_logging.py) to the same run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow

from tasks.model_logging import log_stage_models
from tasks.spec import StageSpec
from tasks.stage import open_stage

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
    return (lambda: f(item)) if item else f


def family_flows(family: str) -> dict[str, Callable[..., Any]]:
    """Stage name -> Prefect flow for every spec of one family package (`tasks/<family>/`)."""
    from flows.registry import all_specs

    return {spec.name: stage_flow_of(spec) for spec in all_specs() if spec.family == family}
