"""The text family end to end, in a copy of the repo: `kiln run` with the smoke profile, what DVC and
MLflow hold afterwards, incremental reruns, a single `dvc repro`, a failing stage, `kiln score`.

The tests of this module run in file order on one shared copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import reference
from tests.pipeline.helpers import (
    copy_project,
    kiln_run,
    mlflow_client,
    runs_of,
    set_params,
    sh,
    smoke_project,
    stale,
    summary,
)

pytestmark = pytest.mark.pipeline

LMS = ["lm@lstm", "lm@transformer", "lm@s4d", "lm@mamba"]
STAGES = ["corpus", "ngram", *LMS, "lm_compare"]
TARGET = "lm_compare"  # the text family's last stage


def statuses(**overrides: str) -> dict[str, str]:
    """The expected summary: every stage `default` unless overridden (stage names with @ via dict)."""
    default = overrides.pop("default")
    return {stage: overrides.get(stage.replace("@", "_"), default) for stage in STAGES}


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root) -> Path:
    return smoke_project(repo_root, tmp_path_factory.mktemp("kiln") / "repo")


@pytest.fixture(scope="module")
def first_run(project) -> subprocess.CompletedProcess:
    return kiln_run(project, TARGET)


def test_first_run_reproduces_every_text_stage_and_leaves_dvc_clean(project, first_run):
    assert summary(first_run.stdout) == statuses(default="ran")
    assert stale(project, TARGET) == {}
    for path in (
        "data/prepared/corpus/train.parquet",
        "data/models/ngram/model.arpa",
        "data/models/ngram/counts_3.parquet",
        "data/metrics/ngram.json",
        "data/plots/ngram_perplexity.csv",
    ):
        assert (project / path).is_file(), path
    metrics = json.loads((project / "data/metrics/ngram.json").read_text())
    ppl = metrics["test_perplexity_by_order"]
    assert set(ppl) == {"1", "2", "3"} and all(np.isfinite(list(ppl.values())))
    assert ppl["2"] < ppl["1"], "a bigram KN model must beat the unigram on held-out text"


def test_lock_is_what_dvc_repro_writes(project, first_run, repo_root, tmp_path):
    other = copy_project(project, tmp_path / "repo")
    shutil.rmtree(other / "data", ignore_errors=True)
    (other / "mlflow.db").unlink(missing_ok=True)
    # One stage of each kind (data, n-gram, neural LM); the other LMs go through the same code paths.
    sh(other, "dvc", "repro", "ngram", "lm@lstm")
    from ruamel.yaml import YAML

    ours = YAML(typ="safe").load((project / "dvc.lock").read_text())
    theirs = YAML(typ="safe").load((other / "dvc.lock").read_text())
    assert set(theirs["stages"]) == {"corpus", "ngram", "lm@lstm"}
    assert {name: ours["stages"][name] for name in theirs["stages"]} == theirs["stages"]


def test_second_run_executes_nothing(project, first_run):
    assert summary(kiln_run(project, TARGET).stdout) == statuses(default="up to date")


def test_mlflow_holds_nested_stage_runs_with_params_metrics_inputs_and_artifacts(project, first_run):
    client = mlflow_client(project)
    (parent,) = runs_of(project, "pipeline", "kiln run")[-1:]
    for stage in ("corpus", "ngram"):
        run = runs_of(project, "text", stage)[-1]  # the first run's
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["dvc.stage"] == stage and tags["kiln.profile"] == "smoke"
        assert len(tags["mlflow.source.git.commit"]) >= 40 and tags["prefect.flow_run_id"]
        assert run.inputs.dataset_inputs, f"{stage} logged no dataset input"
    ngram = runs_of(project, "text", "ngram")[-1]
    assert ngram.data.params["ngram.order"] == "3"
    history = client.get_metric_history(ngram.info.run_id, "test_perplexity_by_order")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert ngram.data.metrics["test_perplexity"] == pytest.approx(
        json.loads((project / "data/metrics/ngram.json").read_text())["test_perplexity"]
    )
    artifacts = {a.path for a in client.list_artifacts(ngram.info.run_id)}
    assert {"model", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(ngram.info.run_id, "plots")}
    assert "plots/ngram_perplexity.png" in plots
    assert parent.data.metrics["stages_ran"] == len(STAGES)


def test_mamba_stage_logs_curves_sample_and_a_model_that_reloads(project, first_run):
    client = mlflow_client(project)
    run = runs_of(project, "text", "lm@mamba")[-1]
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and np.isfinite(metrics["test_perplexity"])
    results = json.loads((project / "data/metrics/lm/mamba.json").read_text())
    for key in ("test_perplexity", "test_perplexity_stream"):  # context from each sentence's <s>; stream context
        assert np.isfinite(results[key]) and metrics[key] == pytest.approx(results[key])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_perplexity")] == [15, 30]
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2
    assert run.data.params["mamba.d_model"] == "32" and run.data.params["lm_train.steps"] == "30"
    sample = client.download_artifacts(run.info.run_id, "sample.txt")
    assert Path(sample).read_text().startswith("<s>")
    compare = json.loads((project / "data/metrics/lm_compare.json").read_text())
    models = ["unigram", "kn2", "kn3", *(m.split("@")[1] for m in LMS)]
    assert set(compare) == {
        *(f"{m}_test_perplexity{end}" for m in models for end in ("", "_ci_low", "_ci_high")),
        *(f"{m.split('@')[1]}_test_perplexity_stream" for m in LMS),
        *(f"{m.split('@')[1]}_seeds" for m in LMS),  # 1 on smoke: no replicates, so no seed interval
        "test_perplexity_by_seed",
    }
    assert compare["mamba_seeds"] == 1
    for m in models:  # the bootstrap interval over test sentences holds the stage's own point estimate
        assert compare[f"{m}_test_perplexity_ci_low"] <= compare[f"{m}_test_perplexity"]
        assert compare[f"{m}_test_perplexity"] <= compare[f"{m}_test_perplexity_ci_high"]
    assert compare["mamba_test_perplexity"] == results["test_perplexity"]
    table = (project / "data/plots/lm_compare.csv").read_text().splitlines()
    assert table[0].split(",")[:4] == ["model", "family", "test_perplexity", "test_perplexity_stream"]
    pairs = (project / "data/plots/lm_compare_pairs.csv").read_text().splitlines()
    assert pairs[0].startswith("pair,better,worse,log_perplexity_difference,ci_low,ci_high,significant")
    scored = json.loads(
        sh(
            project, "kiln", "score", "--json", "--model", "mamba", "--model", "ngram", "the object is returned ."
        ).stdout
    )
    assert [s["model"] for s in scored] == ["mamba", "ngram"]
    assert all(np.isfinite(s["perplexity"]) for s in scored)


def test_kenlm_scores_the_pipeline_arpa_like_our_scorer(project, first_run):
    kenlm = reference("kenlm")
    from models.text import ngram as kn
    from tasks.text.scoring import load_ngram

    model, vocab = load_ngram(project)
    test = pq.read_table(project / "data/prepared/corpus/test.parquet").column("token_id").to_numpy()
    ours = kn.score_stream(model, test).sentence_log10
    corpus_vocab = pq.read_table(project / "data/prepared/corpus/vocab.parquet").column("token").to_pylist()
    ids_to_word = np.array(corpus_vocab, dtype=object)
    starts = np.flatnonzero(test == 1)
    ends = np.flatnonzero(test == 2)
    lm = kenlm.Model(str(project / "data/models/ngram/model.arpa"))
    theirs = [lm.score(" ".join(ids_to_word[test[s + 1 : e]]), bos=True, eos=True) for s, e in zip(starts, ends)]
    assert len(theirs) == len(ours) > 50
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_score_ranks_sentences_and_flags_unknown_words(project, first_run):
    out = sh(
        project,
        "kiln",
        "score",
        "--json",
        stdin="returned the is object .\nthe object is returned .\nthe frobnicator zyzzyva .\n",
    ).stdout
    scores = json.loads(out)
    ranked = [s["sentence"] for s in scores]
    assert ranked.index("the object is returned .") < ranked.index("returned the is object .")
    assert [s["perplexity"] for s in scores] == sorted(s["perplexity"] for s in scores)
    odd = next(s for s in scores if "zyzzyva" in s["sentence"])
    assert odd["unknown"][odd["tokens"].index("zyzzyva")] is True
    assert odd["tokens"][-1] == "</s>" and len(odd["token_log10"]) == len(odd["tokens"])
    assert odd["log10_prob"] == pytest.approx(sum(odd["token_log10"]))


def test_changing_one_ngram_param_reruns_only_ngram_and_the_comparison(project, first_run):
    lm = project / "params/lm.yaml"
    lm.write_text(lm.read_text().replace("order: 3", "order: 2"))
    status = sh(project, "kiln", "status", "--target", TARGET).stdout
    assert "corpus: up to date" in status and "ngram: stale" in status and "ngram.order 3 -> 2" in status
    assert "lm@mamba: up to date" in status
    assert summary(kiln_run(project, TARGET).stdout) == statuses(default="up to date", ngram="ran", lm_compare="ran")
    assert stale(project, TARGET) == {}
    assert not (project / "data/models/ngram/counts_3.parquet").exists()


def test_dvc_repro_of_one_stage_logs_a_top_level_run(project, first_run):
    lm = project / "params/lm.yaml"
    # Order 4 was never run here, so DVC's run cache cannot answer and the command must run.
    lm.write_text(lm.read_text().replace("order: 2", "order: 4"))
    sh(project, "dvc", "repro", "ngram")
    latest = runs_of(project, "text", "ngram")[0]
    assert latest.info.status == "FINISHED" and "mlflow.parentRunId" not in latest.data.tags
    assert latest.data.params["ngram.order"] == "4"
    # `dvc repro ngram` brings ngram and its upstream up to date, not what depends on it.
    assert set(stale(project, TARGET)) == {"lm_compare"}
    sh(project, "dvc", "repro", "lm_compare")
    assert stale(project, TARGET) == {}


def test_failed_stage_stops_dependents_and_leaves_no_partial_output(project, first_run):
    data = project / "params/data.yaml"
    good = data.read_text()
    set_params(project, "data.yaml", "corpus", source="path", path="missing.txt")
    try:
        failed = kiln_run(project, TARGET, check=False)
        assert failed.returncode == 1
        table = summary(failed.stderr)
        assert table == statuses(default="skipped", corpus="failed")
        assert "missing.txt" in failed.stderr
        leftovers = [p for p in (project / "data").rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
        assert leftovers == []
        assert not (project / "data/prepared/corpus").exists()  # removed before the run, as dvc repro does
        failed_run = runs_of(project, "text", "corpus")[0]
        assert failed_run.info.status == "FAILED" and "missing.txt" in failed_run.data.tags["kiln.error"]
        parent = runs_of(project, "pipeline", "kiln run")[0]
        assert parent.info.status == "FAILED" and "corpus" in parent.data.tags["kiln.error"]
    finally:
        data.write_text(good)
    # The corpus comes back identical, so nothing downstream of it is stale.
    assert summary(kiln_run(project, TARGET).stdout) == statuses(default="up to date", corpus="ran")


def test_seed_replicates_are_a_dvc_matrix_pooled_by_lm_compare(project, first_run):
    """`replicates.lm: [1]` adds `lm_replicate@<model>-1` to DVC's graph (a matrix read from the params): each
    trains with seed runtime.seed + 1 into its own outputs, lm_compare pools it with the main stage, and
    `dvc repro` of one replicate reruns that seed alone."""
    from ruamel.yaml import YAML

    seed = int(YAML().load((project / "params/runtime.yaml").read_text())["runtime"]["seed"])
    set_params(project, "replicates.yaml", "replicates", lm=[1])
    replicas = [f"lm_replicate@{m}-1" for m in ("lstm", "transformer", "s4d", "mamba")]
    listed = sh(project, "dvc", "stage", "list", "--name-only").stdout.split()
    assert [n for n in listed if n.startswith("lm_replicate@")] == replicas
    assert not sh(project, "kiln", "check").returncode
    ran = summary(kiln_run(project, TARGET).stdout)
    assert {n: ran[n] for n in replicas} == {n: "ran" for n in replicas} and ran["lm_compare"] == "ran"
    assert ran["lm@lstm"] == "up to date"  # replicate 0 is the main stage, untouched
    main, replica = (json.loads((project / f"data/metrics/lm/{n}.json").read_text()) for n in ("lstm", "lstm-1"))
    assert replica["test_perplexity"] != main["test_perplexity"]  # another seed, another model
    run = runs_of(project, "text", "lm_replicate@lstm-1")[0]
    assert (run.data.params["seed"], run.data.params["replicate"]) == (str(seed + 1), "1")
    compare = json.loads((project / "data/metrics/lm_compare.json").read_text())
    pooled = [main["test_perplexity"], replica["test_perplexity"]]
    assert compare["lstm_seeds"] == 2 and compare["lstm_test_perplexity_seed_mean"] == pytest.approx(np.mean(pooled))
    assert compare["test_perplexity_by_seed"]["lstm"] == {str(seed): pooled[0], str(seed + 1): pooled[1]}
    assert stale(project, TARGET) == {}
    for out in ("model.pt", "checkpoint.pt"):  # no checkpoint to resume from: it trains again
        (project / "data/models/lm/lstm-1" / out).unlink()
    sh(project, "dvc", "repro", "lm_replicate@lstm-1")
    again = json.loads((project / "data/metrics/lm/lstm-1.json").read_text())
    # The same seed again; not bit for bit, as the thread count may differ beside other test workers.
    assert again["test_perplexity"] == pytest.approx(replica["test_perplexity"], rel=1e-3)
    assert stale(project, TARGET) == {}
