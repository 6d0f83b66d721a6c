"""`ngram`: count orders 1..N of the corpus, estimate modified Kneser-Ney (models/text/ngram.py), write ARPA."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.text import ngram as kn
from models.text.tokenizer import BOS_ID
from tasks.io import atomic_path, write_json
from tasks.layout import CORPUS_DIR, METRICS_DIR, NGRAM_DIR, PLOTS_DIR
from tasks.phases import in_phase
from tasks.spec import StageContext, StageSpec
from tasks.text.corpus import read_stream, read_vocab, vocab_digest
from tasks.threads import current as stage_threads

VOCAB_DIGEST_FILE = "vocab_digest.txt"  # beside model.arpa: the corpus vocabulary it was estimated on
# model_<n>.parquet beside model.arpa: the same model as tables (kn.model_tables), which `kiln score` reads in a
# fraction of the ARPA parse's time. ARPA_BYTES_KEY in order 1's schema metadata ties them to that model.arpa.
MODEL_TABLE = "model_{n}.parquet"
ARPA_BYTES_KEY = b"kiln.arpa_bytes"


@in_phase("io")
def write_model_tables(model: kn.BackoffModel, vocab: list[str], out_dir: Path, arpa_bytes: int) -> None:
    """`model_<n>.parquet` for n = 1..N into `out_dir` (a directory being written atomically)."""
    import pyarrow.parquet as pq

    for n, table in enumerate(kn.model_tables(model, vocab), start=1):
        if n == 1:
            table = table.replace_schema_metadata({ARPA_BYTES_KEY: str(arpa_bytes).encode()})
        pq.write_table(table, out_dir / MODEL_TABLE.format(n=n))


@dataclass(frozen=True)
class NgramFit:
    counts: kn.NgramCounts
    model: kn.KneserNey  # the order-N model, written as ARPA
    test_perplexity: dict[int, float]  # order n -> test perplexity of the order-n model
    test_tokens: int

    def metrics(self) -> dict[str, float]:
        top = self.counts.order
        out = {"test_perplexity": self.test_perplexity[top], "test_tokens": float(self.test_tokens)}
        for n, ppl in self.test_perplexity.items():
            out[f"test_perplexity_order{n}"] = ppl
            out[f"ngram_types_order{n}"] = float(len(self.counts.keys[n - 1]))
        for n, (d1, d2, d3) in enumerate(self.model.discounts, start=1):
            out.update({f"D1_order{n}": d1, f"D2_order{n}": d2, f"D3plus_order{n}": d3})
        return out


@in_phase("training")
def fit_ngram(train: np.ndarray, test: np.ndarray, vocab_size: int, cfg: kn.NgramConfig, threads: int = 1) -> NgramFit:
    """Count orders 1..N once (on `threads` threads); estimate a KN model of every order n <= N and score
    the test stream."""
    counts = kn.count_ngrams(train, vocab_size, cfg.order, threads=threads)
    perplexity: dict[int, float] = {}
    model = None
    for n in range(1, cfg.order + 1):
        model = kn.estimate_kneser_ney(counts, replace(cfg, order=n))
        perplexity[n] = kn.score_stream(model.model, test).perplexity
    assert model is not None  # order >= 1 by NgramConfig's validation
    return NgramFit(counts, model, perplexity, int(np.count_nonzero(test != BOS_ID)))


def perplexity_figure(fit: NgramFit):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orders = list(fit.test_perplexity)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(orders, [fit.test_perplexity[n] for n in orders], marker="o")
    ax.set(xlabel="order", ylabel="test perplexity", xticks=orders, title="Kneser-Ney test perplexity by order")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class NgramInputs:
    ngram: kn.NgramConfig


@task(name="ngram", cache_policy=NO_CACHE)
def ngram_task(ctx: StageContext, inputs: NgramInputs) -> dict[str, float]:
    root, cfg, run = ctx.root, inputs.ngram, ctx.run
    corpus_dir, out_dir = root / CORPUS_DIR, root / NGRAM_DIR
    vocab = read_vocab(corpus_dir)
    train, test = read_stream(corpus_dir, "train"), read_stream(corpus_dir, "test")
    run.log_input(
        pd.DataFrame({"token_id": train}),
        source=str(corpus_dir / "train.parquet"),
        name="corpus-train",
        context="train",
    )
    run.log_input(
        pd.DataFrame({"token_id": test}), source=str(corpus_dir / "test.parquet"), name="corpus-test", context="test"
    )

    cores = stage_threads()  # this stage's share of the cores (tasks/threads.py)
    fit = fit_ngram(train, test, len(vocab), cfg, threads=cores)
    for warning in fit.model.warnings:
        print(f"warning: {warning}")

    with atomic_path(out_dir, directory=True) as tmp:
        for n in range(1, cfg.order + 1):
            kn.counts_frame(fit.counts, n).to_parquet(tmp / f"counts_{n}.parquet", index=False)
        with open(tmp / "model.arpa", "wb") as arpa:
            for chunk in kn.arpa_chunks(fit.model.model, vocab, threads=cores):
                arpa.write(chunk)
        write_model_tables(fit.model.model, vocab, tmp, (tmp / "model.arpa").stat().st_size)
        (tmp / VOCAB_DIGEST_FILE).write_text(vocab_digest(vocab) + "\n", encoding="utf-8")

    metrics = fit.metrics()
    write_json(
        root / METRICS_DIR / "ngram.json",
        {
            "order": cfg.order,
            "test_perplexity": fit.test_perplexity[cfg.order],
            "test_perplexity_by_order": {str(n): p for n, p in fit.test_perplexity.items()},
            "ngram_types_by_order": {str(n): len(k) for n, k in enumerate(fit.counts.keys, start=1)},
            "discounts_by_order": {str(n): list(map(float, d)) for n, d in enumerate(fit.model.discounts, start=1)},
            "discount_fallback_orders": [w.split(":")[0] for w in fit.model.warnings],
            "test_tokens": fit.test_tokens,
        },
    )
    curve = pd.DataFrame(
        {
            "order": list(fit.test_perplexity),
            "test_perplexity": list(fit.test_perplexity.values()),
            "ngram_types": [len(k) for k in fit.counts.keys],
        }
    )
    with atomic_path(root / PLOTS_DIR / "ngram_perplexity.csv") as tmp:
        curve.to_csv(tmp, index=False)

    run.log_metrics(metrics)
    run.log_metric_series("test_perplexity_by_order", fit.test_perplexity)
    run.log_metric_series("ngram_types_by_order", {n: len(k) for n, k in enumerate(fit.counts.keys, start=1)})
    run.log_figure(perplexity_figure(fit), "plots/ngram_perplexity.png")
    run.log_artifact(root / PLOTS_DIR / "ngram_perplexity.csv", "plots")
    run.log_artifact(out_dir / "model.arpa", "model")
    if fit.model.warnings:
        run.log_text("\n".join(fit.model.warnings) + "\n", "discount_fallback_warnings.txt")
    return metrics


SPEC = StageSpec(name="ngram", family="text", task=ngram_task, inputs=NgramInputs, seeded=False)
