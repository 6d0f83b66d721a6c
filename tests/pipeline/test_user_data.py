"""Your data, end to end in one smoke copy: models trained on the built-in corpus score sentences; the corpus
rebuilt from your text makes `kiln score` refuse them with one line naming the stage to rerun (each model
records its vocabulary's digest); and your text is a DVC dependency, so editing or deleting one of its
files makes `corpus` and what depends on it stale until one `kiln run` brings them up to date.

The tests of this module run in file order on one shared copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.helpers import DOCUMENTS, kiln_run, set_params, sh, smoke_project, stale, summary

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root) -> Path:
    return smoke_project(repo_root, tmp_path_factory.mktemp("kiln") / "repo")


def refusal(project: Path, *args: str) -> str:
    """`kiln score ARGS` refused: exit status 2 and one line on stderr, returned."""
    done = sh(project, "kiln", "score", *args, "the cat", check=False)
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-4000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def dry_run(project: Path) -> list[str]:
    out = sh(project, "kiln", "run", "--target", "ngram", "--dry-run").stdout.splitlines()
    return [line.split()[2] for line in out if line.startswith("would run")]


def test_models_trained_on_the_corpus_score(project):
    kiln_run(project, "ngram", "lm@lstm")
    assert (project / "data/models/ngram/vocab_digest.txt").is_file()
    for args in ((), ("--model", "lstm")):
        done = sh(project, "kiln", "score", *args, "the cat")
        assert "the cat" in done.stdout


def test_a_rebuilt_corpus_makes_both_scorers_refuse_and_name_the_rerun(project):
    folder = project / "user_data" / "corpus"
    for i, text in enumerate(DOCUMENTS):
        (folder / f"doc{i:02d}.txt").write_text(text + "\n", encoding="utf-8")
    set_params(project, "data.yaml", "corpus", source="path")  # corpus.path is user_data/corpus already
    kiln_run(project, "corpus")

    lstm = refusal(project, "--model", "lstm")
    assert "data/models/lm/lstm/model.pt was trained on another vocabulary" in lstm
    assert "`dvc repro lm@lstm`" in lstm

    ngram = refusal(project)
    assert "data/models/ngram/model.arpa was trained on another vocabulary" in ngram
    assert "`dvc repro ngram`" in ngram


def test_editing_one_user_file_makes_corpus_and_its_dependents_stale(project):
    folder = project / "user_data" / "corpus"
    assert summary(kiln_run(project, "ngram").stdout) == {"corpus": "up to date", "ngram": "ran"}
    assert stale(project, "ngram") == {}

    with open(folder / "doc03.txt", "a") as f:
        f.write("A new sentence about the river and the sheep.\n")
    changed = stale(project, "ngram")
    assert list(changed) == ["corpus"] and "user_data/corpus" in str(changed["corpus"])
    assert dry_run(project) == ["corpus", "ngram"]  # ngram reruns because its upstream does

    assert summary(kiln_run(project, "ngram").stdout) == {"corpus": "ran", "ngram": "ran"}
    assert stale(project, "ngram") == {}

    (folder / "doc05.txt").unlink()  # deleting a file is a change too
    assert list(stale(project, "ngram")) == ["corpus"]
