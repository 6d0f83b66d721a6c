"""`kiln score` refuses models trained on another corpus vocabulary: train the n-gram and the LSTM on the
built-in corpus, rebuild the corpus from other text, and both scorers name the stage to rerun.

The tests of this module run in file order on one shared copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipeline.helpers import kiln_run, set_params, sh, smoke_project

pytestmark = pytest.mark.pipeline

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
