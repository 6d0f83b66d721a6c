"""`kiln check`: `dvc.yaml` agrees with the stage specs and the code.

For every stage of `dvc.yaml` (foreach items expanded, as DVC resolves them):
- its `cmd` is `kiln stage NAME` and a spec declares NAME (and every spec's stages are in `dvc.yaml`);
- its params are exactly the sections its spec reads, each in the file that holds it, plus `runtime.seed`
  where the spec is seeded, and the `runtime` keys its spec names (`runtime_keys`);
- its code deps (the `.py` files of `flows/`, `tasks/`, `models/` it lists) are exactly the import closure
  of its task's module, computed from the imports in the source (function-level imports included),
  less `NO_RESULT_EFFECT`: infrastructure that cannot change what a stage computes.

After adding an import to a task or model, run `kiln check`: it names each stage and the module to add
to (or drop from) that stage's deps.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from flows.registry import get_spec, runnable_names, section_types
from tasks.params import section_index

PROJECT_PACKAGES = ("flows", "tasks", "models")
# Modules that cannot change a stage's results, so editing them leaves results valid: the MLflow logging
# helper, the atomic writer, the output path constants (their DVC outs are held by tests/test_layout.py),
# the spec declarations, the error type, the strict params loader (a params change is a params dep) and
# the thread sizing (like runtime.threads, how a stage runs: the count moves float rounding, not the result),
# the process check of the tracking helper and the phase clock (it only reads the time).
NO_RESULT_EFFECT = frozenset(
    {
        "tasks/tracking.py",
        "tasks/io.py",
        "tasks/layout.py",
        "tasks/spec.py",
        "tasks/errors.py",
        "tasks/params.py",
        "tasks/threads.py",
        "tasks/processes.py",
        "tasks/phases.py",
    }
)


def _module_file(root: Path, dotted: str) -> Path | None:
    parts = dotted.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    path = root.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _is_docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def _runtime_nodes(tree: ast.AST) -> Iterable[ast.AST]:
    """Every node, less the bodies of `if TYPE_CHECKING:` (imports for annotations never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


@cache
def imports_of(root: Path, path: Path) -> frozenset[Path]:
    """The project files that `path` imports when it runs (function-level imports included), as absolute
    paths."""
    found: set[Path] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            target = _module_file(root, name)
            if target is not None and target != path:
                found.add(target)
        # the packages on the way are imported too (their __init__ runs)
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts)):
                init = root.joinpath(*parts[:i], "__init__.py")
                if init.is_file():
                    found.add(init)
    return frozenset(found)


def import_closure(root: Path, start: Path) -> set[Path]:
    seen, todo = {start}, [start]
    while todo:
        for dep in imports_of(root, todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def code_deps(root: Path, module_file: Path) -> set[str]:
    """What a stage whose task lives in `module_file` must list as code deps (repo-relative paths)."""
    rel = {
        p.relative_to(root).as_posix()
        for p in import_closure(root, module_file)
        if not (p.name == "__init__.py" and _is_docstring_only(p))
    }
    return rel - NO_RESULT_EFFECT


@dataclass(frozen=True)
class DvcStage:
    name: str
    cmd: str
    deps: frozenset[str]
    params: frozenset[tuple[str, str]]  # (params file, key)


def dvc_stages(root: Path) -> list[DvcStage]:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    out = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            deps, params = set(), set()
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    keys = dep.params if isinstance(dep.params, list) else list(dep.params or [])
                    params |= {(str(dep.def_path), key) for key in keys}
                else:
                    deps.add(str(dep.def_path))
            out.append(
                DvcStage(
                    stage.name,
                    stage.cmd if isinstance(stage.cmd, str) else " ".join(stage.cmd),
                    frozenset(deps),
                    frozenset(params),
                )
            )
    return out


def check_stage(root: Path, stage: DvcStage, index: dict[str, Path]) -> list[str]:
    problems = []
    if stage.cmd.strip() != f"kiln stage {stage.name}":
        problems.append(f"cmd is {stage.cmd!r}, expected 'kiln stage {stage.name}'")
    try:
        spec, item = get_spec(stage.name)
    except KeyError as err:
        return problems + [str(err.args[0])]
    item = spec.split_item(item)[0]  # a replicate reads its item's sections
    package = spec.task.__module__.split(".")[1]
    if package != spec.family:
        problems.append(f"spec family {spec.family!r} differs from its package tasks/{package}/")
    expected = {
        (index[section].relative_to(root).as_posix(), section)
        for section, _ in spec.section_types(item).values()
        if section in index
    }
    absent = [section for section, _ in spec.section_types(item).values() if section not in index]
    problems += [f"reads params section {s!r}, which no params file has" for s in absent]
    if spec.seeded:
        expected.add(("params/runtime.yaml", "runtime.seed"))
    expected |= {("params/runtime.yaml", f"runtime.{key}") for key in spec.runtime_keys}
    for file, key in sorted(expected - stage.params):
        problems.append(f"params: missing {file}:{key} (its spec reads it)")
    for file, key in sorted(stage.params - expected):
        problems.append(f"params: {file}:{key} is listed but its spec does not read it")
    module_file = _module_file(root, spec.task.__module__)
    if module_file is None:
        return problems + [f"task module {spec.task.__module__} is not a file under {root}"]
    needed = code_deps(root, module_file)
    listed = {d for d in stage.deps if d.endswith(".py") and d.split("/")[0] in PROJECT_PACKAGES}
    for dep in sorted(needed - listed):
        problems.append(f"code deps: missing {dep} (in the import closure of {spec.task.__module__})")
    for dep in sorted(listed - needed):
        problems.append(f"code deps: {dep} is listed but {spec.task.__module__} does not import it")
    return problems


def check(root: Path, stages: Iterable[DvcStage] | None = None) -> list[str]:
    """Every disagreement between dvc.yaml, the specs and the code, one line each (empty: all agree)."""
    root = root.resolve()
    imports_of.cache_clear()
    stages = list(dvc_stages(root) if stages is None else stages)
    section_types()  # one config class per section, or a TypeError naming both
    index = section_index(root / "params")
    lines = [f"{stage.name}: {problem}" for stage in stages for problem in check_stage(root, stage, index)]
    declared, listed = set(runnable_names()), {s.name for s in stages}
    lines += [
        f"{name}: a spec declares this stage but dvc.yaml has no such stage" for name in sorted(declared - listed)
    ]
    return lines
