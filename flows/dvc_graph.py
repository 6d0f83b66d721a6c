"""DVC's view of the pipeline, read without Prefect: the stages in dependency order and why each one is
stale, with the repo opened as few times as possible (`kiln status` and `kiln run --dry-run` import only
this; `flows/pipeline.py` runs the stages).

Every DVC call goes through `_dvc`: one at a time in this process, and retried while another process
holds DVC's repo lock.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dvc.repo import Repo, lock_repo

# The Repo whose DVC repo lock this process holds for a whole `kiln run` (hold_repo_lock).
_HOLDER: list[Repo] = []


class RepoBusy(RuntimeError):
    """Another DVC process (`dvc repro`, `dvc exp run`, a `dvc` command) holds the repo."""


def _open_repo(root: Path) -> Repo:
    repo = Repo(str(root))
    if _HOLDER:
        from dvc.lock import LockNoop

        # This process already holds DVC's lock; a second flock on the file from this process would fail.
        repo.lock = LockNoop()
    return repo


@contextmanager
def hold_repo_lock(root: Path) -> Iterator[None]:
    """Hold DVC's repo lock (`.dvc/tmp/lock`) for a whole `kiln run`, as `dvc repro` holds it for its own.
    A `dvc exp run` started meanwhile then stops at once with DVC's "Unable to acquire lock", before it
    writes its `-S` params into the workspace, instead of interleaving with the run; so do `dvc repro`
    and `dvc status` (after DVC's own ~3 s of retries). Raises RepoBusy when another DVC process holds it
    now. This process's DVC calls reuse the held lock."""
    from dvc.lock import LockError

    repo = Repo(str(root))
    try:
        repo.lock.lock()
    except LockError:
        repo.close()
        raise RepoBusy(
            f"another DVC process (dvc repro, dvc exp run, ...) holds {root / '.dvc' / 'tmp' / 'lock'}; "
            "wait for it to finish"
        ) from None
    _HOLDER.append(repo)
    try:
        yield
    finally:
        _HOLDER.remove(repo)
        repo.lock.unlock()
        repo.close()


@contextmanager
def released_repo_lock() -> Iterator[None]:
    """Let go of the held lock while a child process needs it (`dvc repro` of a command that is not a
    kiln stage), and take it back afterwards."""
    if not _HOLDER:
        yield
        return
    repo = _HOLDER[-1]
    repo.lock.unlock()
    try:
        yield
    finally:
        repo.lock.lock()


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
    with _open_repo(root) as repo:
        return _order_in(repo, targets)


def _order_in(repo: Repo, targets: list[str] | None) -> tuple[list[str], dict[str, list[str]]]:
    import networkx as nx

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


def critical_paths(order: list[str], upstream: dict[str, list[str]], seconds: dict[str, float]) -> dict[str, float]:
    """Each stage's critical path: its own `seconds` (0 without) plus the longest chain of stages that wait
    on it. The largest is the shortest wall time any number of slots allows."""
    downstream: dict[str, list[str]] = {name: [] for name in order}
    for name in order:
        for up in upstream[name]:
            downstream[up].append(name)
    path: dict[str, float] = {}
    for name in reversed(order):
        path[name] = max(seconds.get(name, 0.0), 0.0) + max((path[d] for d in downstream[name]), default=0.0)
    return path


def critical_path_order(order: list[str], upstream: dict[str, list[str]], seconds: dict[str, float]) -> list[str]:
    """`order` (dependencies first) re-ranked by `critical_paths`, longest first (list scheduling's
    highest-level-first rule). When fewer slots than ready stages, starting the stage that holds up the most
    work first keeps the last slots from idling behind one long chain. Ties keep `order`, and the result
    still lists dependencies first (a stage's path is never shorter than a dependent's)."""
    path = critical_paths(order, upstream, seconds)
    return sorted(order, key=lambda name: -path[name])  # stable: ties in `order`'s order


def stale_reasons(root: Path, name: str) -> list[str]:
    """Why DVC considers stage `name` changed (empty: up to date), params down to the changed key."""
    return stale_reasons_of(root, [name])[name]


def stale_reasons_then(
    root: Path, name: str, known: list[str] | None, then: Callable[[Any], T]
) -> tuple[list[str], T | None]:
    """Stage `name`'s stale reasons (`known` when given, else DVC's now) and, when it is stale, `then(stage)`
    on its DVC stage, with one opening of the repo for both: each opening parses dvc.yaml, its params
    templating and dvc.lock again. `known` empty: up to date, the repo is not opened."""
    if known is not None and not known:
        return known, None

    def both() -> tuple[list[str], T | None]:
        with _open_repo(root) as repo, lock_repo(repo), _params_files_read_once():
            if known is None:
                stage = next(s for s in repo.index.stages if s.addressing == name)
                reasons = _stage_reasons(stage)
            else:
                (stage,), reasons = repo.stage.collect(name), known
            return reasons, (then(stage) if reasons else None)

    return _dvc(both)


def stale_reasons_of(root: Path, names: list[str]) -> dict[str, list[str]]:
    """`stale_reasons` of several stages with one opening of the repo (`kiln status`, `--dry-run`): each
    opening parses dvc.yaml, the params templating and dvc.lock again."""
    return _dvc(lambda: _stale_reasons_of(root, names))


def _stale_reasons_of(root: Path, names: list[str]) -> dict[str, list[str]]:
    with _open_repo(root) as repo, lock_repo(repo), _params_files_read_once():
        stages = {stage.addressing: stage for stage in repo.index.stages}
        return {name: _stage_reasons(stages[name]) for name in names}


def order_and_stale_reasons(
    root: Path, targets: list[str] | None = None
) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """`stage_order` and `stale_reasons_of` its stages with one opening of the repo (`kiln status`)."""

    def both():
        with _open_repo(root) as repo, lock_repo(repo), _params_files_read_once():
            order, upstream = _order_in(repo, targets)
            stages = {stage.addressing: stage for stage in repo.index.stages}
            return order, upstream, {name: _stage_reasons(stages[name]) for name in order}

    return _dvc(both)


@contextmanager
def _params_files_read_once() -> Iterator[None]:
    """DVC parses a params file once per params dep that names it, twice per stage (status, then our
    key-by-key diff): about a hundred YAML parses for this dvc.yaml, most of `kiln status`'s time. While
    one status is computed the files do not change, so each is parsed once and DVC gets a copy."""
    import copy

    import dvc.dependency.param as param

    original = param.load_path
    parsed: dict[tuple[str, int], Any] = {}

    def load_once(path, fs, **kwargs):
        if kwargs:
            return original(path, fs, **kwargs)
        key = (str(path), id(fs))
        if key not in parsed:
            parsed[key] = original(path, fs)
        return copy.deepcopy(parsed[key])

    param.load_path = load_once
    try:
        yield
    finally:
        param.load_path = original


@contextmanager
def lock_file_read_in_c() -> Iterator[None]:
    """While the block runs, DVC reads dvc.lock for a rewrite with ruamel.yaml's safe parser, in C.

    Before it rewrites dvc.lock (a commit), DVC parses it with the round-trip parser, which keeps comments and
    layout and has no C path: 0.9 s for the default profile's 127 kB, against 0.16 s. dvc.lock is DVC's own
    output, without comments, and DVC's dumper writes the same bytes from either parse (tests/unit/flows/
    test_lock_file_parse.py). Any other file DVC rewrites (dvc.yaml, whose comments are the user's) keeps the
    round trip. Callers hold `_DVC_MUTEX`, so no other DVC step of this process sees the swap."""
    import dvc.utils.serialize._yaml as yaml_io

    original = yaml_io.parse_yaml_for_update

    def parse(text: str, path) -> Any:
        if Path(os.fspath(path)).name == "dvc.lock":
            return yaml_io.parse_yaml(text, path, typ="safe")
        return original(text, path)

    yaml_io.parse_yaml_for_update = parse
    try:
        yield
    finally:
        yaml_io.parse_yaml_for_update = original


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
