"""The stage table and the params registry, both derived from the stage specs (`tasks/spec.py`).

No module here names a feature module: the specs are found by reading the source of the family packages
`tasks/<family>/` for `StageSpec(name="...")` calls, so `kiln stage NAME` imports only NAME's module, and
a new stage is found without registering it anywhere.
"""

from __future__ import annotations

import ast
import importlib
from functools import cache
from pathlib import Path
from typing import Any

from tasks.params import (
    ParamsError,
    load_section,
    read_yaml,
    section_from_dict,
    section_index,
)
from tasks.runtime import RuntimeConfig, repo_root
from tasks.spec import ReplicatesConfig, StageSpec, split_stage_name

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
FAMILIES = ("text", "generative", "detection", "report")  # the family packages under tasks/ (and models/)
# Sections no stage reads but every run does (how stages run, not what they compute).
INFRA_SECTIONS: dict[str, type] = {"runtime": RuntimeConfig}


class UnknownStage(KeyError):
    """A stage name no spec declares: the message lists the runnable names and the closest one."""


def _spec_names(path: Path) -> list[str]:
    """The `name=` literals of the `StageSpec(...)` and `replicated(...)` calls in one module's source."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("StageSpec", "replicated"):
            for kw in node.keywords:
                if kw.arg == "name":
                    if not isinstance(kw.value, ast.Constant) or not isinstance(kw.value.value, str):
                        raise ValueError(f"{path}:{node.lineno}: StageSpec(name=...) must be a string literal")
                    names.append(kw.value.value)
    return names


@cache
def spec_modules() -> dict[str, str]:
    """Stage name (foreach base) -> the dotted module that declares it."""
    index: dict[str, str] = {}
    for family in FAMILIES:
        for path in sorted((TASKS_DIR / family).glob("*.py")):
            module = f"tasks.{family}.{path.stem}"
            for name in _spec_names(path):
                if name in index:
                    raise ValueError(f"stage {name!r} is declared twice: {index[name]} and {module}")
                index[name] = module
    return index


def _module_specs(module: str) -> list[StageSpec]:
    mod = importlib.import_module(module)
    specs = list(mod.SPECS) if hasattr(mod, "SPECS") else [getattr(mod, "SPEC", None)]
    return [s for s in specs if isinstance(s, StageSpec)]


def replicate_numbers(spec: StageSpec, params_dir: Path | None = None) -> list[int]:
    """The replicate numbers `params/replicates.yaml` lists for a replicated stage (as dvc.yaml's matrix
    reads them); [] for any other stage."""
    if not spec.replicates:
        return []
    params_dir = params_dir or repo_root() / "params"
    return list(getattr(load_section(params_dir, "replicates", ReplicatesConfig), spec.replicates))


def runnable_names() -> list[str]:
    """Every `kiln stage` name, foreach and matrix items expanded (`lm@lstm`, `lm_replicate@lstm-1`); the
    items of a foreach come from its spec, a replicated stage's numbers from the params."""
    return [name for spec in all_specs() for name in spec.stage_names(replicate_numbers(spec))]


def unknown_stage(name: str, known: list[str], kind: str = "stage", kinds: str = "stages") -> UnknownStage:
    import difflib

    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UnknownStage(f"no {kind} {name!r}{hint} ({kinds}: {', '.join(known)})")


def get_spec(name: str) -> tuple[StageSpec, str]:
    """The spec of stage `name` (`lm@lstm` or `ngram`) and its item."""
    base, item = split_stage_name(name)
    module = spec_modules().get(base)
    spec = next((s for s in _module_specs(module) if s.name == base), None) if module else None
    if spec is not None and spec.replicates:
        if name not in spec.stage_names(replicate_numbers(spec)):
            raise unknown_stage(name, runnable_names())
        return spec, item
    if spec is None or (item not in spec.items if spec.items else item):
        raise unknown_stage(name, runnable_names())
    return spec, item


def all_specs() -> list[StageSpec]:
    return [spec for module in dict.fromkeys(spec_modules().values()) for spec in _module_specs(module)]


def section_types() -> dict[str, type]:
    """Every params section any stage reads -> its config class (one class per section, checked)."""
    types: dict[str, type] = dict(INFRA_SECTIONS)
    for spec in all_specs():
        for item in spec.items or ("",):
            for _, (section, cls) in spec.section_types(item).items():
                if types.setdefault(section, cls) is not cls:
                    raise TypeError(
                        f"params section {section!r} is read as {types[section].__name__} and as "
                        f"{cls.__name__} (stage {spec.name})"
                    )
    return types


def placeholders() -> dict[str, dict[str, Any]]:
    """Stand-ins for the data-derived fields of every section, so params validate without data."""
    out: dict[str, dict[str, Any]] = {}
    for spec in all_specs():
        for section, fields in spec.placeholders.items():
            out.setdefault(section, {}).update(fields)
    return out


def load_all(params_dir: Path) -> dict[str, Any]:
    """Every section of every params file as its config (what `kiln profile` and `kiln check` validate):
    a section no stage reads is an error, as is a section a stage reads that no file holds."""
    types, fills, index = section_types(), placeholders(), section_index(params_dir)
    unread = [s for s in index if s not in types]
    if unread:
        raise ParamsError(index[unread[0]], unread[0], "no stage spec reads this section (a typo, or a stale one?)")
    missing = [s for s in types if s not in index]
    if missing:
        raise ParamsError(params_dir, missing[0], "a stage spec reads this section but no params file has it")
    return {s: section_from_dict(types[s], read_yaml(index[s])[s], index[s], s, fills.get(s)) for s in index}


def section_config(params_dir: Path, section: str, **derived: Any) -> Any:
    """One section as its config class, data-derived fields from `derived` or else the placeholders (for
    benchmarks and tests that build a model from params without the data)."""
    return load_section(params_dir, section, section_types()[section], {**placeholders().get(section, {}), **derived})
