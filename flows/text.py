"""Text family flows: `corpus` and `ngram`. Each wires one stage: params -> task -> MLflow run."""

from __future__ import annotations

from prefect import flow

from tasks.stage import open_stage
from tasks.text import corpus_task, ngram_task


@flow(name="corpus", log_prints=True)
def corpus_flow() -> dict[str, float]:
    with open_stage("corpus", family="text", sections=["corpus"]) as stage:
        return corpus_task(stage.env.root, stage.configs["corpus"], stage.run)


@flow(name="ngram", log_prints=True)
def ngram_flow() -> dict[str, float]:
    with open_stage("ngram", family="text", sections=["ngram"]) as stage:
        return ngram_task(stage.env.root, stage.configs["ngram"], stage.run)
