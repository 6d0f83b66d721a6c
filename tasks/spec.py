"""The stage spec: each dvc.yaml stage declared once in code, beside the task it runs.

A task module ends with `SPEC = StageSpec(name=..., ...)` (several specs: `SPECS = [...]`). Everything
else is derived from the specs: the Prefect flow of each stage (`flows/factory.py`), the stage-to-flow
table and the params registry (`flows/registry.py`), and what `kiln check` holds `dvc.yaml` to
(`flows/check.py`). This module only declares; it imports no feature module and runs nothing.

The inputs object a task receives is one frozen dataclass whose fields are params sections: field name =
section name, field type = the section's config dataclass. A `foreach` stage (`lm@lstm`) maps fields to
the item's own sections with `sections(item)` (the LSTM's config is section `lstm`, typed `LSTMConfig`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

I = TypeVar("I")


class RunLog(Protocol):
    """What a task logs through (tasks/tracking.py's StageRun); a Protocol so specs need not import it."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...


@dataclass(frozen=True)
class StageContext:
    """Where and how a stage runs; everything that is not a params section."""

    root: Path  # the project root (data/ paths are relative to it)
    item: str  # the foreach key (`lstm` in `lm@lstm`); "" for a plain stage
    seed: int  # runtime.seed (a seeded spec lists `runtime.seed` among its dvc.yaml params)
    device: str  # runtime.device: auto | cpu | cuda | mps
    run: Any  # the stage's MLflow run (tasks/tracking.py: StageRun)


@dataclass(frozen=True)
class NoInputs:
    """The inputs of a stage that reads no params section (it reads only upstream outputs)."""


Derive = Callable[[Path, str], dict[str, dict[str, Any]]]


@dataclass(frozen=True)
class StageSpec(Generic[I]):
    """One dvc.yaml stage (or one `foreach` of stages) as code declares it.

    `name` must be a string literal in the `StageSpec(...)` call: `flows/registry.py` finds a stage's
    module by reading the task modules' source, so `kiln stage NAME` imports only that module.
    """

    name: str  # the dvc.yaml stage name; for a foreach, the name before '@'
    family: str  # text | generative | detection | report: the MLflow experiment and the docs' grouping
    task: Callable[[StageContext, I], dict[str, Any]]  # the Prefect task: loads, computes, saves, logs
    inputs: type[I] = NoInputs  # type: ignore[assignment]
    items: tuple[str, ...] = ()  # foreach keys, as dvc.yaml's `foreach` lists them
    # item -> {inputs field: (params section, config class)} for fields whose section depends on the item
    sections: Callable[[str], dict[str, tuple[str, type]]] | None = None
    # Data-derived config fields (a vocabulary size): `derive(root, item)` -> {section: {field: value}};
    # `placeholders` are stand-ins of the same shape so that params validate without data.
    derive: Derive | None = None
    placeholders: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    seeded: bool = True  # the task draws from runtime.seed (dvc.yaml must list it as a param)
    # Other `runtime` keys the task reads itself (the report names the profile): dvc.yaml params too.
    runtime_keys: tuple[str, ...] = ()

    def stage_names(self) -> list[str]:
        return [f"{self.name}@{item}" for item in self.items] if self.items else [self.name]

    def section_types(self, item: str = "") -> dict[str, tuple[str, type]]:
        """{inputs field: (section, config class)} for one item (or the plain stage)."""
        hints = typing.get_type_hints(self.inputs)
        out = {f.name: (f.name, hints[f.name]) for f in dataclasses.fields(self.inputs)}  # type: ignore[arg-type]
        if self.sections is not None:
            out.update(self.sections(item))
        return out


def split_stage_name(name: str) -> tuple[str, str]:
    """`lm@lstm` -> (`lm`, `lstm`); `ngram` -> (`ngram`, ``)."""
    base, _, item = name.partition("@")
    return base, item
