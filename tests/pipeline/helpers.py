"""Running kiln, git and dvc in a throw-away copy of the project, and reading back what they left."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
    # The Prefect server that a `dvc repro` chain's stages share stops soon after a test's last stage.
    "KILN_PREFECT_IDLE_S": "5",
}


_PREFECT_API: list[str] = []
# tests/conftest.py turns this on: commands then report to the test worker's Prefect API. Off for the
# benchmarks, which measure what a user's `kiln run` and `dvc repro` cost, server start included.
SHARE_PREFECT_API = False


def prefect_api() -> str:
    """One Prefect API per test worker for the commands the tests start, started on first use: each
    `kiln` would otherwise start a server of its own (~6 s of a smoke stage's cost). It dies with the
    worker. A test of how `kiln` runs without one passes an environment without PREFECT_API_URL."""
    if not _PREFECT_API:
        from flows.prefect_api import start_child_server

        # Not stopped at exit (Prefect would log to pytest's closed streams): the parent-death signal ends it.
        _PREFECT_API.append(start_child_server().api_url)
    return _PREFECT_API[0]


_ZYGOTE: list = []
# tests/conftest.py turns this on: `kiln` and `dvc` commands with the common environment fork from one
# pre-imported process per test worker (tests/pipeline/zygote.py) instead of starting an interpreter each.
FORK_COMMANDS = False


def _forked(args: tuple[str, ...], env: Mapping[str, str] | None, full_env: Mapping[str, str]):
    """The worker's zygote when `args` may run in it: a `kiln` or `dvc` command without variables of its own."""
    from tests.pipeline.zygote import COMMANDS, Zygote

    if not FORK_COMMANDS or env or args[0] not in COMMANDS or os.environ.get("KILN_TEST_FORK") == "0":
        return None
    if not _ZYGOTE or not _ZYGOTE[0].ready():  # started, and still running
        _ZYGOTE[:] = [Zygote(full_env)]
    return _ZYGOTE[0]


def sh(
    cwd: Path, *args: str, check: bool = True, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command in `cwd`; `env` adds to (or overrides) the tests' environment (and the worker's
    Prefect API, under pytest). Under pytest, a `kiln` or `dvc` command without `env` forks from the
    worker's zygote (KILN_TEST_FORK=0: a process each)."""
    shared = {"PREFECT_API_URL": prefect_api()} if SHARE_PREFECT_API else {}
    full_env = {**ENV, **shared, **(env or {})}
    zygote = _forked(args, env, full_env)
    if zygote is not None:
        done = zygote.capture(args, cwd, full_env, stdin, timeout=600)
    else:
        done = subprocess.run(
            list(args), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600, input=stdin
        )
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def copy_project(source: Path, dest: Path) -> Path:
    """The working tree as git sees it (tracked and unignored files), as a fresh git repo."""
    listed = sh(source, "git", "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
    for name in filter(None, listed.split("\0")):
        if (source / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "copy")
    return dest


def kiln_run(
    project: Path, *targets: str, check: bool = True, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    return sh(project, "kiln", "run", *(a for t in targets for a in ("--target", t)), check=check, env=env)


def stale(project: Path, *targets: str) -> dict:
    """`dvc status` of `targets` and their upstream, as JSON ({} when all are up to date)."""
    return json.loads(sh(project, "dvc", "status", "--json", "--with-deps", *targets).stdout)


def _summary_rows(output: str) -> list[list[str]]:
    """The cells (stage, status, seconds, detail) of each row of the summary table that `kiln run` prints last."""
    rows = [line.split("|") for line in output.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in cells[1:5]] for cells in rows if cells[1].strip() != "stage"]


def summary(output: str) -> dict[str, str]:
    """stage -> status from the summary table that `kiln run` prints last."""
    return {cells[0]: cells[1] for cells in _summary_rows(output)}


def summary_seconds(output: str) -> dict[str, float]:
    """stage -> its task's seconds in that table (DVC's steps and the stage's flow, as `kiln run` timed them)."""
    return {cells[0]: float(cells[2]) for cells in _summary_rows(output)}


def set_params(project: Path, file: str, section: str, **values: Any) -> None:
    """Set keys of one section of `params/FILE` in a copy, keeping its comments (what a user's edit does)."""
    from ruamel.yaml import YAML

    yaml = YAML()
    path = project / "params" / file
    document = yaml.load(path.read_text(encoding="utf-8"))
    for key, value in values.items():
        if key not in document[section]:
            raise KeyError(f"{path}: {section} has no key {key!r}")
        document[section][key] = value
    with open(path, "w", encoding="utf-8") as out:
        yaml.dump(document, out)


_SMOKE_TEMPLATES: dict[Path, Path] = {}


def smoke_project(source: Path, dest: Path) -> Path:
    """A copy of the project switched to the smoke profile, committed. The first call of a test worker
    builds it (a `kiln profile` process and three git commands); later calls copy that, git history and all."""
    template = _SMOKE_TEMPLATES.get(source)
    if template is None:
        home = Path(tempfile.mkdtemp(prefix="kiln-smoke-"))
        atexit.register(shutil.rmtree, home, ignore_errors=True)
        template = copy_project(source, home / "repo")
        sh(template, "kiln", "profile", "smoke")
        sh(template, "git", "commit", "-qam", "smoke profile")
        _SMOKE_TEMPLATES[source] = template
    shutil.copytree(template, dest, symlinks=True)
    return dest


def mlflow_client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def runs_of(project: Path, experiment: str, name: str):
    client = mlflow_client(project)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'", order_by=["start_time DESC"])


# Twelve short documents (the smoke profile keeps 12) of plain English, no sentence repeated, so the split has
# a val and a test document and nothing of test occurs in train.
DOCUMENTS = [
    "The cat sat by the window all morning. It watched the birds in the garden. "
    "When the sun moved, the cat moved with it. Later it slept on a warm chair in the kitchen.",
    "My brother keeps a small boat on the lake. On calm days we row to the far shore. "
    "The water there is clear and cold. We eat bread and cheese before we row back home.",
    "The old library closes early on Sundays. Its reading room has tall windows and long tables. "
    "Students come to study before their exams. The librarian knows every book by its shelf.",
    "Rain fell over the town for three days. The river rose and covered the low road. "
    "Farmers moved their sheep to higher fields. On the fourth day the clouds finally broke.",
    "A good soup needs time more than skill. Cut the onions thin and cook them slowly. "
    "Add the carrots, the beans and a little salt. Let the pot simmer while you set the table.",
    "The train to the coast leaves at nine. It stops at every village along the valley. "
    "Children wave from the platforms as it passes. By noon the sea appears behind the hills.",
    "Our neighbour plants tomatoes every spring. She waters them each evening after work. "
    "In summer the plants grow taller than the fence. She gives the extra fruit to the school.",
    "The museum opened a new hall last year. It shows tools that people used long ago. "
    "There are stone knives, clay pots and a wooden plough. Visitors may touch some of the copies.",
    "Winter comes early in the mountains. The first snow usually falls in October. "
    "The roads close when the drifts grow deep. Families store wood and flour before the cold.",
    "The dog waited at the gate for the children. It barked when the bus came around the corner. "
    "Then it ran in circles on the grass. The children laughed and threw a ball across the yard.",
    "A letter arrived from an old friend abroad. She wrote about her new job at a hospital. "
    "Her city is loud but full of music. She hopes to visit us again next summer.",
    "The market square is busy on Saturday mornings. Traders sell fish, fruit and fresh flowers. "
    "A man plays the violin near the fountain. By afternoon the stalls are packed away again.",
]
