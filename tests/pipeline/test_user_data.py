"""Your data is a DVC dependency of the stage that reads it: in a smoke copy with the corpus read from
`user_data/corpus`, editing one of its files makes `corpus` and what depends on it stale, and one
`kiln run` brings them up to date again."""

from __future__ import annotations

import pytest

from tests.pipeline.helpers import DOCUMENTS, kiln_run, set_params, sh, smoke_project, stale, summary

pytestmark = pytest.mark.pipeline


def dry_run(project) -> list[str]:
    out = sh(project, "kiln", "run", "--target", "ngram", "--dry-run").stdout.splitlines()
    return [line.split()[2] for line in out if line.startswith("would run")]


def test_editing_one_user_file_makes_corpus_and_its_dependents_stale(tmp_path, repo_root):
    project = smoke_project(repo_root, tmp_path / "repo")
    folder = project / "user_data" / "corpus"
    for i, text in enumerate(DOCUMENTS):
        (folder / f"doc{i:02d}.txt").write_text(text + "\n")
    set_params(project, "data.yaml", "corpus", source="path")  # corpus.path is user_data/corpus already
    assert summary(kiln_run(project, "ngram").stdout) == {"corpus": "ran", "ngram": "ran"}
    assert stale(project, "ngram") == {} and dry_run(project) == []

    with open(folder / "doc03.txt", "a") as f:
        f.write("A new sentence about the river and the sheep.\n")
    changed = stale(project, "ngram")
    assert list(changed) == ["corpus"] and "user_data/corpus" in str(changed["corpus"])
    assert dry_run(project) == ["corpus", "ngram"]  # ngram reruns because its upstream does

    assert summary(kiln_run(project, "ngram").stdout) == {"corpus": "ran", "ngram": "ran"}
    assert stale(project, "ngram") == {} and dry_run(project) == []

    (folder / "doc05.txt").unlink()  # deleting a file is a change too
    assert list(stale(project, "ngram")) == ["corpus"]
