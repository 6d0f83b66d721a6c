"""`lm_compare`: every language model's test perplexity in one table, with paired bootstrap intervals.

`test_perplexity`, the headline, is like for like: every model scores each test sentence with the context
from its `<s>` only, as the Kneser-Ney model does. `test_perplexity_stream` (neural LMs only; empty for the
n-gram rows) is the neural score with sliding windows over the continuous stream, across sentence boundaries.

The intervals come from the per-sentence scores the headline is made of. The stage does not retrain: it
loads the trained models (the n-gram counts, re-estimated order by order as `ngram` does; the neural LMs'
model.pt) and scores every test sentence alone with the stages' own functions (`kn.score_stream`,
`sentence_nll`). The sums of those scores must give each stage's reported `test_perplexity` (to
`POINT_RTOL`), or the stage fails: an interval is only shown around the number it belongs to. The test
sentences are then resampled with replacement, the same resamples for every model (models/bootstrap.py),
for each model's percentile interval and for the interval of the difference in log-perplexity of the pairs
the report ranks. Those intervals cover the choice of test sentences, not training-seed variance.

Training-seed variance comes from the replicates (`lm_replicate@<model>-<r>`, seeds runtime.seed + r for r in
`replicates.lm`): each neural LM's `test_perplexity` over its seeds, the main stage's first, as a mean with a
95 % Student-t interval (models/seeds.py). The Kneser-Ney estimate is deterministic, a point. A pair is
`seed_separated` when its two seed intervals are apart; the report ranks a pair only when the paired
bootstrap and the seeds both say so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.bootstrap import BootstrapConfig, interval, percentile_interval, ratio_resamples, resample_indices
from models.seeds import SeedSummary, seed_summary, separated
from models.text import ngram as kn
from models.text.language_models import LANGUAGE_MODELS
from models.text.tokenizer import sentence_bounds
from tasks.errors import StaleArtefact, rerun_hint
from tasks.io import atomic_path, write_json
from tasks.layout import CORPUS_DIR, LM_DIR, METRICS_DIR, NGRAM_DIR, PLOTS_DIR
from tasks.phases import in_phase
from tasks.spec import ReplicatesConfig, StageContext, StageSpec, replicate_name
from tasks.text.corpus import read_stream, read_vocab
from tasks.text.lm import LMEvalConfig, load_language_model_with_meta, sentence_nll
from tasks.text.ngram import VOCAB_DIGEST_FILE
from tasks.text.scoring import check_vocab_digest
from tasks.training import resolve_device

LM_NAMES = tuple(LANGUAGE_MODELS)
# The per-sentence sums against the stages' own test_perplexity: the neural LMs score each sentence in its own
# forward here and in length-sorted batches in the stage, which moves float32 logits by ~1e-7 relative.
POINT_RTOL = 1e-6


def ngram_label(order: int) -> str:
    return "unigram" if order == 1 else f"kn{order}"


# ----------------------------------------------------------------------------------- per-sentence scores


@dataclass(frozen=True)
class SentenceScores:
    """One model's score of every test sentence: natural-log NLL and tokens counted (every token but `<s>`)."""

    nll: np.ndarray  # (S,) float64
    tokens: np.ndarray  # (S,) int64

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.sum() / self.tokens.sum())


def sentence_tokens(test: np.ndarray) -> np.ndarray:
    """(S,) tokens each test sentence counts: all but its `<s>`."""
    starts, ends = sentence_bounds(np.asarray(test))
    return (ends - starts - 1).astype(np.int64)


def ngram_sentence_scores(counts: kn.NgramCounts, cfg: kn.NgramConfig, test: np.ndarray) -> dict[int, SentenceScores]:
    """Order n -> the order-n Kneser-Ney model's per-sentence scores. Each order is estimated from the counts
    on its own, as `fit_ngram` does (a lower order of the order-N model is not the order-n model: KN's top
    order uses raw counts, the others continuation counts)."""
    tokens = sentence_tokens(test)
    out = {}
    for n in range(1, counts.order + 1):
        model = kn.estimate_kneser_ney(counts, replace(cfg, order=n))
        log10 = kn.score_stream(model.model, test).sentence_log10  # (S,)
        out[n] = SentenceScores(-log10 * math.log(10.0), tokens)
    return out


def neural_sentence_scores(
    model: torch.nn.Module, test: np.ndarray, context: int, batch_size: int, device: torch.device
) -> SentenceScores:
    """The LM's per-sentence scores: `sentence_nll`, the stage's headline scorer, on one sentence at a time."""
    starts, ends = sentence_bounds(np.asarray(test))
    scored = [sentence_nll(model, test[a:b], context, batch_size, device) for a, b in zip(starts, ends)]
    return SentenceScores(np.array([s[0] for s in scored]), np.array([s[1] for s in scored], dtype=np.int64))


def check_point(name: str, scores: SentenceScores, reported: float, stage: str, metrics_path: str) -> None:
    """Refuse per-sentence scores whose total is not the stage's reported test perplexity."""
    ours = scores.perplexity
    if not abs(ours - reported) <= POINT_RTOL * abs(reported):
        raise StaleArtefact(
            f"{metrics_path}: {name}'s test_perplexity is {reported!r}, but its trained model scores the test "
            f"sentences to {ours!r} (relative difference {abs(ours - reported) / abs(reported):.2e} > "
            f"{POINT_RTOL:g}): the model and its metrics are not from one run of the current corpus; "
            + rerun_hint(stage)
        )


# ---------------------------------------------------------------------------------------- the tables


def compare_table(ngram_metrics: dict, lm_metrics: dict[str, dict]) -> pd.DataFrame:
    """One row per model: unigram and every KN order, then the neural LMs; test perplexity with the context
    from each sentence's `<s>` (all models) and with stream context (neural LMs; NaN for the n-gram rows)."""
    rows = [
        {"model": ngram_label(int(n)), "family": "ngram", "test_perplexity": ppl}
        for n, ppl in sorted(ngram_metrics["test_perplexity_by_order"].items(), key=lambda kv: int(kv[0]))
    ]
    rows += [
        {
            "model": name,
            "family": "neural",
            "test_perplexity": m["test_perplexity"],
            "test_perplexity_stream": m["test_perplexity_stream"],
            "parameters": m["parameters"],
        }
        for name, m in lm_metrics.items()
    ]
    columns = ["model", "family", "test_perplexity", "test_perplexity_stream", "parameters"]
    return pd.DataFrame(rows, columns=columns)


def comparison_pairs(table: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(better, worse, why) at the point estimates: the neighbours of the ranking, then the largest KN order
    against each neural LM (docs/text.md compares them); each pair once."""
    ranked = table.sort_values("test_perplexity", kind="stable")["model"].tolist()
    ppl = dict(zip(table["model"], table["test_perplexity"]))
    why: dict[tuple[str, str], list[str]] = {}
    for a, b in zip(ranked, ranked[1:]):
        why.setdefault((a, b), []).append("adjacent in the ranking")
    ngram = table[table["family"] == "ngram"]["model"].tolist()
    if ngram:
        top = ngram[-1]  # the rows run unigram, kn2, ..., knN
        for name in table[table["family"] == "neural"]["model"]:
            a, b = sorted((top, name), key=lambda m: (ppl[m], ranked.index(m)))
            why.setdefault((a, b), []).append(f"{top} against the neural LMs")
    return [(a, b, "; ".join(reasons)) for (a, b), reasons in why.items()]


@in_phase("scoring")
def bootstrap_tables(
    table: pd.DataFrame, scores: dict[str, SentenceScores], cfg: BootstrapConfig, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`table` with each model's percentile interval of test perplexity, and the pairs' table: the paired
    interval of the difference in log-perplexity (worse minus better; 0 inside it: not significant)."""
    names = table["model"].tolist()
    tokens = scores[names[0]].tokens
    for name in names:
        if not np.array_equal(scores[name].tokens, tokens):  # the project's one accounting
            raise ValueError(f"{name} counts other test tokens than {names[0]}")
    nll = np.stack([scores[name].nll for name in names])  # (M, S)
    idx = resample_indices(len(tokens), cfg.resamples, seed)  # (B, S): the same resamples for every model
    low, high = percentile_interval(np.exp(ratio_resamples(nll, tokens, idx)), cfg.level)  # (M,) each
    table = table.assign(test_perplexity_ci_low=low, test_perplexity_ci_high=high)
    rows = []
    for better, worse, why in comparison_pairs(table):
        d = scores[worse].nll - scores[better].nll  # (S,)
        diff = interval(d.sum() / tokens.sum(), ratio_resamples(d, tokens, idx), cfg.level)
        rows.append(
            {
                "pair": f"{worse} vs {better}",
                "better": better,
                "worse": worse,
                "log_perplexity_difference": diff.point,
                "ci_low": diff.low,
                "ci_high": diff.high,
                "significant": diff.significant,
                "why": why,
            }
        )
    return table, pd.DataFrame(rows)


def seed_summaries(table: pd.DataFrame, replicates: dict[str, list[dict]]) -> dict[str, SeedSummary]:
    """Model -> its test perplexity over seeds: the neural LMs' main stage and replicates' metrics
    (`replicates[name]`), the n-gram rows as deterministic points."""
    out = {}
    for row in table.itertuples():
        if row.family == "ngram":
            out[row.model] = seed_summary([row.test_perplexity], deterministic=True)
        else:
            values = [row.test_perplexity] + [m["test_perplexity"] for m in replicates[row.model]]
            out[row.model] = seed_summary(values)
    return out


def add_seed_columns(
    table: pd.DataFrame, pairs: pd.DataFrame, seeds: dict[str, SeedSummary]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The table with `seeds` and `test_perplexity_seed_mean/_ci_low/_ci_high`, the pairs with `seed_separated`
    (None: a side has one seed of a seeded model, so seed variance is unknown)."""
    s = [seeds[m] for m in table["model"]]
    table = table.assign(
        seeds=[x.n for x in s],
        test_perplexity_seed_mean=[x.mean for x in s],
        test_perplexity_seed_ci_low=[x.low for x in s],
        test_perplexity_seed_ci_high=[x.high for x in s],
    )
    pairs = pairs.assign(seed_separated=[separated(seeds[p.better], seeds[p.worse]) for p in pairs.itertuples()])
    return table, pairs


def compare_figure(table: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    colors = ["#8c8c8c" if f == "ngram" else "#2a6fbb" for f in table["family"]]
    ppl = table["test_perplexity"].to_numpy()
    err = None
    if "test_perplexity_ci_low" in table:
        err = np.stack([ppl - table["test_perplexity_ci_low"], table["test_perplexity_ci_high"] - ppl])
    ax.bar(table["model"], ppl, color=colors, yerr=err, capsize=3)
    for x, value in enumerate(ppl):
        ax.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom", fontsize=8)
    ax.set(
        ylabel="test perplexity (lower is better)",
        title="Language models, each test sentence from its <s> (95 % bootstrap interval)",
    )
    ax.set_yscale("log")
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class LMCompareInputs:
    lm_compare: BootstrapConfig
    ngram: kn.NgramConfig  # to re-estimate every order from the counts exactly as `ngram` did
    lm_eval: LMEvalConfig  # the batch size the stages score with
    replicates: ReplicatesConfig  # which lm_replicate@* metrics to pool with the main stages'


def read_metrics(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run its stage first")
    return json.loads(path.read_text())


@in_phase("evaluation")
def sentence_scores(
    root: Path, inputs: LMCompareInputs, ngram: dict, neural: dict[str, dict], device: torch.device
) -> dict[str, SentenceScores]:
    """Every model's per-sentence test scores, each checked against its stage's reported test perplexity."""
    corpus_dir, ngram_dir = root / CORPUS_DIR, root / NGRAM_DIR
    vocab, test = read_vocab(corpus_dir), read_stream(corpus_dir, "test")
    digest = ngram_dir / VOCAB_DIGEST_FILE
    check_vocab_digest(
        root, ngram_dir / "model.arpa", digest.read_text().strip() if digest.is_file() else None, "ngram"
    )
    order = int(ngram["order"])  # the orders the stage reported (its params may have moved since)
    frames = [pd.read_parquet(ngram_dir / f"counts_{n}.parquet") for n in range(1, order + 1)]
    scores = {}
    for n, s in ngram_sentence_scores(kn.counts_from_frames(frames, len(vocab)), inputs.ngram, test).items():
        reported = ngram["test_perplexity_by_order"][str(n)]
        check_point(ngram_label(n), s, reported, "ngram", f"{METRICS_DIR}/ngram.json")
        scores[ngram_label(n)] = s
    for name in neural:
        path = root / LM_DIR / name / "model.pt"
        _, model, meta = load_language_model_with_meta(path, device)
        check_vocab_digest(root, path, meta.get("vocab_digest"), f"lm@{name}")
        s = neural_sentence_scores(model, test, model.cfg.context_length, inputs.lm_eval.batch_size, device)
        check_point(name, s, neural[name]["test_perplexity"], f"lm@{name}", f"{METRICS_DIR}/lm/{name}.json")
        scores[name] = s
    return scores


@task(name="lm_compare", cache_policy=NO_CACHE)
def lm_compare_task(ctx: StageContext, inputs: LMCompareInputs) -> dict[str, float]:
    root, run, cfg = ctx.root, ctx.run, inputs.lm_compare
    ngram = read_metrics(root / METRICS_DIR / "ngram.json")
    neural = {name: read_metrics(root / METRICS_DIR / "lm" / f"{name}.json") for name in LM_NAMES}
    replicates = {  # read first: a missing replicate fails before the scoring
        name: [
            read_metrics(root / METRICS_DIR / "lm" / f"{replicate_name(name, r)}.json") for r in inputs.replicates.lm
        ]
        for name in LM_NAMES
    }
    scores = sentence_scores(root, inputs, ngram, neural, resolve_device(ctx.device))
    table, pairs = bootstrap_tables(compare_table(ngram, neural), scores, cfg, ctx.seed)
    seeds = seed_summaries(table, replicates)
    table, pairs = add_seed_columns(table, pairs, seeds)
    seed_list = inputs.replicates.seeds("lm", ctx.seed)
    metrics: dict[str, float] = {}
    for row in table.itertuples():
        metrics[f"{row.model}_test_perplexity"] = float(row.test_perplexity)
        metrics[f"{row.model}_test_perplexity_ci_low"] = float(row.test_perplexity_ci_low)
        metrics[f"{row.model}_test_perplexity_ci_high"] = float(row.test_perplexity_ci_high)
        if row.family == "neural":
            metrics[f"{row.model}_test_perplexity_stream"] = float(row.test_perplexity_stream)
            metrics[f"{row.model}_seeds"] = float(row.seeds)
            if row.seeds > 1:  # one seed has no spread: no NaN goes into a metrics file
                metrics[f"{row.model}_test_perplexity_seed_mean"] = float(row.test_perplexity_seed_mean)
                metrics[f"{row.model}_test_perplexity_seed_ci_low"] = float(row.test_perplexity_seed_ci_low)
                metrics[f"{row.model}_test_perplexity_seed_ci_high"] = float(row.test_perplexity_seed_ci_high)
    by_seed = {name: {str(seed): v for seed, v in zip(seed_list, seeds[name].values)} for name in LM_NAMES}
    write_json(root / METRICS_DIR / "lm_compare.json", {**metrics, "test_perplexity_by_seed": by_seed})
    with atomic_path(root / PLOTS_DIR / "lm_compare.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(root / PLOTS_DIR / "lm_compare_pairs.csv") as tmp:
        pairs.to_csv(tmp, index=False)
    seed_columns = ["model", "seeds", *(f"test_perplexity_seed_{k}" for k in ("mean", "ci_low", "ci_high"))]
    with atomic_path(root / PLOTS_DIR / "lm_seeds.csv") as tmp:
        table[table["family"] == "neural"][seed_columns].to_csv(tmp, index=False)
    run.log_metrics(metrics)
    run.log_figure(compare_figure(table), "plots/lm_compare.png")
    run.log_artifact(root / PLOTS_DIR / "lm_compare.csv", "plots")
    run.log_artifact(root / PLOTS_DIR / "lm_compare_pairs.csv", "plots")
    run.log_artifact(root / PLOTS_DIR / "lm_seeds.csv", "plots")
    print(table.to_string(index=False))
    print(f"\npaired bootstrap over {len(scores[table['model'][0]].tokens)} test sentences, {cfg.resamples} resamples:")
    print(pairs.drop(columns="why").to_string(index=False))
    for name in LM_NAMES:
        sd = seeds[name]
        if sd.n > 1:
            print(f"{name} over {sd.n} seeds: {sd.mean:.2f} [{sd.low:.2f}, {sd.high:.2f}] ({sd.values})")
    return metrics


SPEC = StageSpec(name="lm_compare", family="text", task=lm_compare_task, inputs=LMCompareInputs)
