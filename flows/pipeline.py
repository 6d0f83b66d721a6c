"""The end-to-end flow: walk the DVC DAG, reproduce what is stale, one Prefect task per stage.

The DAG comes from DVC (`Repo.index.graph`), never from a second list. For each stage, in dependency
order, a task asks DVC whether the stage changed and, if so, reproduces it the way `dvc repro` does:
remove its (non-persistent) outputs, run its command, then save, cache and lock the result
(`Repo.commit(force=True)`, the documented path for a command run outside DVC). A stage whose command
is `kiln stage NAME` runs its flow in this process, as a subflow, which saves a Python start-up per
stage; any other command runs through `dvc repro --single-item`.

A stage that fails (after its retries) stops its dependents; independent stages still run; the run ends
with a summary table (stdout, a Prefect markdown artifact, the MLflow parent run) naming what failed.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dvc.repo import Repo, lock_repo
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.stages import stage_flow
from tasks.runtime import StageEnv, stage_env
from tasks.tracking import pipeline_run

Status = Literal["ran", "up to date", "failed", "skipped"]


@dataclass
class StageOutcome:
    stage: str
    status: Status
    seconds: float = 0.0
    detail: str = ""


class PipelineFailed(RuntimeError):
    def __init__(self, outcomes: list[StageOutcome], summary: str):
        self.outcomes, self.summary = outcomes, summary
        failed = [o.stage for o in outcomes if o.status == "failed"]
        super().__init__(f"stage(s) failed: {', '.join(failed)}")


def _open_repo(root: Path) -> Repo:
    return Repo(str(root))


def stage_order(root: Path, targets: list[str] | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """Stages in dependency order (restricted to `targets` and what they depend on) and each stage's
    direct upstream stages, as DVC's graph has them."""
    import networkx as nx

    with _open_repo(root) as repo:
        graph = repo.index.graph  # edge (a, b): stage a depends on stage b
        by_name = {stage.addressing: stage for stage in graph.nodes}
        if targets:
            unknown = [t for t in targets if t not in by_name]
            if unknown:
                raise KeyError(f"dvc.yaml has no stage {unknown[0]!r} (stages: {', '.join(sorted(by_name))})")
            keep = set()
            for target in targets:
                keep |= {target} | {s.addressing for s in nx.descendants(graph, by_name[target])}
            graph = graph.subgraph([by_name[name] for name in keep])
        # Topological order of "is needed by": dependencies first, ties broken by dvc.yaml order.
        position = {stage.addressing: i for i, stage in enumerate(repo.index.stages)}
        order = [s.addressing for s in nx.lexicographical_topological_sort(
            graph.reverse(copy=False), key=lambda s: f"{position[s.addressing]:06d}")]
        upstream = {s.addressing: sorted(d.addressing for d in graph.successors(s)) for s in graph.nodes}
    return order, upstream


def stale_reasons(root: Path, name: str) -> list[str]:
    """Why DVC considers stage `name` changed (empty: up to date), params down to the changed key."""
    from dvc.dependency.param import ParamsDependency

    with _open_repo(root) as repo, lock_repo(repo):
        (stage,) = repo.stage.collect(name)
        if stage.frozen:
            return []
        status = stage.status().get(name, [])
        params_changes = [change for dep in stage.deps if isinstance(dep, ParamsDependency)
                          for change in _params_changes(dep)]
    reasons = []
    for entry in status:
        if isinstance(entry, dict):
            for kind, changes in entry.items():
                if isinstance(changes, dict):
                    reasons += [f"{kind} {path}: {change}" for path, change in changes.items()
                                if not (params_changes and str(path).startswith("params/"))]
                else:
                    reasons.append(f"{kind}: {changes}")
        else:
            reasons.append(str(entry))
    return reasons + params_changes


def _params_changes(dep) -> list[str]:
    """`params/lm.yaml: ngram.order 3 -> 2` for every leaf value that differs from dvc.lock."""
    locked = dep.hash_info.value or {}
    current = dep.read_params()

    def leaves(tree, prefix=""):
        if isinstance(tree, dict):
            for key, value in tree.items():
                yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix.rstrip("."), tree

    old, new = dict(leaves(locked)), dict(leaves(current))
    return [f"params {dep.def_path}: {key} {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def _in_process_name(cmd: str | list[str]) -> str | None:
    """`kiln stage NAME` -> NAME; any other command -> None."""
    words = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return words[2] if len(words) == 3 and words[:2] == ["kiln", "stage"] else None


@task(name="reproduce-stage", cache_policy=NO_CACHE)
def reproduce_stage(root: Path, name: str) -> Status:
    reasons = stale_reasons(root, name)
    if not reasons:
        return "up to date"
    print(f"{name} is stale: {'; '.join(reasons[:5])}")
    with _open_repo(root) as repo, lock_repo(repo):
        (stage,) = repo.stage.collect(name)
        in_process = _in_process_name(stage.cmd)
        if in_process:
            stage.remove_outs(ignore_remove=False, force=False)
    if in_process:
        stage_flow(in_process)()
        with _open_repo(root) as repo:
            repo.commit(name, force=True)
    else:
        # Not a kiln flow: let DVC run the command itself. The child reuses this run's Prefect API.
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        done = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", name], cwd=root, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"dvc repro --single-item {name} exited with {done.returncode}")
    return "ran"


def summary_markdown(outcomes: list[StageOutcome]) -> str:
    lines = ["| stage | status | seconds | detail |", "|---|---|---:|---|"]
    for o in outcomes:
        detail = o.detail.replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(f"| {o.stage} | {o.status} | {o.seconds:.2f} | {detail} |")
    return "\n".join(lines)


@flow(name="kiln-pipeline", log_prints=True)
def pipeline_flow(targets: list[str] | None = None) -> list[StageOutcome]:
    """Reproduce the stale stages of the DVC DAG (restricted to `targets` and their upstream)."""
    env = stage_env()
    order, upstream = stage_order(env.root, targets)
    with pipeline_run(env.root, env.runtime.tracking_uri(), env.runtime.profile, targets or []) as parent:
        result = _reproduce_in_order(env, order, upstream)
        summary = summary_markdown(result)
        parent.log_text(summary + "\n", "summary.md")
        parent.log_metrics({"stages_ran": sum(o.status == "ran" for o in result),
                            "stages_failed": sum(o.status == "failed" for o in result)})
    create_markdown_artifact(markdown=f"# kiln run\n\n{summary}\n", key="kiln-run-summary",
                             description="Stages of the end-to-end run")
    if any(o.status == "failed" for o in result):
        raise PipelineFailed(result, summary)
    return result


def _reproduce_in_order(env: StageEnv, order: list[str], upstream: dict[str, list[str]]) -> list[StageOutcome]:
    retrying = reproduce_stage.with_options(retries=env.runtime.stage_retries,
                                            retry_delay_seconds=env.runtime.retry_delay_s)
    outcomes: dict[str, StageOutcome] = {}
    for name in order:
        blocked = [u for u in upstream[name] if outcomes[u].status in ("failed", "skipped")]
        if blocked:
            outcomes[name] = StageOutcome(name, "skipped", detail=f"upstream {blocked[0]} did not finish")
            continue
        start = time.perf_counter()
        state = retrying.with_options(task_run_name=f"stage:{name}")(env.root, name, return_state=True)
        seconds = time.perf_counter() - start
        if state.is_completed():
            outcomes[name] = StageOutcome(name, state.result(), seconds)
        else:
            error = state.result(raise_on_failure=False)
            detail = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
            if isinstance(error, BaseException):
                print("".join(traceback.format_exception(error)))
            outcomes[name] = StageOutcome(name, "failed", seconds, detail)
    return [outcomes[name] for name in order]
