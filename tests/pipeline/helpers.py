"""Running kiln, git and dvc in a throw-away copy of the project, and reading back what they left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
}


def sh(
    cwd: Path, *args: str, check: bool = True, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command in `cwd`; `env` adds to (or overrides) the tests' environment."""
    done = subprocess.run(
        list(args), cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=600, input=stdin
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


def summary(output: str) -> dict[str, str]:
    """stage -> status from the summary table that `kiln run` prints last."""
    rows = [line.split("|") for line in output.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[1].strip(): cells[2].strip() for cells in rows if cells[1].strip() != "stage"}


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


def smoke_project(source: Path, dest: Path) -> Path:
    """A copy of the project switched to the smoke profile, committed."""
    copy_project(source, dest)
    sh(dest, "kiln", "profile", "smoke")
    sh(dest, "git", "commit", "-qam", "smoke profile")
    return dest


def mlflow_client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def runs_of(project: Path, experiment: str, name: str):
    client = mlflow_client(project)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'", order_by=["start_time DESC"])
