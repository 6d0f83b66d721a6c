"""`kiln score` refuses models trained on another corpus vocabulary: train the n-gram and the LSTM on the
built-in corpus, rebuild the corpus from other text, and both scorers name the stage to rerun.

The tests of this module run in file order on one shared copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.helpers import DOCUMENTS, kiln_run, set_params, sh, smoke_project

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


def test_models_trained_on_the_corpus_score(project):
    kiln_run(project, "ngram", "lm@lstm")
    assert (project / "data/models/ngram/vocab_digest.txt").is_file()
    for args in ((), ("--model", "lstm")):
        done = sh(project, "kiln", "score", *args, "the cat")
        assert "the cat" in done.stdout


def test_a_rebuilt_corpus_makes_both_scorers_refuse_and_name_the_rerun(project):
    folder = project / "mytext"
    folder.mkdir()
    for i, text in enumerate(DOCUMENTS):
        (folder / f"doc{i:02d}.txt").write_text(text + "\n", encoding="utf-8")
    set_params(project, "data.yaml", "corpus", source="path", path="mytext")
    kiln_run(project, "corpus")

    lstm = refusal(project, "--model", "lstm")
    assert "data/models/lm/lstm/model.pt was trained on another vocabulary" in lstm
    assert "`dvc repro lm@lstm`" in lstm

    ngram = refusal(project)
    assert "data/models/ngram/model.arpa was trained on another vocabulary" in ngram
    assert "`dvc repro ngram`" in ngram
