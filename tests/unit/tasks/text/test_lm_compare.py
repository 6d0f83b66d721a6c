"""`lm_compare` on a project the test builds: per-sentence scores that add up to each stage's reported
perplexity, the paired bootstrap intervals and pairs, and a loud failure when a model and its metrics part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from models.bootstrap import BootstrapConfig
from models.text.language_models import LANGUAGE_MODELS, build_language_model
from models.text.ngram import NgramConfig
from tasks.errors import StaleArtefact
from tasks.layout import CORPUS_DIR, LM_DIR, METRICS_DIR, PLOTS_DIR
from tasks.spec import ReplicatesConfig, StageContext
from tasks.text.corpus import vocab_digest
from tasks.text.lm import LMEvalConfig, perplexity, sentence_perplexity
from tasks.text.lm_compare import (
    LMCompareInputs,
    SentenceScores,
    bootstrap_tables,
    compare_table,
    comparison_pairs,
    lm_compare_task,
)
from tasks.text.ngram import NgramInputs, ngram_task
from tasks.training import save_model

VOCAB = ["<unk>", "<s>", "</s>", *"abcdefghi"]
CONTEXT = 16  # shorter than the longest test sentences: those are scored in windows inside the sentence
TINY = {
    "lstm": {"d_embed": 16, "d_hidden": 16, "n_layer": 1},
    "transformer": {"n_layer": 1, "n_head": 2, "d_model": 16},
    "s4d": {"d_model": 16, "n_layer": 1, "d_state": 8, "mlp_ratio": 1},
    "mamba": {"d_model": 16, "n_layer": 1},
}


class NoRun:
    """Stands in for the MLflow run: the stage logs, the test reads the files."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def sentences(n: int, longest: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # A skewed source (a few words far more likely) so that the n-gram orders and the LMs differ.
    probs = np.array([8, 4, 2, 1, 1, 1, 1, 1, 1], dtype=float)
    words = [rng.choice(np.arange(3, 12), size=rng.integers(1, longest + 1), p=probs / probs.sum()) for _ in range(n)]
    return np.concatenate([np.concatenate([[1], w, [2]]) for w in words]).astype(np.int32)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_compare")
    corpus = root / CORPUS_DIR
    corpus.mkdir(parents=True)
    streams = {"train": sentences(300, 10, 0), "val": sentences(20, 10, 1), "test": sentences(40, 30, 2)}
    for split, stream in streams.items():
        pq.write_table(pa.table({"token_id": stream}), corpus / f"{split}.parquet")
    counts = np.bincount(streams["train"], minlength=len(VOCAB))
    pq.write_table(pa.table({"id": np.arange(len(VOCAB)), "token": VOCAB, "count": counts}), corpus / "vocab.parquet")
    ctx = StageContext(root, "", 0, "cpu", NoRun())
    ngram_task.fn(ctx, NgramInputs(NgramConfig(order=3)))
    for name, fields in TINY.items():
        torch.manual_seed(0)
        cfg = LANGUAGE_MODELS[name][0](vocab_size=len(VOCAB), context_length=CONTEXT, **fields)
        model = build_language_model(name, cfg).eval()
        save_model(root / LM_DIR / name / "model.pt", name, cfg, model, meta={"vocab_digest": vocab_digest(VOCAB)})
        test, cpu = streams["test"], torch.device("cpu")
        with torch.no_grad():
            results = {  # what lm@NAME reports: the stage's own scorers, batched
                "test_perplexity": sentence_perplexity(model, test, CONTEXT, 4, cpu),
                "test_perplexity_stream": perplexity(model, test, CONTEXT, 4, cpu),
                "parameters": float(sum(p.numel() for p in model.parameters())),
            }
        (root / METRICS_DIR / "lm").mkdir(parents=True, exist_ok=True)
        (root / METRICS_DIR / "lm" / f"{name}.json").write_text(json.dumps(results))
    return root


def inputs(replicates: list[int] | None = None) -> LMCompareInputs:
    return LMCompareInputs(
        BootstrapConfig(resamples=200),
        NgramConfig(order=3),
        LMEvalConfig(4, 0, 1, 1.0, 1),
        ReplicatesConfig(lm=replicates or [], detector=[], diffusion=[]),
    )


def run_stage(root: Path, replicates: list[int] | None = None) -> dict[str, float]:
    return lm_compare_task.fn(StageContext(root, "", 7, "cpu", NoRun()), inputs(replicates))


def test_the_stage_writes_intervals_around_the_reported_perplexities(project):
    metrics = run_stage(project)
    written = json.loads((project / METRICS_DIR / "lm_compare.json").read_text())
    assert written.pop("test_perplexity_by_seed") == {
        m: {"7": metrics[f"{m}_test_perplexity"]} for m in LANGUAGE_MODELS
    }
    assert metrics == written
    models = ["unigram", "kn2", "kn3", *LANGUAGE_MODELS]
    ngram = json.loads((project / METRICS_DIR / "ngram.json").read_text())["test_perplexity_by_order"]
    for model in models:
        point = metrics[f"{model}_test_perplexity"]
        assert metrics[f"{model}_test_perplexity_ci_low"] < point < metrics[f"{model}_test_perplexity_ci_high"]
    assert metrics["kn3_test_perplexity"] == ngram["3"]  # the point estimates are the stages' own numbers
    table = pd.read_csv(project / PLOTS_DIR / "lm_compare.csv")
    assert table.columns.tolist() == [
        "model",
        "family",
        "test_perplexity",
        "test_perplexity_stream",
        "parameters",
        "test_perplexity_ci_low",
        "test_perplexity_ci_high",
        "seeds",
        "test_perplexity_seed_mean",
        "test_perplexity_seed_ci_low",
        "test_perplexity_seed_ci_high",
    ]
    assert table["model"].tolist() == models
    assert (table["seeds"] == 1).all() and "lstm_test_perplexity_seed_mean" not in metrics  # no replicates
    assert pairs_of(project)["seed_separated"].isna().all()  # seed variance unknown: nothing to consult
    pairs = pd.read_csv(project / PLOTS_DIR / "lm_compare_pairs.csv")
    assert len(pairs) >= len(models) - 1
    ranked = table.sort_values("test_perplexity")["model"].tolist()
    adjacent = set(zip(ranked, ranked[1:]))
    assert adjacent <= set(zip(pairs["better"], pairs["worse"]))
    assert {frozenset(("kn3", m)) for m in LANGUAGE_MODELS} <= {
        frozenset(p) for p in zip(pairs["better"], pairs["worse"])
    }
    assert (pairs["log_perplexity_difference"] >= 0).all()  # worse minus better, at the point estimates
    assert (pairs["significant"] == ~((pairs["ci_low"] <= 0) & (0 <= pairs["ci_high"]))).all()
    assert pairs.loc[pairs["worse"] == "unigram", "significant"].all()  # far worse than its neighbour
    assert run_stage(project) == metrics  # seeded: the same resamples again


def pairs_of(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / PLOTS_DIR / "lm_compare_pairs.csv")


def test_replicates_pool_with_the_main_stage_into_a_t_interval_over_seeds(project):
    """Replicates 1 and 2 (their metrics as lm_replicate@NAME-R writes them) pool with the main stage: the mean
    and Student-t interval over three seeds, scipy side by side; the n-gram rows stay deterministic points."""
    from scipy import stats

    lm_dir = project / METRICS_DIR / "lm"
    main = {name: json.loads((lm_dir / f"{name}.json").read_text()) for name in LANGUAGE_MODELS}
    factors = {1: 1.3, 2: 0.9}  # replicate -> its test perplexity relative to the main stage's
    written = []
    try:
        for name in LANGUAGE_MODELS:
            for r, f in factors.items():
                path = lm_dir / f"{name}-{r}.json"
                path.write_text(json.dumps({**main[name], "test_perplexity": main[name]["test_perplexity"] * f}))
                written.append(path)
        metrics = run_stage(project, replicates=[1, 2])
    finally:
        for path in written:
            path.unlink()
    for name in LANGUAGE_MODELS:
        values = [main[name]["test_perplexity"] * f for f in (1.0, *factors.values())]
        low, high = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
        got = [metrics[f"{name}_test_perplexity_seed_{k}"] for k in ("mean", "ci_low", "ci_high")]
        assert got == pytest.approx([np.mean(values), low, high])
        assert metrics[f"{name}_test_perplexity"] == main[name]["test_perplexity"]  # the headline stays seed 7's
    by_seed = json.loads((project / METRICS_DIR / "lm_compare.json").read_text())["test_perplexity_by_seed"]
    assert list(by_seed["lstm"]) == ["7", "8", "9"]  # runtime.seed, then + 1 and + 2
    table = pd.read_csv(project / PLOTS_DIR / "lm_compare.csv").set_index("model")
    assert (
        table.loc["kn3", "seeds"] == 1
        and table.loc["kn3", "test_perplexity_seed_ci_low"] == table.loc["kn3", "test_perplexity"]
    )
    seeds_plot = pd.read_csv(project / PLOTS_DIR / "lm_seeds.csv")
    assert seeds_plot["model"].tolist() == list(LANGUAGE_MODELS) and (seeds_plot["seeds"] == 3).all()
    # +30 % / -10 % spreads overlap for every pair of these untrained models: no pair is separated over seeds
    pairs = pairs_of(project)
    neural_pairs = pairs[pairs["better"].isin(LANGUAGE_MODELS) & pairs["worse"].isin(LANGUAGE_MODELS)]
    assert len(neural_pairs) and not neural_pairs["seed_separated"].astype(bool).any()


def test_a_missing_replicate_names_its_metrics_file(project):
    with pytest.raises(FileNotFoundError, match=r"lm/(lstm|transformer|s4d|mamba)-1\.json: missing"):
        run_stage(project, replicates=[1])


def test_a_model_whose_metrics_are_not_its_own_fails_loudly(project, tmp_path):
    path = project / METRICS_DIR / "lm" / "s4d.json"
    good = path.read_text()
    try:
        path.write_text(
            json.dumps({**json.loads(good), "test_perplexity": json.loads(good)["test_perplexity"] * 1.001})
        )
        with pytest.raises(StaleArtefact, match=r"lm/s4d\.json.*dvc repro lm@s4d"):
            run_stage(project)
    finally:
        path.write_text(good)


def scores(*nll: list[float], tokens=(3, 5, 2, 7, 4, 6)) -> dict[str, SentenceScores]:
    return {f"m{i}": SentenceScores(np.asarray(v, dtype=float), np.asarray(tokens)) for i, v in enumerate(nll)}


def table_of(s: dict[str, SentenceScores]) -> pd.DataFrame:
    neural = {
        name: {"test_perplexity": v.perplexity, "test_perplexity_stream": 0.0, "parameters": 1.0}
        for name, v in s.items()
    }
    return compare_table({"test_perplexity_by_order": {}}, neural)


def test_identical_models_are_not_significant_and_a_uniformly_worse_one_is():
    base = [3.0, 9.0, 2.5, 12.0, 6.0, 11.0]
    s = scores(base, base, [v + 0.5 for v in base])
    _, pairs = bootstrap_tables(table_of(s), s, BootstrapConfig(resamples=500), seed=0)
    same = pairs[pairs["pair"] == "m1 vs m0"].iloc[0]
    assert (same["log_perplexity_difference"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    assert not same["significant"]
    worse = pairs[pairs["worse"] == "m2"].iloc[0]
    assert worse["ci_low"] > 0 and worse["significant"]


def test_pairs_are_the_ranking_neighbours_and_the_top_order_against_each_neural_lm():
    table = pd.DataFrame(
        {
            "model": ["unigram", "kn2", "kn3", "lstm", "mamba"],
            "family": ["ngram", "ngram", "ngram", "neural", "neural"],
            "test_perplexity": [90.0, 20.0, 15.0, 14.0, 25.0],
        }
    )
    assert comparison_pairs(table) == [
        ("lstm", "kn3", "adjacent in the ranking; kn3 against the neural LMs"),
        ("kn3", "kn2", "adjacent in the ranking"),
        ("kn2", "mamba", "adjacent in the ranking"),
        ("mamba", "unigram", "adjacent in the ranking"),
        ("kn3", "mamba", "kn3 against the neural LMs"),
    ]
