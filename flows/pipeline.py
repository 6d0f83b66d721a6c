"""The end-to-end flow: walk the DVC DAG, reproduce what is stale, one Prefect task per stage.

The DAG comes from DVC (`Repo.index.graph`), never from a second list. Every stage's status is read once
when the run starts and read again for a stage only once something upstream of it ran. For each stage, in
dependency order, a task takes that status and, if the stage changed, reproduces it the way `dvc repro` does:
remove its (non-persistent) outputs, run its command, then save, cache and lock the result
(`Repo.commit(force=True)`, the documented path for a command run outside DVC). A stage whose command
is `kiln stage NAME` runs its flow in this process, as a subflow, which saves a Python start-up per
stage; any other command runs through `dvc repro --single-item`.

A stage that fails (after its retries) stops its dependents; independent stages still run; the run ends
with a summary table (stdout, a Prefect markdown artifact, the MLflow parent run) naming what failed.

With `runtime.max_parallel` > 1, up to that many independent stages run at once (a stage starts when all
its upstream stages finished), submitted to the flow's task runner: Prefect's thread pool, or Dask
(`runtime.task_runner: dask`). A stage's flow then runs as a `kiln stage` subprocess, never in this
process (with the thread runner, a child forked from one pre-imported process per run, flows/forkserver.py,
which saves each stage its imports): torch's and numpy's global RNGs, which seed model initialisation and
dropout, are process-wide, so two training stages in threads of one process would draw from each other's
streams and their outputs would differ from a serial run's. DVC's steps (the status check, removing outputs,
the commit that writes dvc.lock) stay in this process and run one at a time; a DVC lock held by another
process is retried.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.dvc_graph import (
    _dvc,
    _open_repo,
    critical_path_order,
    lock_file_read_in_c,
    order_and_stale_reasons,
    released_repo_lock,
    stage_order,
    stale_reasons_then,
)
from flows.factory import stage_flow
from flows.forkserver import ForkServer
from flows.forkserver import enabled as forkserver_enabled
from tasks.runtime import RuntimeConfig, StageEnv, stage_env
from tasks.threads import PARALLEL_ENV
from tasks.tracking import PARENT_RUN_ENV, last_stage_seconds, log_pipeline_stages, pipeline_run

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


def _in_process_name(cmd: str | list[str]) -> str | None:
    """`kiln stage NAME` -> NAME; any other command -> None."""
    words = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return words[2] if len(words) == 3 and words[:2] == ["kiln", "stage"] else None


def _prepare(stage) -> str | None:
    """The kiln stage name of a stale DVC stage's command (None: another command), its outputs removed if so."""
    in_process = _in_process_name(stage.cmd)
    if in_process:
        stage.remove_outs(ignore_remove=False, force=False)
    return in_process


def _commit(root: Path, name: str) -> None:
    with _open_repo(root) as repo, lock_file_read_in_c():
        repo.commit(name, force=True)


def _child_environment(child_env: dict[str, str] | None) -> dict[str, str]:
    """A stage subprocess's environment: this one, `child_env` on top, this interpreter's bin folder first."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, **(child_env or {}), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


# The fork server of the parallel run in progress in this process (flows/forkserver.py); empty otherwise, and
# in a Dask worker, whose stages start as processes.
_FORK_SERVER: list[ForkServer] = []


@contextmanager
def _fork_server(root: Path, child_env: dict[str, str]) -> Iterator[None]:
    """The run's stages fork from one pre-imported process, started by the first stage that runs; with the
    thread task runner only (a Dask worker is another process)."""
    if not forkserver_enabled():
        yield
        return
    with ForkServer(_child_environment(child_env), root) as server:
        _FORK_SERVER[:] = [server]
        try:
            yield
        finally:
            _FORK_SERVER.clear()


@task(name="reproduce-stage", cache_policy=NO_CACHE)
def reproduce_stage(
    root: Path,
    name: str,
    isolated: bool = False,
    child_env: dict[str, str] | None = None,
    force: bool = False,
    known_reasons: list[str] | None = None,
) -> Status:
    """Bring stage `name` up to date. `isolated`: run a kiln flow as a `kiln stage` subprocess (parallel
    runs), not in this process; `child_env`: variables the subprocesses get on top of this environment
    (a Dask worker's environment is the one its cluster started with); `known_reasons`: the stage's stale
    reasons from the run's opening status, still true because nothing upstream of it ran since (None: ask
    DVC now)."""
    # The status (unless known) and the outputs' removal, in one opening of the repo.
    reasons, in_process = stale_reasons_then(root, name, ["--force"] if force else known_reasons, _prepare)
    if not reasons:
        return "up to date"
    print(f"{name} is stale: {'; '.join(reasons[:5])}")
    env = _child_environment(child_env)
    if in_process and not isolated:
        stage_flow(in_process)()
        _dvc(lambda: _commit(root, name))
    elif in_process:
        server = _FORK_SERVER[0] if _FORK_SERVER else None
        if server is not None and server.ready():
            print(f"{name}: forked from the run's pre-imported process (pid {server.process.pid})")
            code = server.run(["kiln", "stage", in_process], root, env)
        else:  # a Dask worker, or KILN_FORKSERVER=0, or the server did not start
            if server is not None:
                print(f"{name}: the fork server is not running; the stage starts as a process of its own")
            code = subprocess.run(
                [sys.executable, "-m", "flows.cli", "stage", in_process], cwd=root, env=env
            ).returncode
        if code != 0:
            raise RuntimeError(f"kiln stage {in_process} exited with {code}")
        _dvc(lambda: _commit(root, name))
    else:
        # Not a kiln flow: let DVC run the command itself. The child reuses this run's Prefect API.
        command = [sys.executable, "-m", "dvc", "repro", "--single-item", name]
        with released_repo_lock():  # the child takes DVC's lock itself
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
    if force:
        (order, upstream), opening = stage_order(env.root, targets), {}
    else:
        # Every stage's status from one opening of the repo (each opening parses dvc.yaml, its params
        # templating and dvc.lock: 0.4-0.7 s); a stage is asked again only once something upstream of
        # it ran (`_known_reasons`).
        order, upstream, opening = order_and_stale_reasons(env.root, targets)
    with pipeline_run(env.root, env.runtime.tracking_uri(), env.runtime.profile, targets or []) as parent:
        result = _reproduce_in_order(env, order, upstream, force, opening)
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


def _known_reasons(
    name: str, upstream: dict[str, list[str]], outcomes: dict[str, StageOutcome], opening: dict[str, list[str]]
) -> list[str] | None:
    """Stage `name`'s stale reasons from the run's opening status while none of its direct upstream stages
    ran in this run: only a stage that runs changes files, and a stage's deps are its upstream stages'
    outputs or files no stage writes. None once one ran (its outputs may differ now: DVC is asked again)."""
    if name not in opening or any(outcomes[u].status == "ran" for u in upstream[name]):
        return None
    return opening[name]


def _reproduce_in_order(
    env: StageEnv,
    order: list[str],
    upstream: dict[str, list[str]],
    force: bool = False,
    opening: dict[str, list[str]] | None = None,
) -> list[StageOutcome]:
    """`opening`: every stage's stale reasons when the run started (empty: none known, DVC is asked per stage)."""
    opening = opening or {}
    retrying = reproduce_stage.with_options(
        retries=env.runtime.stage_retries, retry_delay_seconds=env.runtime.retry_delay_s
    )
    if env.runtime.max_parallel > 1 or env.runtime.task_runner == "dask":
        return _reproduce_in_parallel(env, order, upstream, retrying, force, opening)
    outcomes: dict[str, StageOutcome] = {}
    for name in order:
        blocked = [u for u in upstream[name] if outcomes[u].status in ("failed", "skipped")]
        if blocked:
            outcomes[name] = StageOutcome(name, "skipped", detail=f"upstream {blocked[0]} did not finish")
            continue
        start = time.perf_counter()
        known = _known_reasons(name, upstream, outcomes, opening)
        state = retrying.with_options(task_run_name=f"stage:{name}")(
            env.root, name, force=force, known_reasons=known, return_state=True
        )
        outcomes[name] = _outcome(name, state, time.perf_counter() - start, state.result)
    return [outcomes[name] for name in order]


def _reproduce_in_parallel(
    env: StageEnv,
    order: list[str],
    upstream: dict[str, list[str]],
    retrying,
    force: bool = False,
    opening: dict[str, list[str]] | None = None,
) -> list[StageOutcome]:
    """Start each stage as soon as all its upstream stages finished, at most `max_parallel` at once, the
    ready stage with the longest critical path first (its seconds and its dependents' from their last runs
    in the tracking store; dvc.yaml's order without them); a stage whose upstream failed or was skipped is
    skipped. Stage flows run as subprocesses."""
    from prefect.futures import as_completed

    # What the stage subprocesses need from this run; a Dask worker's environment predates the parent run.
    child_env = {
        key: os.environ[key]
        for key in (PARENT_RUN_ENV, "PREFECT_API_URL", "MLFLOW_TRACKING_URI")
        if os.environ.get(key)
    }
    child_env[PARALLEL_ENV] = str(env.runtime.max_parallel)  # each stage sizes its threads to its share
    outcomes: dict[str, StageOutcome] = {}
    seconds = last_stage_seconds(env.runtime.tracking_uri(), env.root, env.runtime.profile)
    waiting = critical_path_order(order, upstream, seconds)  # still dependencies first
    running: dict[object, tuple[str, float]] = {}  # future -> (stage, start)
    # Stages fork from one pre-imported process (thread runner only: a Dask worker is another process).
    with _fork_server(env.root, child_env) if env.runtime.task_runner == "thread" else nullcontext():
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
                    env.root,
                    name,
                    isolated=True,
                    child_env=child_env,
                    force=force,
                    known_reasons=_known_reasons(name, upstream, outcomes, opening or {}),
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
