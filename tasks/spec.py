"""The stage spec: each dvc.yaml stage declared once in code, beside the task it runs.

A task module ends with `SPEC = StageSpec(name=..., ...)` (several specs: `SPECS = [...]`). Everything
else is derived from the specs: the Prefect flow of each stage (`flows/factory.py`), the stage-to-flow
table and the params registry (`flows/registry.py`), and what `kiln check` holds `dvc.yaml` to
(`flows/check.py`). This module only declares; it imports no feature module and runs nothing.

The inputs object a task receives is one frozen dataclass whose fields are params sections: field name =
section name, field type = the section's config dataclass. A `foreach` stage (`lm@lstm`) maps fields to
the item's own sections with `sections(item)` (the LSTM's config is section `lstm`, typed `LSTMConfig`).

A replicated stage (`replicates="lm"`) is a DVC `matrix` over the items and the replicate numbers that
`params/replicates.yaml: replicates.lm` lists: `lm_replicate@lstm-2` is the LSTM trained with seed
`runtime.seed + 2`, its outputs beside the main stage's under the name `lstm-2`. The main stage (`lm@lstm`)
is replicate 0, so comparisons pool it with the replicates.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
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
    item: str  # the foreach key (`lstm` in `lm@lstm` and in `lm_replicate@lstm-2`); "" for a plain stage
    seed: int  # runtime.seed, plus the replicate number (a seeded spec lists `runtime.seed` in dvc.yaml)
    device: str  # runtime.device: auto | cpu | cuda | mps
    run: Any  # the stage's MLflow run (tasks/tracking.py: StageRun)
    replicate: int = 0  # 0: the main stage; r >= 1: replicate r of a replicated stage

    @property
    def instance(self) -> str:
        """The name this run's outputs go under: the item (`lstm`), or `lstm-2` for replicate 2."""
        return replicate_name(self.item, self.replicate)


@dataclass(frozen=True)
class ReplicatesConfig:
    """`params/replicates.yaml: replicates`: the replicate numbers of each replicated stage family. Replicate
    r trains with seed `runtime.seed + r`; the main stage is replicate 0, so `[1, 2]` makes three seeds."""

    lm: list[int]  # lm_replicate@<model>-<r>
    detector: list[int]  # detector_replicate@<detector>-<r>
    diffusion: list[int]  # diffusion_replicate@<pixel generator>-<r>

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a new replicated family is one field, checked like the others
            numbers = getattr(self, f.name)
            if any(r < 1 for r in numbers) or len(set(numbers)) != len(numbers):
                raise ValueError(f"{f.name}: replicate numbers must be distinct integers >= 1, got {numbers}")

    def seeds(self, key: str, seed: int) -> list[int]:
        """Every seed of family `key`, the main stage's first."""
        return [seed] + [seed + r for r in getattr(self, key)]


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
    # A replicated stage: the `replicates` key listing its replicate numbers (its items are then `lstm-2`).
    replicates: str = ""

    def stage_names(self, replicates: Sequence[int] = ()) -> list[str]:
        """The dvc.yaml names; a replicated stage's, for replicate numbers `replicates` (DVC's matrix order:
        item-major)."""
        if self.replicates:
            return [f"{self.name}@{replicate_name(item, r)}" for item in self.items for r in replicates]
        return [f"{self.name}@{item}" for item in self.items] if self.items else [self.name]

    def split_item(self, item: str) -> tuple[str, int]:
        """`lstm-2` -> (`lstm`, 2) for a replicated stage; (`item`, 0) otherwise. Raises ValueError on an item
        without a replicate number."""
        if not self.replicates:
            return item, 0
        base, _, number = item.rpartition("-")
        if not base or not number.isdigit() or int(number) < 1:
            raise ValueError(f"{self.name}@{item}: a replicate is named ITEM-R with R >= 1 (e.g. {self.name}@lstm-1)")
        return base, int(number)

    def section_types(self, item: str = "") -> dict[str, tuple[str, type]]:
        """{inputs field: (section, config class)} for one item (`lstm`, not `lstm-2`), or the plain stage."""
        hints = typing.get_type_hints(self.inputs)
        out = {f.name: (f.name, hints[f.name]) for f in dataclasses.fields(self.inputs)}  # type: ignore[arg-type]
        if self.sections is not None:
            out.update(self.sections(item))
        return out


def replicated(spec: StageSpec[I], name: str, replicates: str, items: Sequence[str] | None = None) -> StageSpec[I]:
    """The replicate stage of `spec`: the same task and params, named `name`, over the replicate numbers of
    `replicates.<replicates>` and `items` (default: all of `spec`'s). Called with `name=` as a string literal,
    like `StageSpec` (the registry reads it)."""
    if items is not None and not set(items) <= set(spec.items):
        raise ValueError(f"{name}: items {sorted(set(items) - set(spec.items))} are not items of {spec.name}")
    chosen = spec.items if items is None else tuple(items)
    return dataclasses.replace(spec, name=name, replicates=replicates, items=chosen)


def replicate_name(item: str, replicate: int) -> str:
    """`lstm` for the main stage (replicate 0), `lstm-2` for replicate 2."""
    return f"{item}-{replicate}" if replicate else item


def replicate_item(name: str, items: Collection[str]) -> str | None:
    """The inverse of `replicate_name` for a replicate: `lstm` for `lstm-2` when `lstm` is among `items`;
    None for a main stage's name or anything else."""
    item, _, number = name.rpartition("-")
    return item if item in items and number.isdigit() and int(number) >= 1 else None


def split_stage_name(name: str) -> tuple[str, str]:
    """`lm@lstm` -> (`lm`, `lstm`); `ngram` -> (`ngram`, ``)."""
    base, _, item = name.partition("@")
    return base, item
