"""`kiln score`: how plausible are these sentences under the trained language models?

Each sentence is tokenised with the corpus rules (models/text/tokenizer.py), wrapped as `<s> ... </s>` and
scored with the perplexity accounting of the whole project: every token but `<s>` is predicted.
Words outside the model's vocabulary are scored as `<unk>` and flagged.

A model is scored only against the corpus vocabulary it was trained on: each records the vocabulary's digest
(`vocab_digest` in tasks/text/corpus.py), and a model whose digest is not the current corpus's, or that records
none, is refused with the stage to rerun, rather than scored with token ids that now mean other words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.text import ngram as kn
from models.text.language_models import LANGUAGE_MODELS
from models.text.tokenizer import (
    BOS_ID,
    EOS,
    EOS_ID,
    UNK,
    UNK_ID,
    split_sentences,
    tokenize_sentence,
)
from tasks.errors import StaleArtefact, rerun_hint, shown_path
from tasks.layout import CORPUS_DIR, LM_DIR, NGRAM_DIR


@dataclass(frozen=True)
class SentenceScore:
    model: str
    sentence: str
    tokens: list[str]  # as predicted, ending in </s>
    unknown: list[bool]  # scored as <unk>
    token_log10: list[float]
    log10_prob: float
    perplexity: float

    def as_dict(self) -> dict:
        return asdict(self)


def sentence_tokens(sentence: str) -> list[str]:
    """One input line as one sentence: the corpus normalisation and token rules, no sentence split."""
    return [t for part in split_sentences(sentence) for t in tokenize_sentence(part)]


StaleModel = StaleArtefact  # a trained model whose vocabulary is not the corpus's (or unknown)


def check_vocab_digest(root: Path, model_path: Path, recorded: str | None, stage: str) -> None:
    """Refuse `model_path` unless the vocabulary digest it recorded is the current corpus vocabulary's (the
    shared check, `require_meta`, worded for a vocabulary)."""
    from tasks.text.corpus import read_vocab, vocab_digest

    if not recorded:
        raise StaleModel(f"{shown_path(root, model_path)} records no vocabulary digest: {rerun_hint(stage)}")
    current = vocab_digest(read_vocab(root / CORPUS_DIR))
    if recorded != current:
        raise StaleModel(
            f"{shown_path(root, model_path)} was trained on another vocabulary (digest {recorded} vs the corpus's "
            f"{current}): {rerun_hint(stage)}"
        )


def _arpa_sizes(path: Path) -> list[int] | None:
    """The `ngram N=count` sizes of an ARPA file's header, or None when the header is not the plain one that
    `arpa_chunks` writes (the full parser then reads the file and names what is wrong)."""
    sizes = []
    with open(path, "rb") as f:
        if f.readline().strip() != b"\\data\\":
            return None
        for line in f:
            fields = line.strip().split(b"=")
            if len(fields) != 2 or fields[0] != f"ngram {len(sizes) + 1}".encode() or not fields[1].isdigit():
                break
            sizes.append(int(fields[1]))
    return sizes or None


def _load_model_tables(path: Path) -> tuple[kn.BackoffModel, list[str]] | None:
    """The model from the `model_<n>.parquet` tables beside the ARPA file `path` when they are that file's
    (written with it: same byte size, orders and n-gram counts), else None."""
    import pyarrow.parquet as pq

    from tasks.text.ngram import ARPA_BYTES_KEY, MODEL_TABLE

    first = path.parent / MODEL_TABLE.format(n=1)
    if not first.is_file():
        return None
    recorded = (pq.read_schema(first).metadata or {}).get(ARPA_BYTES_KEY)
    if recorded != str(path.stat().st_size).encode():
        return None
    sizes = _arpa_sizes(path)
    files = [path.parent / MODEL_TABLE.format(n=n) for n in range(1, len(sizes or []) + 1)]
    if not sizes or not all(f.is_file() for f in files):
        return None
    # Only the columns a key needs (model_from_tables): the others are there for any other reader.
    tables = []
    for n, f in enumerate(files, start=1):
        columns = ["w1", "word"] if n == 1 else ["context", f"w{n}"]
        tables.append(pq.read_table(f, columns=[*columns, "log10_prob", "log10_backoff"]))
    if [t.num_rows for t in tables] != sizes:
        return None
    return kn.model_from_tables(tables)


def load_ngram(root: Path) -> tuple[kn.BackoffModel, list[str]]:
    """The trained n-gram model and its vocabulary: from the stage's model tables when they are model.arpa's
    (under a second for a 10M-token 5-gram model), else by parsing model.arpa."""
    path = root / NGRAM_DIR / "model.arpa"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained n-gram model; run `dvc repro ngram` or `kiln run` first")
    try:
        loaded = _load_model_tables(path)
    except (OSError, ValueError, KeyError):  # unreadable or foreign tables: the ARPA file is the model
        loaded = None
    if loaded is not None:
        return loaded
    with open(path, encoding="utf-8") as lines:
        try:
            return kn.parse_arpa(lines)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


def score_with_ngram(root: Path, sentences: list[str]) -> list[SentenceScore]:
    from tasks.text.ngram import VOCAB_DIGEST_FILE

    model, vocab = load_ngram(root)
    digest_file = root / NGRAM_DIR / VOCAB_DIGEST_FILE
    recorded = digest_file.read_text(encoding="utf-8").strip() if digest_file.is_file() else None
    check_vocab_digest(root, root / NGRAM_DIR / "model.arpa", recorded, "ngram")
    index = {w: i for i, w in enumerate(vocab)}
    tokenized = [sentence_tokens(s) for s in sentences]
    ids = [[index.get(t, UNK_ID) for t in tokens] for tokens in tokenized]
    stream = np.fromiter((i for sent in ids for i in (BOS_ID, *sent, EOS_ID)), dtype=np.int32)
    scores = kn.score_stream(model, stream)
    starts = np.flatnonzero(stream == BOS_ID)
    out = []
    for sentence, tokens, sent_ids, start, total in zip(sentences, tokenized, ids, starts, scores.sentence_log10):
        per_token = scores.token_log10[start + 1 : start + len(sent_ids) + 2]  # words and </s>
        unknown = [i == UNK_ID and t != UNK for t, i in zip(tokens, sent_ids)] + [False]
        out.append(
            SentenceScore(
                "ngram",
                sentence,
                [*tokens, EOS],
                unknown,
                per_token.tolist(),
                float(total),
                float(10.0 ** (-total / len(per_token))),
            )
        )
    return out


def neural_scorer(name: str) -> Callable[[Path, list[str]], list[SentenceScore]]:
    """Score with the trained `lm@name`: each sentence alone, `<s> ... </s>`, the corpus vocabulary."""

    def score(root: Path, sentences: list[str]) -> list[SentenceScore]:
        from tasks.text.corpus import read_vocab
        from tasks.text.lm import load_language_model_with_meta, token_log_probs

        path = root / LM_DIR / name / "model.pt"
        _, model, meta = load_language_model_with_meta(path)
        check_vocab_digest(root, path, meta.get("vocab_digest"), f"lm@{name}")
        index = {w: i for i, w in enumerate(read_vocab(root / CORPUS_DIR))}
        out = []
        for sentence in sentences:
            tokens = sentence_tokens(sentence)
            ids = [index.get(t, UNK_ID) for t in tokens]
            stream = np.array([BOS_ID, *ids, EOS_ID], dtype=np.int32)
            with torch.no_grad():
                log10 = token_log_probs(model, stream, model.cfg.context_length, 8, torch.device("cpu")) / np.log(10)
            unknown = [i == UNK_ID and t != UNK for t, i in zip(tokens, ids)] + [False]
            total = float(log10.sum())
            out.append(
                SentenceScore(
                    name, sentence, [*tokens, EOS], unknown, log10.tolist(), total, float(10.0 ** (-total / len(log10)))
                )
            )
        return out

    return score


SCORERS: dict[str, Callable[[Path, list[str]], list[SentenceScore]]] = {
    "ngram": score_with_ngram,
    **{name: neural_scorer(name) for name in LANGUAGE_MODELS},
}


def score_sentences(root: Path, sentences: list[str], models: list[str] | None = None) -> list[SentenceScore]:
    """Scores of every sentence under every named model, most plausible (lowest perplexity) first."""
    models = models or ["ngram"]
    unknown = [m for m in models if m not in SCORERS]
    if unknown:
        raise KeyError(f"no language model {unknown[0]!r} to score with (known: {', '.join(SCORERS)})")
    scores = [s for m in models for s in SCORERS[m](root, sentences)]
    return sorted(scores, key=lambda s: (models.index(s.model), s.perplexity))


def printable(text: str) -> str:
    """`text` with control characters escaped (`\x1b`), so that input cannot drive the terminal (a
    title-setting escape in a scored sentence); `--json` output is escaped by the JSON encoder already."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def format_scores(scores: list[SentenceScore]) -> str:
    """A ranked table per model, with every token's log10 probability; `<unk>`-scored words marked."""
    lines = []
    for model in dict.fromkeys(s.model for s in scores):
        lines.append(f"model {model}: ranked most to least plausible (perplexity per predicted token, </s> included)")
        lines.append(f"{'rank':>4}  {'log10 P':>9}  {'ppl':>9}  sentence")
        ranked = [s for s in scores if s.model == model]
        for rank, s in enumerate(ranked, start=1):
            lines.append(f"{rank:>4}  {s.log10_prob:>9.3f}  {s.perplexity:>9.2f}  {printable(s.sentence)}")
            tokens = " ".join(
                f"{printable(t)}{'[<unk>]' if u else ''}:{lp:.2f}"
                for t, u, lp in zip(s.tokens, s.unknown, s.token_log10)
            )
            lines.append(f"{'':>26}{tokens}")
        if any(any(s.unknown) for s in ranked):
            lines.append("words marked [<unk>] are outside the model's vocabulary and were scored as <unk>")
    return "\n".join(lines)
