"""`kiln check` (flows/check.py): passes on the repo, and names the stage and the module or param when
dvc.yaml drifts from the specs and the code."""

from __future__ import annotations

import pytest

from flows.check import check, code_deps
from tests.pipeline.helpers import copy_project, sh


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root):
    return copy_project(repo_root, tmp_path_factory.mktemp("check"))


def test_the_repo_passes(repo_root):
    assert check(repo_root) == []


def test_the_closure_follows_imports_and_drops_infrastructure(repo_root):
    deps = code_deps(repo_root, repo_root / "tasks/text/ngram.py")
    assert deps == {
        "models/text/ngram.py",
        "models/text/tokenizer.py",
        "tasks/text/corpus.py",
        "tasks/text/ngram.py",
    }  # tasks/io.py, tracking.py, layout.py, spec.py: no effect on results
    # function-level imports count: the image readers import the built-in digits inside a function
    assert "tasks/digits.py" in code_deps(repo_root, repo_root / "tasks/generative/images.py")


def _edit(path, old, new):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_a_removed_code_dep_is_named_with_its_stage(project):
    dvc_yaml = project / "dvc.yaml"
    before = dvc_yaml.read_text()
    try:
        # the FID math every FID-scored stage runs: dropping it from one stage is the drift to catch
        start = before.index("\n  controlnet:")
        block = before[start : before.index("    params:", start)]
        dvc_yaml.write_text(before.replace(block, block.replace("      - models/generative/fid.py\n", "")))
        problems = check(project)
        assert problems == [
            "controlnet: code deps: missing models/generative/fid.py "
            "(in the import closure of tasks.generative.controlnet)"
        ]
    finally:
        dvc_yaml.write_text(before)


def test_an_added_import_is_named_for_every_stage_of_the_module(project):
    task = project / "tasks/text/ngram.py"
    before = task.read_text()
    try:
        _edit(
            task,
            "from models.text import ngram as kn\n",
            "from models.text import hippo  # noqa: F401\nfrom models.text import ngram as kn\n",
        )
        assert check(project) == [
            "ngram: code deps: missing models/text/hippo.py (in the import closure of tasks.text.ngram)"
        ]
    finally:
        task.write_text(before)


def test_params_drift_is_named(project):
    dvc_yaml = project / "dvc.yaml"
    before = dvc_yaml.read_text()
    try:
        _edit(
            dvc_yaml, "      - params/lm.yaml:\n          - ngram\n", "      - params/lm.yaml:\n          - lm_eval\n"
        )
        assert check(project) == [
            "ngram: params: missing params/lm.yaml:ngram (its spec reads it)",
            "ngram: params: params/lm.yaml:lm_eval is listed but its spec does not read it",
        ]
    finally:
        dvc_yaml.write_text(before)


def test_the_cli_exits_1_and_prints_each_problem(project):
    task = project / "tasks/text/corpus.py"
    before = task.read_text()
    try:
        _edit(task, "from tasks.io import", "import models.text.ngram  # noqa: F401\nfrom tasks.io import")
        done = sh(project, "kiln", "check", check=False, env={"PYTHONPATH": str(project)})
        assert done.returncode == 1
        assert "corpus: code deps: missing models/text/ngram.py" in done.stdout
        assert "disagreement(s) between dvc.yaml, the stage specs and the code" in done.stderr
    finally:
        task.write_text(before)
