"""The end-to-end flow: walk the DVC DAG, reproduce what is stale, one Prefect task per stage.

The DAG comes from DVC (`Repo.index.graph`), never from a second list. For each stage, in dependency
order, a task asks DVC whether the stage changed and, if so, reproduces it the way `dvc repro` does:
remove its (non-persistent) outputs, run its command, then save, cache and lock the result
(`Repo.commit(force=True)`, the documented path for a command run outside DVC). A stage whose command
is `kiln stage NAME` runs its flow in this process, as a subflow, which saves a Python start-up per
stage; any other command runs through `dvc repro --single-item`.

A stage that fails (after its retries) stops its dependents; independent stages still run; the run ends
with a summary table (stdout, a Prefect markdown artifact, the MLflow parent run) naming what failed.

With `runtime.max_parallel` > 1, up to that many independent stages run at once (a stage starts when all
its upstream stages finished), submitted to the flow's task runner: Prefect's thread pool, or Dask
(`runtime.task_runner: dask`). A stage's flow then runs as a `kiln stage` subprocess, never in this
process: torch's and numpy's global RNGs, which seed model initialisation and dropout, are process-wide,
so two training stages in threads of one process would draw from each other's streams and their outputs
would differ from a serial run's. DVC's steps (the status check, removing outputs, the commit that writes
dvc.lock) stay in this process and run one at a time; a DVC lock held by another process is retried.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from dvc.repo import Repo, lock_repo
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.factory import stage_flow
from tasks.runtime import RuntimeConfig, StageEnv, stage_env
from tasks.threads import PARALLEL_ENV
from tasks.tracking import PARENT_RUN_ENV, log_pipeline_stages, pipeline_run

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


T = TypeVar("T")
# DVC's index reads and its dvc.lock writes, one at a time in this process: stage tasks of a parallel run
# call them from several threads, and a Repo (or dvc.lock half rewritten by a commit) is not for sharing.
_DVC_MUTEX = threading.RLock()


def _retryable_dvc_error(err: BaseException) -> bool:
    """DVC's repo lock held by another process (a `dvc repro` child, a Dask worker, a user's `dvc` call),
    or its state database busy: DVC issues #9805, #10465, #11054."""
    from dvc.lock import LockError

    text = str(err)
    return isinstance(err, LockError) or "is busy" in text or "database is locked" in text


def _dvc(call: Callable[[], T], attempts: int = 8, delay_s: float = 0.5) -> T:
    """Run a DVC step under this process's DVC mutex, retrying lock and busy errors (DVC itself already
    waits ~3 s for its lock before raising)."""
    for attempt in range(1, attempts + 1):
        try:
            with _DVC_MUTEX:
                return call()
        except Exception as err:
            if attempt == attempts or not _retryable_dvc_error(err):
                raise
            print(f"DVC busy ({err}); retrying in {delay_s * attempt:g} s")
            time.sleep(delay_s * attempt)
    raise AssertionError("unreachable")


def dvc_stage_names(root: Path) -> list[str]:
    """Every stage of dvc.yaml, foreach items expanded (`lm@lstm`), in file order."""

    def names() -> list[str]:
        with _open_repo(root) as repo:
            return [stage.addressing for stage in repo.index.stages]

    return _dvc(names)


def stage_order(root: Path, targets: list[str] | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """Stages in dependency order (restricted to `targets` and what they depend on) and each stage's
    direct upstream stages, as DVC's graph has them."""
    return _dvc(lambda: _stage_order(root, targets))


def _stage_order(root: Path, targets: list[str] | None) -> tuple[list[str], dict[str, list[str]]]:
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
        order = [
            s.addressing
            for s in nx.lexicographical_topological_sort(
                graph.reverse(copy=False), key=lambda s: f"{position[s.addressing]:06d}"
            )
        ]
        upstream = {s.addressing: sorted(d.addressing for d in graph.successors(s)) for s in graph.nodes}
    return order, upstream


def stale_reasons(root: Path, name: str) -> list[str]:
    """Why DVC considers stage `name` changed (empty: up to date), params down to the changed key."""
    return stale_reasons_of(root, [name])[name]


def stale_reasons_of(root: Path, names: list[str]) -> dict[str, list[str]]:
    """`stale_reasons` of several stages with one opening of the repo (`kiln status`, `--dry-run`): each
    opening parses dvc.yaml, the params templating and dvc.lock again."""
    return _dvc(lambda: _stale_reasons_of(root, names))


def _stale_reasons_of(root: Path, names: list[str]) -> dict[str, list[str]]:
    with _open_repo(root) as repo, lock_repo(repo):
        stages = {stage.addressing: stage for stage in repo.index.stages}
        return {name: _stage_reasons(stages[name]) for name in names}


def _stage_reasons(stage) -> list[str]:
    from dvc.dependency.param import ParamsDependency

    name = stage.addressing
    if stage.frozen:
        return []
    status = stage.status().get(name, [])
    params_changes = [
        change for dep in stage.deps if isinstance(dep, ParamsDependency) for change in _params_changes(dep)
    ]
    reasons = []
    for entry in status:
        if isinstance(entry, dict):
            for kind, changes in entry.items():
                if isinstance(changes, dict):
                    reasons += [
                        f"{kind} {path}: {change}"
                        for path, change in changes.items()
                        if not (params_changes and str(path).startswith("params/"))
                    ]
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
    return [
        f"params {dep.def_path}: {key} {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def _in_process_name(cmd: str | list[str]) -> str | None:
    """`kiln stage NAME` -> NAME; any other command -> None."""
    words = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return words[2] if len(words) == 3 and words[:2] == ["kiln", "stage"] else None


def _prepare(root: Path, name: str) -> str | None:
    """The kiln stage name of the stage's command (None: another command), its outputs removed if so."""
    with _open_repo(root) as repo, lock_repo(repo):
        (stage,) = repo.stage.collect(name)
        in_process = _in_process_name(stage.cmd)
        if in_process:
            stage.remove_outs(ignore_remove=False, force=False)
    return in_process


def _commit(root: Path, name: str) -> None:
    with _open_repo(root) as repo:
        repo.commit(name, force=True)


@task(name="reproduce-stage", cache_policy=NO_CACHE)
def reproduce_stage(
    root: Path, name: str, isolated: bool = False, child_env: dict[str, str] | None = None, force: bool = False
) -> Status:
    """Bring stage `name` up to date. `isolated`: run a kiln flow as a `kiln stage` subprocess (parallel
    runs), not in this process; `child_env`: variables the subprocesses get on top of this environment
    (a Dask worker's environment is the one its cluster started with)."""
    reasons = ["--force"] if force else stale_reasons(root, name)
    if not reasons:
        return "up to date"
    print(f"{name} is stale: {'; '.join(reasons[:5])}")
    in_process = _dvc(lambda: _prepare(root, name))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **(child_env or {}), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    if in_process and not isolated:
        stage_flow(in_process)()
        _dvc(lambda: _commit(root, name))
    elif in_process:
        done = subprocess.run([sys.executable, "-m", "flows.cli", "stage", in_process], cwd=root, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"kiln stage {in_process} exited with {done.returncode}")
        _dvc(lambda: _commit(root, name))
    else:
        # Not a kiln flow: let DVC run the command itself. The child reuses this run's Prefect API.
        command = [sys.executable, "-m", "dvc", "repro", "--single-item", name]
        if not isolated:
            done = subprocess.run(command, cwd=root, env=env)
        for attempt in range(3 if isolated else 0):  # concurrent `dvc repro`s may meet DVC's lock: retried
            done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
            sys.stdout.write(done.stdout)
            sys.stderr.write(done.stderr)
            if done.returncode == 0 or not ("Unable to acquire lock" in done.stderr or "is busy" in done.stderr):
                break
            time.sleep(1.0 + attempt)
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
def pipeline_flow(targets: list[str] | None = None, force: bool = False) -> list[StageOutcome]:
    """Reproduce the stale stages of the DVC DAG (restricted to `targets` and their upstream); `force`:
    every one of them, stale or not."""
    env = stage_env()
    order, upstream = stage_order(env.root, targets)
    with pipeline_run(env.root, env.runtime.tracking_uri(), env.runtime.profile, targets or []) as parent:
        result = _reproduce_in_order(env, order, upstream, force)
        summary = summary_markdown(result)
        parent.log_text(summary + "\n", "summary.md")
        log_pipeline_stages(parent, result)  # the parent run's page lists and links every stage run
        parent.log_metrics(
            {
                "stages_ran": sum(o.status == "ran" for o in result),
                "stages_failed": sum(o.status == "failed" for o in result),
            }
        )
        create_markdown_artifact(
            markdown=f"# kiln run\n\n{summary}\n", key="kiln-run-summary", description="Stages of the end-to-end run"
        )
        if any(o.status == "failed" for o in result):
            raise PipelineFailed(result, summary)  # inside the parent run, which therefore ends FAILED
    return result


def task_runner(runtime: RuntimeConfig):
    """The task runner `runtime` asks for: Prefect's thread pool of `max_parallel` workers, or Dask (a
    local cluster of `max_parallel` single-threaded worker processes, or the scheduler at `dask_address`)."""
    if runtime.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if runtime.dask_address:
            return DaskTaskRunner(address=runtime.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": runtime.max_parallel,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
        )
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=runtime.max_parallel)


def configured_pipeline_flow(runtime: RuntimeConfig):
    """`pipeline_flow` with the task runner of `runtime` (a flow's runner is fixed before it starts)."""
    if runtime.max_parallel == 1 and runtime.task_runner == "thread":
        return pipeline_flow  # serial: every stage runs in the flow's own thread, as it always did
    return pipeline_flow.with_options(task_runner=task_runner(runtime))


def _outcome(name: str, state, seconds: float, result: Callable[[], object]) -> StageOutcome:
    if state.is_completed():
        return StageOutcome(name, result(), seconds)
    error = state.result(raise_on_failure=False)
    detail = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    if isinstance(error, BaseException):
        print("".join(traceback.format_exception(error)))
    return StageOutcome(name, "failed", seconds, detail)


def _reproduce_in_order(
    env: StageEnv, order: list[str], upstream: dict[str, list[str]], force: bool = False
) -> list[StageOutcome]:
    retrying = reproduce_stage.with_options(
        retries=env.runtime.stage_retries, retry_delay_seconds=env.runtime.retry_delay_s
    )
    if env.runtime.max_parallel > 1 or env.runtime.task_runner == "dask":
        return _reproduce_in_parallel(env, order, upstream, retrying, force)
    outcomes: dict[str, StageOutcome] = {}
    for name in order:
        blocked = [u for u in upstream[name] if outcomes[u].status in ("failed", "skipped")]
        if blocked:
            outcomes[name] = StageOutcome(name, "skipped", detail=f"upstream {blocked[0]} did not finish")
            continue
        start = time.perf_counter()
        state = retrying.with_options(task_run_name=f"stage:{name}")(env.root, name, force=force, return_state=True)
        outcomes[name] = _outcome(name, state, time.perf_counter() - start, state.result)
    return [outcomes[name] for name in order]


def _reproduce_in_parallel(
    env: StageEnv, order: list[str], upstream: dict[str, list[str]], retrying, force: bool = False
) -> list[StageOutcome]:
    """Start each stage as soon as all its upstream stages finished, at most `max_parallel` at once; a
    stage whose upstream failed or was skipped is skipped. Stage flows run as subprocesses."""
    from prefect.futures import as_completed

    # What the stage subprocesses need from this run; a Dask worker's environment predates the parent run.
    child_env = {
        key: os.environ[key]
        for key in (PARENT_RUN_ENV, "PREFECT_API_URL", "MLFLOW_TRACKING_URI")
        if os.environ.get(key)
    }
    child_env[PARALLEL_ENV] = str(env.runtime.max_parallel)  # each stage sizes its threads to its share
    outcomes: dict[str, StageOutcome] = {}
    running: dict[object, tuple[str, float]] = {}  # future -> (stage, start)
    waiting = list(order)
    while waiting or running:
        for name in list(waiting):  # in dependency order, so a skip reaches its dependents in this pass
            if len(running) >= env.runtime.max_parallel:
                break
            if any(u not in outcomes for u in upstream[name]):
                continue
            waiting.remove(name)
            blocked = [u for u in upstream[name] if outcomes[u].status in ("failed", "skipped")]
            if blocked:
                outcomes[name] = StageOutcome(name, "skipped", detail=f"upstream {blocked[0]} did not finish")
                continue
            future = retrying.with_options(task_run_name=f"stage:{name}").submit(
                env.root, name, isolated=True, child_env=child_env, force=force
            )
            running[future] = (name, time.perf_counter())
        if not running:
            continue
        future = next(iter(as_completed(list(running))))
        name, start = running.pop(future)
        future.wait()
        outcomes[name] = _outcome(
            name, future.state, time.perf_counter() - start, lambda: future.result(raise_on_failure=False)
        )
    return [outcomes[name] for name in order]


def require_tracking_server(root: Path) -> None:
    """Fail before any stage starts when the configured MLflow server is down: MLflow's client would
    otherwise retry for minutes at the first log call (sqlite and file stores are not checked)."""
    from tasks.runtime import load_runtime
    from tasks.tracking import (
        TrackingServerUnreachable,
        check_tracking_server,
        resolve_tracking_uri,
    )

    try:
        check_tracking_server(resolve_tracking_uri(load_runtime(root / "params").tracking_uri(), root))
    except TrackingServerUnreachable as err:
        raise TrackingServerUnreachable(
            f"{err}; start it, or point runtime.mlflow_tracking_uri "
            "(params/runtime.yaml) or $MLFLOW_TRACKING_URI elsewhere"
        ) from None
