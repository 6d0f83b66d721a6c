"""`lm_compare`: every language model's test perplexity in one table (read from the stages' metrics).

`test_perplexity`, the headline, is like for like: every model scores each test sentence with the context
from its `<s>` only, as the Kneser-Ney model does. `test_perplexity_stream` (neural LMs only; empty for the
n-gram rows) is the neural score with sliding windows over the continuous stream, across sentence boundaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.text.language_models import (
    LANGUAGE_MODELS,
)
from tasks.io import atomic_path, write_json
from tasks.layout import METRICS_DIR, PLOTS_DIR
from tasks.spec import NoInputs, StageContext, StageSpec

LM_NAMES = tuple(LANGUAGE_MODELS)


def compare_table(ngram_metrics: dict, lm_metrics: dict[str, dict]) -> pd.DataFrame:
    """One row per model: unigram and every KN order, then the neural LMs; test perplexity with the context
    from each sentence's `<s>` (all models) and with stream context (neural LMs; NaN for the n-gram rows)."""
    rows = [
        {"model": "unigram" if n == "1" else f"kn{n}", "family": "ngram", "test_perplexity": ppl}
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


def compare_figure(table: pd.DataFrame):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    colors = ["#8c8c8c" if f == "ngram" else "#2a6fbb" for f in table["family"]]
    ax.bar(table["model"], table["test_perplexity"], color=colors)
    for x, value in enumerate(table["test_perplexity"]):
        ax.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="test perplexity (lower is better)", title="Language models, each test sentence from its <s>")
    ax.set_yscale("log")
    fig.tight_layout()
    return fig


@task(name="lm_compare", cache_policy=NO_CACHE)
def lm_compare_task(ctx: StageContext, inputs: NoInputs) -> dict[str, float]:
    root, run = ctx.root, ctx.run

    def read(path: Path) -> dict:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run its stage first")
        return json.loads(path.read_text())

    ngram = read(root / METRICS_DIR / "ngram.json")
    neural = {name: read(root / METRICS_DIR / "lm" / f"{name}.json") for name in LM_NAMES}
    table = compare_table(ngram, neural)
    metrics = {f"{row.model}_test_perplexity": float(row.test_perplexity) for row in table.itertuples()}
    metrics |= {
        f"{row.model}_test_perplexity_stream": float(row.test_perplexity_stream)
        for row in table.itertuples()
        if row.family == "neural"
    }
    write_json(root / METRICS_DIR / "lm_compare.json", metrics)
    with atomic_path(root / PLOTS_DIR / "lm_compare.csv") as tmp:
        table.to_csv(tmp, index=False)
    run.log_metrics(metrics)
    run.log_figure(compare_figure(table), "plots/lm_compare.png")
    run.log_artifact(root / PLOTS_DIR / "lm_compare.csv", "plots")
    print(table.to_string(index=False))
    return metrics


SPEC = StageSpec(name="lm_compare", family="text", task=lm_compare_task, seeded=False)
