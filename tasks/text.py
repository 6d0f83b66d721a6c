"""Text family tasks: `corpus` (documents -> split token streams + vocabulary) and `ngram`
(counts, Kneser-Ney ARPA, perplexity per order).

Each stage is a typed compute function (no I/O) and a thin Prefect task that reads, computes, writes
atomically and logs through the one MLflow helper.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from models import ngram as kn
from models.tokenizer import BOS_ID, build_vocab, encode, tokenize_document
from tasks.config import CorpusConfig
from tasks.io import atomic_path, write_json
from tasks.layout import CORPUS_DIR, METRICS_DIR, NGRAM_DIR, PLOTS_DIR, SPLITS
from tasks.tracking import StageRun


class CorpusError(ValueError):
    """Unusable text: the message names the file (or source) at fault."""


# ------------------------------------------------------------------------------------ corpus


@dataclass(frozen=True)
class Document:
    name: str  # topic name, file path relative to the source, or "file.txt#paragraph"
    text: str


def read_documents(cfg: CorpusConfig, root: Path) -> tuple[list[Document], str]:
    """The documents of the configured source, in a deterministic order, and a name for the source."""
    if cfg.source == "builtin":
        from pydoc_data.topics import topics

        return [Document(name, topics[name]) for name in sorted(topics)], "pydoc_data.topics"
    source = Path(cfg.path) if Path(cfg.path).is_absolute() else root / cfg.path
    if source.is_dir():
        files = sorted(p for p in source.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"{source}: no .txt files in this folder")
        return [Document(str(f.relative_to(source)), _read_utf8(f)) for f in files], str(source)
    if source.is_file():
        # One file: its blank-line-separated paragraphs are the documents the split keeps whole.
        paragraphs = [p for p in _read_utf8(source).split("\n\n") if p.strip()]
        return [Document(f"{source.name}#{i}", p) for i, p in enumerate(paragraphs)], str(source)
    raise CorpusError(f"{source}: corpus.path names no file or folder")


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CorpusError(f"{path}: not UTF-8 (byte {err.start}, line {line}): {err.reason}") from err


@dataclass(frozen=True)
class Corpus:
    vocab: list[str]
    vocab_counts: np.ndarray  # (V,) int64 train count of each vocabulary entry
    streams: dict[str, np.ndarray]  # split -> flat int32 `<s> ... </s>` stream
    documents: pd.DataFrame  # document, split, sentences, tokens

    def metrics(self) -> dict[str, float]:
        from models.tokenizer import UNK_ID

        out: dict[str, float] = {"vocab_size": float(len(self.vocab))}
        for split, stream in self.streams.items():
            words = stream[stream != BOS_ID]  # what the LMs predict (words and </s>)
            out[f"{split}_tokens"] = float(len(words))
            out[f"{split}_sentences"] = float(np.count_nonzero(stream == BOS_ID))
            out[f"{split}_unk_rate"] = float(np.mean(words == UNK_ID)) if len(words) else 0.0
        return out


def build_corpus(documents: list[Document], cfg: CorpusConfig, source: str) -> Corpus:
    """Tokenise, split by whole documents (seeded), build the vocabulary from train, encode."""
    if cfg.max_documents:
        documents = documents[: cfg.max_documents]
    tokenized = [tokenize_document(d.text) for d in documents]
    sizes = np.array([sum(len(s) for s in doc) for doc in tokenized], dtype=np.int64)
    if sizes.sum() == 0:
        raise CorpusError(f"{source}: the corpus is empty (no tokens in {len(documents)} documents)")

    # Hold out whole documents in a seeded order until each held-out split has its share of tokens,
    # so no document leaks across splits.
    order = np.random.default_rng(cfg.split_seed).permutation(len(documents))
    split_of = np.full(len(documents), "train", dtype=object)
    total = sizes.sum()
    cursor = 0
    for split, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        taken = 0
        while cursor < len(order) and taken < fraction * total:
            split_of[order[cursor]] = split
            taken += sizes[order[cursor]]
            cursor += 1
    for split in SPLITS:
        if not sizes[split_of == split].sum():
            raise CorpusError(
                f"{source}: the {split} split is empty ({len(documents)} documents, {total} tokens); "
                "give more text or change corpus.val_fraction / corpus.test_fraction")

    sentences = {s: [sent for doc, sp in zip(tokenized, split_of) if sp == s for sent in doc] for s in SPLITS}
    vocab = build_vocab(sentences["train"], cfg.min_count)
    streams = {s: encode(sentences[s], vocab) for s in SPLITS}
    counts = np.bincount(streams["train"], minlength=len(vocab)).astype(np.int64)
    documents_table = pd.DataFrame({
        "document": [d.name for d in documents],
        "split": split_of.astype(str),
        "sentences": [len(doc) for doc in tokenized],
        "tokens": sizes,
    })
    return Corpus(vocab, counts, streams, documents_table)


def write_corpus(corpus: Corpus, out_dir: Path) -> None:
    with atomic_path(out_dir, directory=True) as tmp:
        for split, stream in corpus.streams.items():
            pq.write_table(pa.table({"token_id": pa.array(stream, pa.int32())}), tmp / f"{split}.parquet")
        vocab = pa.table({"id": pa.array(np.arange(len(corpus.vocab)), pa.int32()),
                          "token": pa.array(corpus.vocab, pa.string()),
                          "count": pa.array(corpus.vocab_counts, pa.int64())})
        pq.write_table(vocab, tmp / "vocab.parquet")
        pq.write_table(pa.Table.from_pandas(corpus.documents, preserve_index=False), tmp / "documents.parquet")


def read_stream(corpus_dir: Path, split: str) -> np.ndarray:
    path = corpus_dir / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the corpus stage first (dvc repro corpus)")
    return pq.read_table(path, columns=["token_id"]).column("token_id").to_numpy().astype(np.int32)


def read_vocab(corpus_dir: Path) -> list[str]:
    path = corpus_dir / "vocab.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the corpus stage first (dvc repro corpus)")
    table = pq.read_table(path)
    ids = table.column("id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise ValueError(f"{path}: vocabulary ids are not 0..V-1 in order")
    return table.column("token").to_pylist()


@task(name="corpus", cache_policy=NO_CACHE)
def corpus_task(root: Path, cfg: CorpusConfig, run: StageRun) -> dict[str, float]:
    documents, source = read_documents(cfg, root)
    corpus = build_corpus(documents, cfg, source)
    write_corpus(corpus, root / CORPUS_DIR)
    metrics = corpus.metrics()
    write_json(root / METRICS_DIR / "corpus.json", metrics)
    run.log_input(corpus.documents, source=source, name="documents", context="source")
    run.log_metrics(metrics)
    run.log_artifact(root / CORPUS_DIR / "vocab.parquet", "corpus")
    run.log_artifact(root / CORPUS_DIR / "documents.parquet", "corpus")
    return metrics


# ------------------------------------------------------------------------------------- ngram


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


def fit_ngram(train: np.ndarray, test: np.ndarray, vocab_size: int, cfg: kn.NgramConfig) -> NgramFit:
    """Count orders 1..N once; estimate a KN model of every order n <= N and score the test stream."""
    counts = kn.count_ngrams(train, vocab_size, cfg.order)
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


@task(name="ngram", cache_policy=NO_CACHE)
def ngram_task(root: Path, cfg: kn.NgramConfig, run: StageRun) -> dict[str, float]:
    corpus_dir, out_dir = root / CORPUS_DIR, root / NGRAM_DIR
    vocab = read_vocab(corpus_dir)
    train, test = read_stream(corpus_dir, "train"), read_stream(corpus_dir, "test")
    run.log_input(pd.DataFrame({"token_id": train}), source=str(corpus_dir / "train.parquet"),
                  name="corpus-train", context="train")
    run.log_input(pd.DataFrame({"token_id": test}), source=str(corpus_dir / "test.parquet"),
                  name="corpus-test", context="test")

    fit = fit_ngram(train, test, len(vocab), cfg)
    for warning in fit.model.warnings:
        print(f"warning: {warning}")

    with atomic_path(out_dir, directory=True) as tmp:
        for n in range(1, cfg.order + 1):
            kn.counts_frame(fit.counts, n).to_parquet(tmp / f"counts_{n}.parquet", index=False)
        with open(tmp / "model.arpa", "wb") as arpa:
            for chunk in kn.arpa_chunks(fit.model.model, vocab):
                arpa.write(chunk)

    metrics = fit.metrics()
    write_json(root / METRICS_DIR / "ngram.json", {
        "order": cfg.order,
        "test_perplexity": fit.test_perplexity[cfg.order],
        "test_perplexity_by_order": {str(n): p for n, p in fit.test_perplexity.items()},
        "ngram_types_by_order": {str(n): len(k) for n, k in enumerate(fit.counts.keys, start=1)},
        "discounts_by_order": {str(n): list(map(float, d)) for n, d in enumerate(fit.model.discounts, start=1)},
        "discount_fallback_orders": [w.split(":")[0] for w in fit.model.warnings],
        "test_tokens": fit.test_tokens,
    })
    curve = pd.DataFrame({"order": list(fit.test_perplexity),
                          "test_perplexity": list(fit.test_perplexity.values()),
                          "ngram_types": [len(k) for k in fit.counts.keys]})
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
