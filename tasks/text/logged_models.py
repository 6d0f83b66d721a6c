"""The language models as MLflow models: `lm@*` and `ngram` logged to their stage's run and registered as
`kiln-lm-<name>` (alias `newest`), each a pyfunc that scores sentences the way `kiln score` does.

Not part of any stage's computation: `tasks/model_logging.py` calls `log_language_model` after the stage's
task returned, with its open run, and the stages' task modules never import this one (so editing it stales
no DVC stage). The scoring is `tasks/text/scoring.py`'s, so the registry and `kiln score` cannot disagree.

Input: a DataFrame with one string column `sentence`, one sentence per row (tokenised with the corpus
rules, wrapped as `<s> ... </s>`). Output, one row per input row in the same order: `log10_prob` (the
sentence's log10 probability, `</s>` included, `<s>` not predicted), `perplexity` (per predicted token),
`tokens` (predicted tokens, `</s>` included) and `unknown_tokens` (words scored as `<unk>`).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from tasks.layout import CORPUS_DIR, LM_DIR, NGRAM_DIR
from tasks.spec import StageContext
from tasks.tracking import pinned_requirements

REGISTERED_PREFIX = "kiln-lm-"
EXAMPLE_SENTENCES = 3  # test sentences in the input example
EXAMPLE_MAX_WORDS = 20


def scores_frame(scores: list) -> pd.DataFrame:
    """`SentenceScore`s (tasks/text/scoring.py) as the pyfunc's output frame, in input order."""
    return pd.DataFrame(
        {
            "sentence": [s.sentence for s in scores],
            "log10_prob": [float(s.log10_prob) for s in scores],
            "perplexity": [float(s.perplexity) for s in scores],
            "tokens": [len(s.tokens) for s in scores],
            "unknown_tokens": [int(sum(s.unknown)) for s in scores],
        }
    )


def artifact_layout(model: str) -> dict[str, str]:
    """Artifact key -> where `tasks/text/scoring.py` reads it, relative to a project root."""
    vocab = {"vocab": f"{CORPUS_DIR}/vocab.parquet"}
    if model == "ngram":
        return {"ngram": NGRAM_DIR, **vocab}  # the folder: model.arpa and what the scorer reads beside it
    return {"weights": f"{LM_DIR}/{model}/model.pt", **vocab}


class SentenceScorer(mlflow.pyfunc.PythonModel):
    """Scores sentences with one trained language model (`ngram`, `lstm`, ...), as `kiln score` does."""

    def __init__(self, model: str):
        self.model = model
        self.root: Path | None = None

    def load_context(self, context) -> None:
        # The scorers read a project's layout, so the artifacts are linked into a small project root.
        root = Path(tempfile.mkdtemp(prefix="kiln-lm-model-"))
        weakref.finalize(self, shutil.rmtree, root, True)
        for key, rel in artifact_layout(self.model).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).symlink_to(Path(context.artifacts[key]).resolve())
        self.root = root

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        from tasks.text.scoring import SCORERS

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        sentences = [str(s) for s in frame["sentence"]]
        assert self.root is not None, "load_context was not called"
        return scores_frame(SCORERS[self.model](self.root, sentences))


def example_sentences(root: Path) -> list[str]:
    """The first test sentences of the corpus, as words (a real input: what the models were scored on)."""
    from models.text.tokenizer import BOS_ID, EOS_ID
    from tasks.text.corpus import read_stream, read_vocab

    vocab = read_vocab(root / CORPUS_DIR)
    stream = read_stream(root / CORPUS_DIR, "test")
    sentences, words = [], []
    for token in stream.tolist():
        if token == BOS_ID:
            words = []
        elif token == EOS_ID:
            if words:
                sentences.append(" ".join(words[:EXAMPLE_MAX_WORDS]))
            if len(sentences) == EXAMPLE_SENTENCES:
                break
        else:
            words.append(vocab[token])
    return sentences


def model_description(model: str) -> str:
    what = (
        "the Kneser-Ney n-gram model (`ngram` stage, models/text/ngram.py)"
        if model == "ngram"
        else f"the neural language model `{model}` (`lm@{model}` stage, models/text/{model}.py)"
    )
    return (
        f"Kiln: {what}, as a pyfunc that scores sentences the way `kiln score --model {model}` does. "
        "Input: a DataFrame with a string column `sentence`, one sentence per row (tokenised with the corpus "
        "rules, scored as `<s> ... </s>`; words outside the vocabulary count as `<unk>`). Output per row: "
        "`log10_prob` (`</s>` included), `perplexity` (per predicted token), `tokens` and `unknown_tokens`. "
        "Loads in the Kiln environment (the pyfunc's class is tasks/text/logged_models.py). "
        "Alias `newest` follows the last registered version."
    )


def headline(stage: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    keys = ("test_perplexity", "test_perplexity_stream", "val_perplexity_final", "parameters")
    return {k: float(metrics[k]) for k in keys if k in metrics}


def log_language_model(ctx: StageContext, stage: str, metrics: Mapping[str, Any]) -> str:
    """Log the trained model of `ngram` or `lm@<item>` to its stage's run and register it; returns
    `<registered name>@newest`."""
    import mlflow
    from mlflow.models import infer_signature

    from tasks.text.scoring import SCORERS

    model = ctx.item or "ngram"
    run = ctx.run
    root = ctx.root
    registered = f"{REGISTERED_PREFIX}{model}"
    sentences = example_sentences(root)
    example = pd.DataFrame({"sentence": sentences})
    output = scores_frame(SCORERS[model](root, sentences))
    run_tags = run.client.get_run(run.run_id).data.tags
    figures = headline(stage, metrics)
    tags = {
        "kiln.stage": stage,
        "kiln.language_model": model,
        "kiln.profile": run_tags.get("kiln.profile", ""),
        "mlflow.source.git.commit": run_tags.get("mlflow.source.git.commit", ""),
        **{f"kiln.{k}": f"{v:.6g}" for k, v in figures.items()},
    }
    description = model_description(model)
    info = run.log_model(
        mlflow.pyfunc,
        f"lm-{model}",
        tags=tags,
        python_model=SentenceScorer(model),
        artifacts={key: str(root / rel) for key, rel in artifact_layout(model).items()},
        signature=infer_signature(example, output),
        input_example=example,
        registered_model_name=registered,
        # Explicit, so MLflow does not load the model in a subprocess to infer them.
        pip_requirements=pinned_requirements("mlflow", "torch", "numpy", "pandas", "pyarrow", "prefect"),
        metadata={"description": description},
    )
    version = str(info.registered_model_version)
    client = run.client
    client.update_registered_model(registered, description=description)
    scored = ", ".join(f"{k} {v:.6g}" for k, v in figures.items())
    client.update_model_version(
        registered,
        version,
        description=f"{description}\n\nFrom run {run.run_id} (stage `{stage}`, profile {tags['kiln.profile']}, "
        f"commit {tags['mlflow.source.git.commit']}): {scored}.",
    )
    for key, value in tags.items():
        client.set_model_version_tag(registered, version, key, value)
    client.set_registered_model_tag(registered, "kiln.language_model", model)
    client.set_registered_model_alias(registered, "newest", version)
    run.set_tags({f"registered_model.{model}": f"{registered}@newest (version {version})"})
    return f"{registered}@newest"
