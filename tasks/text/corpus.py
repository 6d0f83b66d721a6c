"""`corpus`: documents (CPython's reference text or your files) -> split token streams + vocabulary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.text.tokenizer import BOS_ID, build_vocab, encode, tokenize_document
from tasks.errors import InputError
from tasks.io import atomic_path, write_json
from tasks.layout import CORPUS_DIR, METRICS_DIR, SPLITS
from tasks.phases import in_phase
from tasks.spec import StageContext, StageSpec


@dataclass(frozen=True)
class CorpusConfig:
    """`params/data.yaml: corpus`: where the text comes from and how it is split."""

    source: Literal["builtin", "path"]  # builtin: CPython's pydoc_data.topics reference text
    path: str  # with source: path, a UTF-8 .txt file or a folder of .txt files
    min_count: int  # train-split count a word needs to enter the vocabulary
    val_fraction: float  # share of documents (by tokens) held out for validation
    test_fraction: float  # and for test
    split_seed: int  # the document shuffle of the split
    max_documents: int  # 0: all; the smoke profile takes a few
    max_test_13gram_share: float  # the stage fails if more of test's 13-grams with a word than this occur in train

    def __post_init__(self) -> None:
        if self.source == "path" and not self.path:
            raise ValueError("path must name a file or folder when source is 'path'")
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {getattr(self, name)}")
        if self.max_documents < 0:
            raise ValueError(f"max_documents must be >= 0, got {self.max_documents}")
        share = self.max_test_13gram_share
        if not (math.isfinite(share) and 0.0 <= share <= 1.0):
            raise ValueError(f"max_test_13gram_share must be a finite number in [0, 1], got {share}")


class CorpusError(InputError):
    """Unusable text: the message names the file (or source) at fault."""


# ------------------------------------------------------------------------------------ corpus


@dataclass(frozen=True)
class Document:
    name: str  # topic name, file path relative to the source, or "file.txt#paragraph"
    text: str


@in_phase("loading")
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
    documents: pd.DataFrame  # document, split, sentences, tokens (as split), kept_sentences, kept_tokens
    audit: dict[str, float] = field(default_factory=dict)  # cross-split duplicate removal and contamination

    def metrics(self) -> dict[str, float]:
        from models.text.tokenizer import UNK_ID

        out: dict[str, float] = {"vocab_size": float(len(self.vocab))}
        for split, stream in self.streams.items():
            words = stream[stream != BOS_ID]  # what the LMs predict (words and </s>)
            out[f"{split}_tokens"] = float(len(words))
            out[f"{split}_sentences"] = float(np.count_nonzero(stream == BOS_ID))
            out[f"{split}_unk_rate"] = float(np.mean(words == UNK_ID)) if len(words) else 0.0
        out.update(self.audit)
        return out


# ------------------------------------------------------------------- cross-split duplicates

AUDIT_NGRAM = 13  # near-duplicate probe: a 13-word run shared with train is rarely chance


def _stream_tokens(sentences: list[tuple[str, ...]]) -> int:
    """Tokens as the stream metrics count them: the words and the `</s>` of every sentence."""
    return sum(len(s) + 1 for s in sentences)


def remove_cross_split_duplicates(
    split_docs: dict[str, list[list[tuple[str, ...]]]],
) -> tuple[dict[str, list[list[tuple[str, ...]]]], dict[str, float]]:
    """Drop every val or test sentence whose token sequence already occurs in an earlier split.

    Splits are visited in the order train, val, test; the earliest split keeps its copy. Repeats within
    one split stay. Returns the documents' remaining sentences (a document may end up with none) and the
    removal counts, in sentences and in stream tokens (words plus `</s>`).
    """
    seen: set[tuple[str, ...]] = set()
    kept: dict[str, list[list[tuple[str, ...]]]] = {}
    counts: dict[str, float] = {}
    for split in ("train", "val", "test"):  # the precedence, stated here rather than taken from SPLITS
        docs = [[s for s in doc if s not in seen] for doc in split_docs[split]]
        if split != "train":
            removed = [s for doc in split_docs[split] for s in doc if s in seen]
            counts[f"removed_{split}_sentences"] = float(len(removed))
            counts[f"removed_{split}_tokens"] = float(_stream_tokens(removed))
        seen.update(s for doc in docs for s in doc)
        kept[split] = docs
    return kept, counts


def _ngrams(sentence: tuple[str, ...], n: int) -> list[tuple[str, ...]]:
    return [sentence[i : i + n] for i in range(len(sentence) - n + 1)]


def contamination_audit(
    sentences: dict[str, list[tuple[str, ...]]], n: int = AUDIT_NGRAM
) -> tuple[dict[str, float], str]:
    """How much of val and test train has seen: exact sentences, and test n-grams within sentences.

    `{split}_sentences_in_train_share` and `{split}_tokens_in_train_share`: the share of the split's
    sentences, and of its stream tokens, whose sentence occurs verbatim in train.
    `test_13grams_in_train_share`: the share of test's n-grams (counted with repeats, never across a
    sentence boundary) that occur in train. `test_word_13grams_in_train_share`: the same over the n-grams
    that hold at least one word: every punctuation mark is a token, so the rules and underlines of the
    reference text's tables make long runs of identical all-punctuation n-grams that say nothing about
    leaked prose (0.45 of the built-in test 13-grams, against 0.004 for those with a word). Also returns
    the first shared test n-gram with a word, as text ("" if none).
    """
    train = set(sentences["train"])
    out: dict[str, float] = {}
    for split in ("val", "test"):
        sents = sentences[split]
        hit = [s for s in sents if s in train]
        out[f"{split}_sentences_in_train_share"] = len(hit) / len(sents) if sents else 0.0
        total = _stream_tokens(sents)
        out[f"{split}_tokens_in_train_share"] = _stream_tokens(hit) / total if total else 0.0
    train_grams = {g for s in sentences["train"] for g in _ngrams(s, n)}
    test_grams = [g for s in sentences["test"] for g in _ngrams(s, n)]
    shared = [g for g in test_grams if g in train_grams]
    out[f"test_{n}grams_in_train_share"] = len(shared) / len(test_grams) if test_grams else 0.0
    worded = [g for g in test_grams if any(any(c.isalnum() for c in token) for token in g)]
    shared_worded = [g for g in worded if g in train_grams]
    out[f"test_word_{n}grams_in_train_share"] = len(shared_worded) / len(worded) if worded else 0.0
    return out, " ".join(shared_worded[0]) if shared_worded else ""


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
                "give more text or change corpus.val_fraction / corpus.test_fraction"
            )

    # A val or test sentence that train (or, for test, val) already has is dropped before the vocabulary is
    # built, so held-out scores measure text the models have not seen verbatim.
    index = {s: np.flatnonzero(split_of == s) for s in SPLITS}
    split_docs = {s: [[tuple(sent) for sent in tokenized[i]] for i in index[s]] for s in SPLITS}
    kept_docs, removed = remove_cross_split_duplicates(split_docs)
    sentences = {s: [sent for doc in kept_docs[s] for sent in doc] for s in SPLITS}
    for split in SPLITS:
        if not sentences[split]:
            raise CorpusError(
                f"{source}: the {split} split is empty once sentences that occur in an earlier split are "
                f"removed ({len(index[split])} documents); give more text or change corpus.split_seed"
            )
    audit, example = contamination_audit(sentences)
    share = audit[f"test_word_{AUDIT_NGRAM}grams_in_train_share"]
    if share > cfg.max_test_13gram_share:
        raise CorpusError(
            f"{source}: test_word_13grams_in_train_share = {share:.4f} exceeds corpus.max_test_13gram_share = "
            f"{cfg.max_test_13gram_share:g}: that share of the test split's {AUDIT_NGRAM}-grams with a word occur in "
            f"train (e.g. '{example}'); remove near-duplicate documents, change corpus.split_seed, or raise "
            "the threshold"
        )

    vocab = build_vocab(sentences["train"], cfg.min_count)
    streams = {s: encode(sentences[s], vocab) for s in SPLITS}
    counts = np.bincount(streams["train"], minlength=len(vocab)).astype(np.int64)
    kept_sentences = np.zeros(len(documents), dtype=np.int64)
    kept_tokens = np.zeros(len(documents), dtype=np.int64)
    for split in SPLITS:
        for i, doc in zip(index[split], kept_docs[split]):
            kept_sentences[i] = len(doc)
            kept_tokens[i] = sum(len(sent) for sent in doc)
    documents_table = pd.DataFrame(
        {
            "document": [d.name for d in documents],
            "split": split_of.astype(str),
            "sentences": [len(doc) for doc in tokenized],
            "tokens": sizes,
            "kept_sentences": kept_sentences,  # after cross-split duplicate removal; 0: the document dropped out
            "kept_tokens": kept_tokens,
        }
    )
    return Corpus(vocab, counts, streams, documents_table, {**removed, **audit})


def write_corpus(corpus: Corpus, out_dir: Path) -> None:
    with atomic_path(out_dir, directory=True) as tmp:
        for split, stream in corpus.streams.items():
            pq.write_table(pa.table({"token_id": pa.array(stream, pa.int32())}), tmp / f"{split}.parquet")
        vocab = pa.table(
            {
                "id": pa.array(np.arange(len(corpus.vocab)), pa.int32()),
                "token": pa.array(corpus.vocab, pa.string()),
                "count": pa.array(corpus.vocab_counts, pa.int64()),
            }
        )
        pq.write_table(vocab, tmp / "vocab.parquet")
        pq.write_table(pa.Table.from_pandas(corpus.documents, preserve_index=False), tmp / "documents.parquet")


@in_phase("loading")
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


def vocab_digest(tokens: list[str]) -> str:
    """A short fingerprint of a vocabulary: sha256 of its tokens in id order, one per line (first 16 hex digits).

    A trained model records it, and `kiln score` refuses a model whose digest is not the corpus's, since
    its token ids would mean other words. Tokens never hold a newline (the tokenizer splits on whitespace)."""
    import hashlib

    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class CorpusInputs:
    corpus: CorpusConfig


@task(name="corpus", cache_policy=NO_CACHE)
def corpus_task(ctx: StageContext, inputs: CorpusInputs) -> dict[str, float]:
    root, cfg, run = ctx.root, inputs.corpus, ctx.run
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


SPEC = StageSpec(name="corpus", family="text", task=corpus_task, inputs=CorpusInputs, seeded=False)
