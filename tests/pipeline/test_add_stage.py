"""Adding a stage through the steps of docs/design.md ("Adding a stage"), in a copy of the repo: a toy
unigram language model. It touches exactly the four files the doc names (the model, the task module with
its spec, a params section, the dvc.yaml entry), `kiln check` names the code deps to add, and then
`dvc repro` runs it as a Prefect flow that logs to MLflow, with no other file edited."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.pipeline.helpers import runs_of, sh, smoke_project

pytestmark = pytest.mark.pipeline

MODEL = '''"""A unigram language model with add-k smoothing: p(w) = (c(w) + k) / (N + kV)."""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class UnigramConfig:
    k: float  # pseudo-count added to every word type


def unigram_log_probs(counts: Tensor, cfg: UnigramConfig) -> Tensor:
    """(V,) counts -> (V,) natural-log probabilities."""
    return torch.log((counts + cfg.k) / (counts.sum() + cfg.k * counts.numel()))
'''

TASK = '''"""`unigram`: the toy stage of docs/design.md, a smoothed unigram LM scored on the test stream."""

from dataclasses import dataclass

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.text.unigram import UnigramConfig, unigram_log_probs
from tasks.io import write_json
from tasks.layout import CORPUS_DIR, METRICS_DIR
from tasks.spec import StageContext, StageSpec
from tasks.text.corpus import read_stream, read_vocab


@dataclass(frozen=True)
class UnigramInputs:
    unigram: UnigramConfig


@task(name="unigram", cache_policy=NO_CACHE)
def unigram_task(ctx: StageContext, inputs: UnigramInputs) -> dict[str, float]:
    corpus = ctx.root / CORPUS_DIR
    vocab_size = len(read_vocab(corpus))
    counts = torch.from_numpy(np.bincount(read_stream(corpus, "train"), minlength=vocab_size)).double()
    log_p = unigram_log_probs(counts, inputs.unigram)
    test = torch.from_numpy(read_stream(corpus, "test"))
    metrics = {"test_perplexity": float(torch.exp(-log_p[test].mean()))}
    write_json(ctx.root / METRICS_DIR / "unigram.json", metrics)
    ctx.run.log_metrics(metrics)
    return metrics


SPEC = StageSpec(name="unigram", family="text", task=unigram_task, inputs=UnigramInputs, seeded=False)
'''

STAGE = """
  unigram:
    cmd: kiln stage unigram
    deps:
      - data/prepared/corpus
    params:
      - params/lm.yaml:
          - unigram
    metrics:
      - data/metrics/unigram.json
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root):
    return smoke_project(repo_root, tmp_path_factory.mktemp("add") / "repo")


def test_a_toy_stage_is_four_files_and_runs(project):
    env = {"PYTHONPATH": str(project)}  # the copy's code, with its new modules, not the installed one's
    # 1. the model, 2. the task module with its spec, 3. its params section, 4. its dvc.yaml entry
    (project / "models/text/unigram.py").write_text(MODEL)
    (project / "tasks/text/unigram.py").write_text(TASK)
    with open(project / "params/lm.yaml", "a") as f:
        f.write("\nunigram:                  # models/text/unigram.py: the toy stage of docs/design.md\n  k: 1.0\n")
    with open(project / "dvc.yaml", "a") as f:
        f.write(STAGE)

    # kiln check names the code deps the new stage must list: the import closure of its task module
    done = sh(project, "kiln", "check", check=False, env=env)
    assert done.returncode == 1
    missing = sorted(
        line.split("missing ")[1].split(" ")[0]
        for line in done.stdout.splitlines()
        if line.startswith("unigram: code deps: missing")
    )
    assert missing == [
        "models/text/tokenizer.py",
        "models/text/unigram.py",
        "tasks/text/corpus.py",
        "tasks/text/unigram.py",
    ]
    assert all(line.startswith("unigram:") for line in done.stdout.splitlines() if line.strip())
    text = (project / "dvc.yaml").read_text()
    (project / "dvc.yaml").write_text(
        text.replace(
            "      - data/prepared/corpus\n    params:\n      - params/lm.yaml:\n          - unigram",
            "      - data/prepared/corpus\n"
            + "".join(f"      - {m}\n" for m in missing)
            + "    params:\n      - params/lm.yaml:\n          - unigram",
        )
    )
    sh(project, "kiln", "check", env=env)

    changed = sh(project, "git", "status", "--porcelain", "--untracked-files=all").stdout.split("\n")
    assert sorted(line[3:] for line in changed if line) == [
        "dvc.yaml",
        "models/text/unigram.py",
        "params/lm.yaml",
        "tasks/text/unigram.py",
    ]

    sh(project, "dvc", "repro", "unigram", env=env)
    metrics = json.loads((project / "data/metrics/unigram.json").read_text())
    corpus = project / "data/prepared/corpus"
    train = pq.read_table(corpus / "train.parquet").column(0).to_numpy()
    test = pq.read_table(corpus / "test.parquet").column(0).to_numpy()
    vocab = pq.read_table(corpus / "vocab.parquet").num_rows
    counts = np.bincount(train, minlength=vocab) + 1.0
    expected = math.exp(-np.mean(np.log(counts[test] / counts.sum())))
    assert metrics["test_perplexity"] == pytest.approx(expected, rel=1e-9)
    (run,) = runs_of(project, "text", "unigram")
    assert run.data.metrics["test_perplexity"] == pytest.approx(expected, rel=1e-9)
    assert run.data.params["unigram.k"] == "1.0"
