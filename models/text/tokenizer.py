"""Word-level tokenizer and vocabulary shared by every language model in Kiln.

Rules (the README states them once, every text stage follows them):

1. Text is Unicode-normalised (NFKC) and lower-cased.
2. A document splits into sentences at blank lines and after `.`, `!` or `?` followed by white space
   (a single line break is white space: reference text is hard-wrapped).
3. A sentence splits into tokens: runs of letters/digits (with inner apostrophes, `don't`), and every
   other non-space character as a token of its own (`(`, `=`, `.`).
4. The vocabulary comes from the train split only: tokens seen at least `min_count` times, ordered by
   descending count then by the token itself. Ids 0, 1, 2 are `<unk>`, `<s>`, `</s>`.
5. A token stream is a flat int32 array: every sentence is `<s> w1 ... wn </s>`. Out-of-vocabulary words
   become `<unk>`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIALS = (UNK, BOS, EOS)

_SENTENCE_BREAK = re.compile(r"\n\s*\n|(?<=[.!?])\s+")
_TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def split_sentences(document: str) -> list[str]:
    """Rules 1-2: normalised, lower-cased sentences of a document (empty ones dropped)."""
    text = unicodedata.normalize("NFKC", document).lower()
    return [s for s in (part.strip() for part in _SENTENCE_BREAK.split(text)) if s]


def tokenize_sentence(sentence: str) -> list[str]:
    """Rule 3."""
    return _TOKEN.findall(sentence)


def tokenize_document(document: str) -> list[list[str]]:
    """A document as a list of tokenized, non-empty sentences."""
    sentences = (tokenize_sentence(s) for s in split_sentences(document))
    return [s for s in sentences if s]


def build_vocab(sentences: Iterable[Sequence[str]], min_count: int) -> list[str]:
    """Rule 4: specials first, then train tokens with count >= min_count by (-count, token)."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts = Counter(token for sentence in sentences for token in sentence)
    for special in SPECIALS:
        counts.pop(special, None)
    kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return [*SPECIALS, *kept]


def encode(sentences: Iterable[Sequence[str]], vocab: Sequence[str]) -> np.ndarray:
    """Rule 5: the flat `<s> ... </s>` id stream of `sentences`."""
    index = {token: i for i, token in enumerate(vocab)}
    ids: list[int] = []
    for sentence in sentences:
        ids.append(BOS_ID)
        ids.extend(index.get(token, UNK_ID) for token in sentence)
        ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.int32)


def sentence_bounds(stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start (the `<s>`) and end (one past the `</s>`) offsets of every sentence in a stream."""
    starts = np.flatnonzero(stream == BOS_ID)
    ends = np.flatnonzero(stream == EOS_ID) + 1
    if len(starts) != len(ends) or np.any(ends <= starts):
        raise ValueError("token stream is not a sequence of <s> ... </s> sentences")
    return starts, ends
