"""Interpolated modified Kneser-Ney n-gram language model, vectorised with numpy.

Chen & Goodman (1998), "An Empirical Study of Smoothing Techniques for Language Modeling", Harvard
TR-10-98, section 3: interpolated Kneser-Ney with three discounts D1, D2, D3+ (p_MKN and its gamma, quoted
as (MKN) below) and their closed-form estimates, eq. 26 (the number KenLM's sources cite).

Estimated the way KenLM's `lmplz` does (Heafield, Pouzyrevsky, Clark, Koehn 2013, "Scalable Modified
Kneser-Ney Language Model Estimation"; lm/builder/adjust_counts.cc, initial_probabilities.cc,
interpolate.cc), so the ARPA file written here is the one lmplz would write for the same sentences:

1. Count the n-grams of orders 1..N inside sentences. An n-gram may start at `<s>`, never before it
   (lmplz pads with `<s>` and drops n-grams with `<s>` after their first word).
2. Adjust the counts: the highest order keeps raw counts; a lower-order n-gram gets its continuation count
   N1+(. w_1^n), the number of distinct words seen before it, except n-grams starting with `<s>`, which
   cannot have a word before them and keep their raw counts.
3. Discounts D1, D2, D3+ for every order from the counts-of-counts n1..n4 of the adjusted counts (eq. 26).
4. Interpolate every order with the next lower one (MKN); the unigrams interpolate with the uniform
   distribution over the vocabulary without `<s>` (which is never predicted and gets log10 p = -99).
5. Store the result as a backoff model, i.e. what an ARPA file holds: log10 p(w | h) for every counted
   n-gram hw and backoff b(h) = gamma(h), because an interpolated model gives a word never seen after h
   exactly gamma(h) p(w | h'), h' being h without its first word.

`<unk>` is an ordinary word here (the tokenizer already mapped rare words to it). A vocabulary word that
never occurs in training keeps a unigram row with zero count, so it receives only the uniform share
gamma(.) / (V - 1).

Array layout (shared by counts and models). V is the vocabulary size. The n-grams of order n are the rows
of a table sorted lexicographically; a row's int64 key is `prefix_row * V + w_n`, `prefix_row` being the
row of (w_1 .. w_{n-1}) in the order n-1 table. The order 1 table is dense: row i is word i, key i. Sorted
keys are sorted n-grams, so every lookup is one `np.searchsorted` per order, and the words of any row are
recovered by walking the prefixes down (`ngram_words`).
"""

from __future__ import annotations

import ctypes
import math
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise, repeat
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.text.tokenizer import BOS, BOS_ID, EOS, EOS_ID, UNK, sentence_bounds

if TYPE_CHECKING:  # pandas only for the count frames: the estimator and `kiln score` load without it
    import pandas as pd

LOG10_ZERO = -99.0  # what ARPA files from lmplz store for log10 p(<s>)


@dataclass
class NgramConfig:
    """The `ngram:` section of params/lm.yaml."""

    order: int = 5
    # D1, D2, D3+ used for an order whose counts-of-counts give no valid discounts (KenLM's
    # --discount_fallback defaults).
    discount_fallback: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])

    def __post_init__(self) -> None:
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"ngram.order must be an integer >= 1, got {self.order!r}")
        fallback = self.discount_fallback
        if not isinstance(fallback, list) or len(fallback) != 3:
            raise ValueError(f"ngram.discount_fallback must be a list of 3 discounts [D1, D2, D3+], got {fallback!r}")
        for j, d in enumerate(fallback, start=1):
            # A discount D_j may take at most j from a count of j (eq. 26 keeps D_j in (0, j) on real data).
            if isinstance(d, bool) or not isinstance(d, int | float) or not 0.0 < d < j:
                name = f"D{j}+" if j == 3 else f"D{j}"
                raise ValueError(f"ngram.discount_fallback[{j - 1}] ({name}) must be in (0, {j}), got {d!r}")


# --------------------------------------------------------------------------------------------- counting


@dataclass(frozen=True)
class NgramCounts:
    """Raw n-gram counts of orders 1..N in the table layout of the module docstring."""

    vocab_size: int
    keys: tuple[np.ndarray, ...]  # [n-1]: (G_n,) int64, sorted; order 1 is arange(V)
    # count_ngrams writes these two as int32 (a count and a row are below the stream length, which it keeps
    # under 2**31), two thirds of the tables' memory less; the reference and counts_from_frames write int64.
    counts: tuple[np.ndarray, ...]  # [n-1]: (G_n,) raw counts; order 1 is 0 for unseen words
    suffix: tuple[np.ndarray, ...]  # [n-1]: (G_n,) row of (w_2 .. w_n) in order n-1; order 1: zeros

    @property
    def order(self) -> int:
        return len(self.keys)


def _check_stream(
    stream: np.ndarray, vocab_size: int, dtype: type = np.int64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated stream as `dtype` (no copy if it is one) and its sentence starts and ends (see
    models/text/tokenizer.py)."""
    stream = np.asarray(stream)
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise ValueError(f"token stream must be a 1-D integer array, got {stream.dtype} {stream.shape}")
    if len(stream) == 0:
        raise ValueError("token stream is empty")
    if stream.min() < 0 or stream.max() >= vocab_size:
        raise ValueError(f"token stream has ids outside the vocabulary [0, {vocab_size})")
    starts, ends = sentence_bounds(stream)
    if len(starts) == 0 or starts[0] != 0 or ends[-1] != len(stream) or np.any(starts[1:] != ends[:-1]):
        raise ValueError("token stream is not a sequence of <s> ... </s> sentences")
    return stream.astype(dtype, copy=False), starts, ends


def count_ngrams(stream: np.ndarray, vocab_size: int, order: int, threads: int = 1) -> NgramCounts:
    """Counts of every n-gram of orders 1..`order` inside the sentences of `stream` (`count_ngrams_ref`,
    faster and leaner), on `threads` threads.

    The positions are kept sorted by the (n-1)-gram starting there, with that n-gram's row. Order n's key
    `row * V + next word` is then already sorted but for the next word within each (n-1)-gram, so its sort
    is close to linear instead of a full sort of position-ordered keys; position arrays are int32.

    The positions are split by their first word into ranges of about equal size, which the threads share.
    The tables are sorted by first word before anything else, so each range owns one contiguous block of
    rows in every order: it is counted with rows numbered from 0, and the ranges only meet where an n-gram's
    suffix (which may start with any word) is looked up, once every range of the order below has its
    offset. numpy releases the GIL in the sorts, gathers and scatters that take the time.
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    # _check_stream bounds the ids by V, so they fit int32, as rows and positions do below.
    words, _, _ = _check_stream(stream, vocab_size, np.int32)
    V, L = vocab_size, len(words)
    if L >= 2**31 - 1:  # int32 positions; beyond this the reference's int64 arrays are the way
        return count_ngrams_ref(stream, vocab_size, order)
    is_end = words == EOS_ID  # (L,) an (n-1)-gram ending here cannot be extended inside its sentence
    unigrams = np.bincount(words, minlength=V).astype(np.int32)  # (V,)

    # First-word ranges [cut[i], cut[i+1]) holding about L / R positions each. More ranges than threads
    # keep less alive at once: a range's keys and sort order are live only while it is counted.
    R = max(threads, _COUNT_RANGES)
    share = np.searchsorted(np.cumsum(unigrams), np.arange(1, R) * (L / R), side="right")
    cut = np.concatenate([[0], share, [V]]).astype(np.int64)  # (R+1,) nondecreasing; a range may be empty
    ranges = [_Range(np.flatnonzero((words >= lo) & (words < hi)).astype(np.int32), lo) for lo, hi in pairwise(cut)]
    for part in ranges:
        part.row = words[part.pos] - np.int32(part.offset)  # order 1: the row of a word is the word

    keys = [np.arange(V, dtype=np.int64)]
    counts = [unigrams]
    suffix = [np.zeros(V, dtype=np.int32)]
    at_pos = words  # (L,) global row of the (n-1)-gram starting at each position (only read where one fits)
    with ThreadPoolExecutor(threads) as pool:
        for n in range(2, order + 1):
            last = n == order
            list(pool.map(_Range.count, ranges, repeat(words), repeat(is_end), repeat(n), repeat(V), repeat(last)))
            starts = np.cumsum([0] + [len(r.uniq) for r in ranges[:-1]])  # (R,) each range's first order-n row
            # Every range's order n-1 rows are in at_pos, so each can read its suffixes from any range; each
            # writes its block of the order's tables in place.
            G = int(starts[-1]) + len(ranges[-1].uniq)
            table = (np.empty(G, dtype=np.int64), np.empty(G, dtype=np.int32), np.empty(G, dtype=np.int32))
            list(pool.map(_Range.write_block, ranges, repeat(at_pos), repeat(V), repeat(table), starts))
            keys.append(table[0])
            counts.append(table[1])
            suffix.append(table[2])
            del table
            if not last:
                at_pos = np.empty(L, dtype=np.int32)  # only positions in the ranges are ever read back
                list(pool.map(_Range.scatter_rows, ranges, repeat(at_pos)))
    del ranges, at_pos
    _trim_thread_heaps()
    return NgramCounts(V, tuple(keys), tuple(counts), tuple(suffix))


def _trim_thread_heaps() -> None:
    """Give the pages glibc's malloc holds free back to the OS.

    The worker threads' arrays (a range's keys and positions, a few megabytes each) are under glibc's
    dynamic mmap threshold once a larger array was freed, so they come from per-thread heaps; freed, they
    stay resident and the main thread cannot reuse them. Estimating after a two-thread count of 10M tokens
    then peaked 0.12 GB higher (0.98 against 0.86 GB, benchmarks/bench_ngram.py). Elsewhere (no glibc)
    nothing is done.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim(0)


_ESTIMATE_ROWS = 1 << 20  # rows `estimate_kneser_ney` interpolates at a time (rounded to whole contexts)


def _context_chunks(keys: np.ndarray, V: int, rows: int) -> Iterator[slice]:
    """Slices of about `rows` rows of one order's table that never split a context (the rows sharing
    `keys // V`). numpy's weighted bincount adds each bin's weights in row order, so per-chunk sums of whole
    contexts are bit for bit the sums of one bincount over the table."""
    lo, G = 0, len(keys)
    while lo < G:
        hi = min(lo + rows, G)
        if hi < G:
            hi = int(np.searchsorted(keys, keys[hi] // V * V))  # back to the start of that row's context
            if hi <= lo:  # one context longer than `rows`: the chunk is that context
                hi = int(np.searchsorted(keys, (keys[lo] // V + 1) * V))
        yield slice(lo, hi)
        lo = hi


_COUNT_RANGES = 8  # first-word ranges `count_ngrams` splits the positions into (at least)


@dataclass
class _Range:
    """A share of `count_ngrams`: the positions whose first word lies in one range, sorted by the (n-1)-gram
    starting there, and that n-gram's row counted from the range's first row (`offset`)."""

    pos: np.ndarray  # (P,) int32
    offset: int  # global row of the range's first row, in the order `row` numbers (order n-1 while counting n)
    row: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))  # (P,) int32, local rows
    uniq: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # (G,) local keys
    first: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # (G,) first occurrences

    def count(self, words: np.ndarray, is_end: np.ndarray, n: int, V: int, last: bool) -> None:
        """Order n from order n-1: sort the positions by n-gram and number the distinct ones."""
        fits = ~is_end[self.pos + (n - 2)]  # (P,) the (n-1)-gram does not end at </s>, so an n-gram fits
        pos, row = self.pos[fits], self.row[fits]
        key = row.astype(np.int64) * V + words[pos + (n - 1)]  # (P,) local row of the (n-1)-gram, next word
        del row, fits
        # Random for n = 2; for n >= 3 sorted but within each (n-1)-gram, runs a stable (merge) sort exploits.
        sort = np.argsort(key, kind="quicksort" if n == 2 else "stable")
        key, pos = key[sort], pos[sort]
        del sort
        new = np.empty(len(key), dtype=bool)
        new[:1] = True
        np.not_equal(key[1:], key[:-1], out=new[1:])
        self.first = np.flatnonzero(new)  # (G,) first sorted occurrence of every n-gram
        self.uniq = key[self.first]
        del key
        self.pos = pos
        self.row = np.empty(0, dtype=np.int32) if last else np.cumsum(new, dtype=np.int32) - 1

    def write_block(
        self, at_pos: np.ndarray, V: int, table: tuple[np.ndarray, np.ndarray, np.ndarray], start: int
    ) -> None:
        """This range's rows of the order's (keys, counts, suffix), from row `start`, which then becomes the
        offset of its rows."""
        block = slice(start, start + len(self.uniq))
        keys, counts, suffix = table
        np.add(self.uniq, np.int64(self.offset) * V, out=keys[block])  # local (n-1)-gram rows -> global
        counts[block] = np.diff(self.first, append=len(self.pos))
        # The suffix w_2..w_n of an n-gram is the (n-1)-gram one position later, at any occurrence.
        suffix[block] = at_pos[self.pos[self.first] + 1]
        self.uniq = self.first = np.empty(0, dtype=np.int64)
        self.offset = int(start)

    def scatter_rows(self, at_pos: np.ndarray) -> None:
        at_pos[self.pos] = self.row + np.int32(self.offset)


def count_ngrams_ref(stream: np.ndarray, vocab_size: int, order: int) -> NgramCounts:
    """Reference for `count_ngrams`: the same counts, one `np.unique` over position-ordered keys per order.

    Order n gives every position the row of the (n-1)-gram starting there, so the n-gram starting there is
    the key `row * V + next word`; `np.unique` both counts those keys and numbers them for order n+1.
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    words, starts, ends = _check_stream(stream, vocab_size)
    V, L = vocab_size, len(words)
    sentence = np.cumsum(words == BOS_ID) - 1  # (L,) sentence of every position
    left = ends[sentence] - np.arange(L)  # (L,) tokens from here to the end of the sentence, </s> included

    keys = [np.arange(V, dtype=np.int64)]
    counts = [np.bincount(words, minlength=V).astype(np.int64)]
    suffix = [np.zeros(V, dtype=np.int64)]
    row = words  # (L,) row of the (n-1)-gram starting at each position, -1 where none fits the sentence
    for n in range(2, order + 1):
        pos = np.flatnonzero(left >= n)  # (P,) positions where an n-gram fits before the sentence ends
        key = row[pos] * V + words[pos + n - 1]  # (P,) int64
        uniq, inverse, count = np.unique(key, return_inverse=True, return_counts=True)  # (G,) (P,) (G,)
        # The suffix w_2..w_n of an n-gram is the (n-1)-gram one position later, at any occurrence.
        occurrence = np.empty(len(uniq), dtype=np.int64)
        occurrence[inverse] = pos  # (G,) one start position per n-gram
        suffix.append(row[occurrence + 1])  # (G,)
        row = np.full(L, -1, dtype=np.int64)
        row[pos] = inverse
        keys.append(uniq)
        counts.append(count.astype(np.int64))
    return NgramCounts(V, tuple(keys), tuple(counts), tuple(suffix))


def ngram_words(keys: Sequence[np.ndarray], n: int, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
    """Word ids, (R, n) int32, of the given rows of the order-n table, by walking the prefix rows down."""
    V = len(keys[0])
    key = keys[n - 1][rows]  # (R,) int64
    out = np.empty((len(key), n), dtype=np.int32)
    for k in range(n - 1, 0, -1):
        out[:, k] = key % V
        key = keys[k - 1][key // V]
    out[:, 0] = key
    return out


def counts_frame(counts: NgramCounts, n: int) -> pd.DataFrame:
    """Order-n counts as a table: int32 columns w1..wn, int64 `count`; rows sorted, unseen words dropped."""
    if not 1 <= n <= counts.order:
        raise ValueError(f"order {n} not in the counts (1..{counts.order})")
    import pandas as pd

    seen = np.flatnonzero(counts.counts[n - 1] > 0)  # only order 1 has zero rows (words never seen)
    words = ngram_words(counts.keys, n, seen)
    frame = pd.DataFrame({f"w{k + 1}": words[:, k] for k in range(n)})
    frame["count"] = counts.counts[n - 1][seen].astype(np.int64)
    return frame


def _rows_of(keys: Sequence[np.ndarray], words: np.ndarray) -> np.ndarray:
    """Row, (R,) int64, of each n-gram of `words` (R, n) in the tables; -1 if it or a prefix is absent."""
    V = len(keys[0])
    row = words[:, 0].astype(np.int64)  # (R,)
    for k in range(1, words.shape[1]):
        table = keys[k]
        key = row * V + words[:, k]  # (R,) meaningless where row = -1, masked below
        hit = row >= 0
        at = np.zeros(len(row), dtype=np.int64)
        if len(table):
            at = np.minimum(np.searchsorted(table, key), len(table) - 1)
            hit &= table[at] == key
        else:
            hit[:] = False
        row = np.where(hit, at, -1)
    return row


def counts_from_frames(frames: Sequence[pd.DataFrame], vocab_size: int) -> NgramCounts:
    """Inverse of `counts_frame` for orders 1..len(frames) (e.g. counts read back from Parquet)."""
    V = vocab_size
    unigrams = np.zeros(V, dtype=np.int64)
    first = frames[0]
    unigrams[first["w1"].to_numpy()] = first["count"].to_numpy()
    keys, counts, suffix = [np.arange(V, dtype=np.int64)], [unigrams], [np.zeros(V, dtype=np.int64)]
    for n, frame in enumerate(frames[1:], start=2):
        words = frame[[f"w{k + 1}" for k in range(n)]].to_numpy(np.int64)  # (G, n)
        prefix = _rows_of(keys, words[:, :-1])  # (G,)
        if np.any(prefix < 0):
            raise ValueError(f"order-{n} counts hold n-grams whose prefix is missing from order {n - 1}")
        key = prefix * V + words[:, -1]
        order = np.argsort(key, kind="stable")
        keys.append(key[order])
        counts.append(frame["count"].to_numpy(np.int64)[order])
        suffix.append(_rows_of(keys, words[order, 1:]))
    return NgramCounts(V, tuple(keys), tuple(counts), tuple(suffix))


# ------------------------------------------------------------------------------------------- estimation


@dataclass(frozen=True)
class BackoffModel:
    """A backoff n-gram model, what an ARPA file stores, in the table layout of the module docstring."""

    vocab_size: int
    keys: tuple[np.ndarray, ...]  # [n-1]: (G_n,) int64 sorted; order 1 is arange(V)
    log10_prob: tuple[np.ndarray, ...]  # [n-1]: (G_n,) float64 log10 p(w_n | w_1 .. w_{n-1})
    log10_backoff: tuple[np.ndarray, ...]  # [n-1]: (G_n,) float64 log10 b(w_1 .. w_n); 0 if not a context

    @property
    def order(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class KneserNey:
    """An estimated model with what went into it."""

    model: BackoffModel
    discounts: np.ndarray  # (N, 3) float64: D1, D2, D3+ of each order
    counts_of_counts: np.ndarray  # (N, 4) int64: n1..n4 of the adjusted counts of each order
    warnings: tuple[str, ...]  # one per order that fell back to the configured discounts


def _discounts(n: int, coc: np.ndarray, fallback: Sequence[float]) -> tuple[np.ndarray, str | None]:
    """Eq. 26: Y = n1 / (n1 + 2 n2), D_j = j - (j + 1) Y n_{j+1} / n_j, or the fallback when undefined.

    KenLM rejects D_j outside [0, j]; we also reject D_j = 0, which would make gamma(h) = 0 (log10 b = -inf)
    for a context whose continuations all share that count.
    """
    n1, n2, n3, n4 = (float(x) for x in coc)
    if n1 > 0 and n2 > 0 and n3 > 0:
        y = n1 / (n1 + 2.0 * n2)
        d = np.array([1.0 - 2.0 * y * n2 / n1, 2.0 - 3.0 * y * n3 / n2, 3.0 - 4.0 * y * n4 / n3])
        if np.all((d > 0.0) & (d <= np.array([1.0, 2.0, 3.0]))):
            return d, None
    used = np.asarray(fallback, dtype=np.float64)
    message = (
        f"order {n}: Kneser-Ney discounts undefined or out of range for counts-of-counts "
        f"n1={int(n1)} n2={int(n2)} n3={int(n3)} n4={int(n4)}; using fallback "
        f"D1={used[0]:g} D2={used[1]:g} D3+={used[2]:g}"
    )
    return used, message


def _log10_prob_inplace(p: np.ndarray, n: int) -> np.ndarray:
    """Step 5 on an order's probabilities, overwriting them: min(log10 p, 0), log10 p(<s>) = -99."""
    with np.errstate(divide="ignore"):
        np.log10(p, out=p)
    np.minimum(p, 0.0, out=p)  # rounding can push a probability a hair above 1
    if n == 1:
        p[BOS_ID] = LOG10_ZERO
    return p


def estimate_kneser_ney(counts: NgramCounts, config: NgramConfig) -> KneserNey:
    """Interpolated modified Kneser-Ney of order `config.order` from counts of that order or higher.

    Counts of order n do not depend on the highest order counted, so one `count_ngrams` at order N serves
    the models of every order 1..N.

    Steps 2-5 (module docstring) run one order at a time, lowest first: order n's adjusted counts and
    discounts need nothing from other orders, its probabilities need only order n-1's, and computing them
    settles order n-1's backoffs. So one order's intermediates are alive at a time (and of step 4's, one
    chunk of whole contexts: `_context_chunks`), and each order's probabilities turn into log10 in place
    once order n+1 has read them. The arithmetic is
    `estimate_kneser_ney_ref`'s, operation for operation, so the numbers are the same to the bit.
    """
    N, V = config.order, counts.vocab_size
    if N > counts.order:
        raise ValueError(f"model order {N} needs counts of order {N}, have {counts.order}")
    keys = counts.keys[:N]
    discounts, counts_of_counts, warnings = np.zeros((N, 3)), np.zeros((N, 4), dtype=np.int64), []
    log10_prob: list[np.ndarray] = []
    log10_backoff: list[np.ndarray] = []
    lower_p = np.full(V, 1.0 / (V - 1))  # order n-1's probabilities; for n = 1 the uniform distribution
    starts_bos = keys[0] == BOS_ID  # (G_n,) the row's first word is <s>
    for n in range(1, N + 1):
        n_context = len(keys[n - 2]) if n > 1 else 1  # rows of order n-1; for n = 1 the empty context
        if n > 1:
            starts_bos = starts_bos[keys[n - 1] // V]  # (G_n,) via the row of h in order n-1

        # Step 2 (adjust_counts.cc): raw counts at the top order, continuation counts below it; n-grams
        # starting with <s> keep raw counts.
        raw = counts.counts[n - 1]
        if n == N:
            used = raw.copy() if n == 1 else raw  # read only below, but for order 1's <s> entry
        else:
            used = np.where(starts_bos, raw, np.bincount(counts.suffix[n], minlength=len(raw)))  # N1+(. w_1^n)
        if n == 1:
            used[BOS_ID] = 0  # <s> is never predicted: no unigram mass
        # int32 (the top order's raw counts) or int64 (np.where's): each chunk below converts it to float64.

        # Step 3: counts-of-counts and discounts (eq. 26).
        counts_of_counts[n - 1] = np.bincount(np.minimum(used, 5), minlength=6)[1:5]
        discounts[n - 1], warning = _discounts(n, counts_of_counts[n - 1], config.discount_fallback)
        if warning:
            warnings.append(warning)

        # Step 4 (MKN), as in estimate_kneser_ney_ref, a chunk of whole contexts at a time.
        G = len(used)
        table = np.concatenate([[0.0], discounts[n - 1]])  # D(c) by min(c, 3); 0 if c = 0
        p = np.empty(G)  # (G_n,) p(w | h)
        gamma = np.zeros(n_context)  # (n_context,) 0 where h has no continuation
        for rows in _context_chunks(keys[n - 1], V, _ESTIMATE_ROWS):
            context = keys[n - 1][rows] // V  # (R,) nondecreasing, whole contexts
            first = int(context[0])
            local = context - first
            del context
            u = used[rows]
            c = u.astype(np.float64)  # (R,)
            d = table[np.minimum(u, 3)]  # (R,) D(c)
            total = np.bincount(local, weights=c)  # (H,) sum_w c(hw) of the chunk's contexts
            mass = np.bincount(local, weights=d)  # (H,) D1 N1 + D2 N2 + D3+ N3+
            g = np.divide(mass, total, out=np.zeros_like(total), where=total > 0)
            gamma[first : first + len(g)] = g
            del mass
            lower = lower_p[rows] if n == 1 else lower_p[counts.suffix[n - 1][rows]]  # (R,)
            np.subtract(c, d, out=c)  # c - d
            del d
            chunk = np.divide(c, total[local], out=np.zeros_like(c), where=u > 0)  # alpha
            del c, total, u
            scaled = g[local]
            np.multiply(scaled, lower, out=scaled)
            np.add(chunk, scaled, out=chunk)  # alpha + gamma * lower
            p[rows] = chunk
            del chunk, scaled, lower, local, g
        del used

        # Step 5 for order n-1, which order n has now read: b(h) = gamma(h) for every h that is a context.
        if n > 1:
            log10_prob.append(_log10_prob_inplace(lower_p, n - 1))
            log10_backoff.append(np.log10(gamma, out=np.zeros_like(gamma), where=gamma > 0))
        del gamma
        lower_p = p
    log10_prob.append(_log10_prob_inplace(lower_p, N))
    log10_backoff.append(np.zeros(len(lower_p)))  # calloc'd: costs no memory until written
    model = BackoffModel(V, tuple(keys), tuple(log10_prob), tuple(log10_backoff))
    return KneserNey(model, discounts, counts_of_counts, tuple(warnings))


def estimate_kneser_ney_ref(counts: NgramCounts, config: NgramConfig) -> KneserNey:
    """Reference for `estimate_kneser_ney`: each step over every order before the next step."""
    N, V = config.order, counts.vocab_size
    if N > counts.order:
        raise ValueError(f"model order {N} needs counts of order {N}, have {counts.order}")
    keys = counts.keys[:N]

    # First word of every row: n-grams starting with <s> keep raw counts.
    first = [keys[0]]
    for n in range(2, N + 1):
        first.append(first[-1][keys[n - 1] // V])

    # Step 2 (adjust_counts.cc): raw counts at the top order, continuation counts below it.
    used = []
    for n in range(1, N + 1):
        raw = counts.counts[n - 1]
        if n == N:
            c = raw.copy()
        else:
            continuation = np.bincount(counts.suffix[n], minlength=len(raw))  # (G_n,) N1+(. w_1^n)
            c = np.where(first[n - 1] == BOS_ID, raw, continuation)
        if n == 1:
            c[BOS_ID] = 0  # <s> is never predicted: no unigram mass
        used.append(c.astype(np.int64))

    # Step 3: counts-of-counts and discounts per order (eq. 26).
    counts_of_counts = np.stack([np.bincount(np.minimum(c, 5), minlength=6)[1:5] for c in used])  # (N, 4)
    discounts, warnings = np.zeros((N, 3)), []
    for n in range(1, N + 1):
        discounts[n - 1], warning = _discounts(n, counts_of_counts[n - 1], config.discount_fallback)
        if warning:
            warnings.append(warning)

    # Step 4 (MKN): p(w | h) = (c(hw) - D(c(hw))) / sum_w' c(hw') + gamma(h) p(w | h'),
    # gamma(h) = (D1 N1(h.) + D2 N2(h.) + D3+ N3+(h.)) / sum_w' c(hw'), lowest order first, where c is the
    # adjusted count of step 2 and N_j(h.) counts the words whose c(hw) is j (3 or more for N3+).
    probs: list[np.ndarray] = []
    gammas: list[np.ndarray] = []  # [n-1]: (G_{n-1},) gamma of every order n-1 row as a context of order n
    for n in range(1, N + 1):
        c = used[n - 1].astype(np.float64)  # (G_n,)
        d = np.concatenate([[0.0], discounts[n - 1]])[np.minimum(used[n - 1], 3)]  # (G_n,) D(c), 0 if c = 0
        context = keys[n - 1] // V if n > 1 else np.zeros(V, dtype=np.int64)  # (G_n,) row of h in order n-1
        n_context = len(keys[n - 2]) if n > 1 else 1
        total = np.bincount(context, weights=c, minlength=n_context)  # (n_context,) sum_w c(hw)
        mass = np.bincount(context, weights=d, minlength=n_context)  # (n_context,) D1 N1 + D2 N2 + D3+ N3+
        gamma = np.divide(mass, total, out=np.zeros(n_context), where=total > 0)
        lower = np.full(V, 1.0 / (V - 1)) if n == 1 else probs[n - 2][counts.suffix[n - 1]]  # (G_n,)
        alpha = np.divide(c - d, total[context], out=np.zeros_like(c), where=c > 0)
        probs.append(alpha + gamma[context] * lower)
        gammas.append(gamma)

    # Step 5: the backoff form. b(h) = gamma(h) for every h that is a context, 1 otherwise.
    log10_prob, log10_backoff = [], []
    for n in range(1, N + 1):
        p = probs[n - 1]
        with np.errstate(divide="ignore"):
            lp = np.minimum(np.log10(p), 0.0)  # rounding can push a probability a hair above 1
        if n == 1:
            lp[BOS_ID] = LOG10_ZERO
        log10_prob.append(lp)
        if n < N:
            g = gammas[n]  # (G_n,)
            log10_backoff.append(np.log10(g, out=np.zeros_like(g), where=g > 0))
        else:
            log10_backoff.append(np.zeros(len(p)))
    model = BackoffModel(V, tuple(keys), tuple(log10_prob), tuple(log10_backoff))
    return KneserNey(model, discounts, counts_of_counts.astype(np.int64), tuple(warnings))


# ---------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class StreamScores:
    token_log10: np.ndarray  # (L,) float64 log10 p of each token given its sentence so far; 0.0 at <s>
    sentence_log10: np.ndarray  # (S,) float64 sum over each sentence
    predicted: int  # tokens that count: all but <s>

    @property
    def perplexity(self) -> float:
        return float(10.0 ** (-self.sentence_log10.sum() / self.predicted))


def _shift(a: np.ndarray, k: int) -> np.ndarray:
    """out[j] = a[j - k], -1 for j < k."""
    out = np.full(len(a), -1, dtype=a.dtype)
    if k < len(a):  # a stream shorter than the context (a one-word sentence) has no j >= k
        out[k:] = a[: len(a) - k]
    return out


def score_stream(model: BackoffModel, stream: np.ndarray) -> StreamScores:
    """Backoff scoring of every token (ARPA semantics, as KenLM queries it):

    log10 p(w | h) = log10 p(h_k w) + sum_{m=k}^{|h|} log10 b(h_m), where h_k w is the longest n-gram in
    the model ending in w and h_m the last m words of h. The context of a token is its sentence so far,
    `<s>` included, cut to N-1 words.
    """
    words, starts, ends = _check_stream(stream, model.vocab_size)
    N, V, L = model.order, model.vocab_size, len(words)
    sentence = np.cumsum(words == BOS_ID) - 1  # (L,)
    left = ends[sentence] - np.arange(L)  # (L,) tokens until the sentence ends
    depth = np.arange(L) - starts[sentence]  # (L,) words before a token within its sentence (<s> included)

    # rows[n-1][i]: row of the n-gram starting at i, -1 if it is not in the model or crosses the sentence.
    rows = [words]
    for n in range(2, N + 1):
        prev = rows[-1]
        pos = np.flatnonzero((left >= n) & (prev >= 0))  # (P,)
        key = prev[pos] * V + words[pos + n - 1]  # (P,) int64
        table = model.keys[n - 1]
        row = np.full(L, -1, dtype=np.int64)
        if len(table):
            at = np.minimum(np.searchsorted(table, key), len(table) - 1)  # (P,)
            hit = table[at] == key
            row[pos[hit]] = at[hit]
        rows.append(row)

    token = np.zeros(L)  # (L,)
    longest = np.zeros(L, dtype=np.int64)  # (L,) order of the longest n-gram found ending at each token
    for n in range(1, N + 1):
        r = _shift(rows[n - 1], n - 1)  # (L,) the n-gram ending at j
        hit = (depth >= n - 1) & (r >= 0)
        token[hit] = model.log10_prob[n - 1][r[hit]]
        longest[hit] = n
    for m in range(1, N):
        r = _shift(rows[m - 1], m)  # (L,) the m-word context ending just before j
        use = (depth >= m) & (r >= 0) & (longest <= m)
        token[use] += model.log10_backoff[m - 1][r[use]]
    token[words == BOS_ID] = 0.0
    return StreamScores(token, np.add.reduceat(token, starts), L - len(starts))


def next_word_log10(model: BackoffModel, context: Sequence[int]) -> np.ndarray:
    """(V,) float64 log10 p(w | context) for every word w, by the same backoff rule as `score_stream`.

    `context` is a list of word ids; words before its last `<s>` belong to an earlier sentence and are
    dropped, then it is cut to its last N-1 words. Summing 10**p over w != `<s>` gives 1.
    """
    N, V = model.order, model.vocab_size
    ctx = [int(w) for w in context]
    if any(not 0 <= w < V for w in ctx):
        raise ValueError(f"context has ids outside the vocabulary [0, {V})")
    if BOS_ID in ctx:
        ctx = ctx[len(ctx) - 1 - ctx[::-1].index(BOS_ID) :]
    ctx = ctx[max(len(ctx) - (N - 1), 0) :] if N > 1 else []
    M = len(ctx)
    # Row of the last m words of the context in the order-m table (-1 if absent), m = 1..M.
    ctx_row = [-1] + [int(_rows_of(model.keys, np.array([ctx[M - m :]]))[0]) for m in range(1, M + 1)]

    every = np.arange(V, dtype=np.int64)
    out = model.log10_prob[0].copy()  # (V,)
    longest = np.ones(V, dtype=np.int64)
    for n in range(2, M + 2):
        r, table = ctx_row[n - 1], model.keys[n - 1]
        if r < 0 or len(table) == 0:
            continue
        key = r * V + every  # (V,)
        at = np.minimum(np.searchsorted(table, key), len(table) - 1)
        hit = table[at] == key
        out[hit] = model.log10_prob[n - 1][at[hit]]
        longest[hit] = n
    for m in range(1, M + 1):
        if ctx_row[m] >= 0:
            out[longest <= m] += model.log10_backoff[m - 1][ctx_row[m]]
    return out


# ------------------------------------------------------------------------------------------------- ARPA


def _lines_bytes(lines: pa.Array) -> bytes:
    """The bytes of a string array whose items end in a newline: its value buffer between the first and
    last offsets, i.e. every line back to back, without a Python loop."""
    width = np.int64 if pa.types.is_large_string(lines.type) else np.int32
    offsets = np.frombuffer(lines.buffers()[1], dtype=width)[lines.offset : lines.offset + len(lines) + 1]
    return lines.buffers()[2][int(offsets[0]) : int(offsets[-1])].to_pybytes()


def arpa_chunks(
    model: BackoffModel, vocab: list[str], rows_per_chunk: int = 1 << 16, threads: int = 1
) -> Iterator[bytes]:
    """The model as an ARPA file, in chunks to write one after another; `threads` format chunks at once.

    Lines are built column-wise with Arrow compute (take, join, float->string), whose kernels release the
    GIL, so threads format the next chunks while the caller writes this one; at most `threads` + 1 chunks
    are held. 65536 rows a chunk: the held chunks' Arrow columns are then ~47 MB over the model's own
    tables at 10M tokens, where 262144 rows raised the whole run's peak RSS from 0.63 to 0.66 GiB at the
    same speed (benchmarks/bench_ngram.py). Numbers are written as the shortest decimal that round-trips a
    float32, as KenLM stores them; the backoff field is omitted where it is 0 and always at the highest order.
    """
    N = model.order
    if len(vocab) != model.vocab_size:
        raise ValueError(f"vocab has {len(vocab)} words, the model {model.vocab_size}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    bad = [w for w in vocab if not w or any(ch.isspace() for ch in w)]
    if bad:
        raise ValueError(f"ARPA words cannot be empty or contain white space: {bad[:5]!r}")
    header = "\\data\\\n" + "".join(f"ngram {n}={len(k)}\n" for n, k in enumerate(model.keys, start=1))
    yield header.encode()
    words = pa.array(vocab, type=pa.string())
    jobs = [
        (n, slice(lo, min(lo + rows_per_chunk, len(model.keys[n - 1]))))
        for n in range(1, N + 1)
        for lo in range(0, len(model.keys[n - 1]), rows_per_chunk)
    ]
    with ThreadPoolExecutor(threads) as pool:
        ahead: deque = deque()
        section = 0
        for i in range(len(jobs) + threads):
            if i < len(jobs):
                ahead.append((jobs[i][0], pool.submit(_arpa_lines, model, words, *jobs[i])))
            if i >= threads:
                n, chunk = ahead.popleft()
                if n != section:  # chunks of order n come in row order, after the order's header
                    section = n
                    yield f"\n\\{n}-grams:\n".encode()
                yield chunk.result()
        for n in range(section + 1, N + 1):  # orders without rows (none on real counts)
            yield f"\n\\{n}-grams:\n".encode()
    yield b"\n\\end\\\n"


def _arpa_lines(model: BackoffModel, words: pa.Array, n: int, rows: slice) -> bytes:
    """ARPA lines `prob<TAB>w1 .. wn[<TAB>backoff]` of the given rows of order n, each ending in a newline."""
    ids = ngram_words(model.keys, n, rows)  # (R, n) int32
    gram = pc.binary_join_element_wise(*(words.take(pa.array(ids[:, k])) for k in range(n)), " ")
    del ids
    prob = pc.cast(pa.array(model.log10_prob[n - 1][rows].astype(np.float32)), pa.string())
    if n < model.order:
        backoff = model.log10_backoff[n - 1][rows]
        # Null where the backoff is 0, and a null field is skipped with its separator.
        written = pc.cast(pa.array(backoff.astype(np.float32), mask=backoff == 0.0), pa.string())
        line = pc.binary_join_element_wise(prob, gram, written, "\t", null_handling="skip")
    else:
        line = pc.binary_join_element_wise(prob, gram, "\t")
    return _lines_bytes(pc.binary_join_element_wise(line, "", "\n"))


def arpa_values(x: np.ndarray) -> np.ndarray:
    """(R,) float64: each value as an ARPA reader gets it back from `arpa_chunks`' text, i.e. the float32's
    shortest decimal parsed as a float64 (not the float32 itself: 0.1f is 0.100000001..., "0.1" is not)."""
    text = pc.cast(pa.array(np.asarray(x).astype(np.float32)), pa.string())
    return pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)


def model_tables(model: BackoffModel, vocab: list[str]) -> list[pa.Table]:
    """The model as one table per order, holding exactly what `parse_arpa` reads from `arpa_chunks`' file,
    for a reader that needs it fast (`model_from_tables`; `kiln score`).

    Order n: `w1..wn` (int32 word ids), for n = 1 also `word` (the vocabulary), for n >= 2 `context` (int32,
    the row of w1..w_{n-1} in the order n-1 table), `log10_prob` and `log10_backoff` (float64, the ARPA
    file's numbers; backoff 0 where the file has none). Rows in the sorted table order.
    """
    if len(vocab) != model.vocab_size:
        raise ValueError(f"vocab has {len(vocab)} words, the model {model.vocab_size}")
    V, tables = model.vocab_size, []
    for n in range(1, model.order + 1):
        ids = ngram_words(model.keys, n)  # (G, n) int32
        columns: dict[str, pa.Array] = {f"w{k + 1}": pa.array(ids[:, k]) for k in range(n)}
        del ids
        if n == 1:
            columns["word"] = pa.array(vocab, type=pa.string())
        else:
            columns["context"] = pa.array((model.keys[n - 1] // V).astype(np.int32))
        columns["log10_prob"] = pa.array(arpa_values(model.log10_prob[n - 1]))
        columns["log10_backoff"] = pa.array(arpa_values(model.log10_backoff[n - 1]))
        tables.append(pa.table(columns))
    return tables


def model_from_tables(tables: Sequence[pa.Table]) -> tuple[BackoffModel, list[str]]:
    """Inverse of `model_tables`: the model and vocabulary `parse_arpa` gives for the same model's ARPA file.

    Reads only `word` / `context`, the last word column, `log10_prob` and `log10_backoff`: a key is
    `context * V + w_n`, so no n-gram is looked up.
    """
    if not tables:
        raise ValueError("no model tables")
    vocab = tables[0].column("word").to_pylist()
    V = len(vocab)
    keys, log10_prob, log10_backoff = [np.arange(V, dtype=np.int64)], [], []
    for n, table in enumerate(tables, start=1):
        if n > 1:
            key = table.column("context").to_numpy().astype(np.int64) * V + table.column(f"w{n}").to_numpy()
            if len(key) and (np.any(key[1:] <= key[:-1]) or key[0] < 0 or key[-1] >= len(keys[-1]) * V):
                raise ValueError(f"model table of order {n} is not in the sorted table order")
            keys.append(key)
        elif not np.array_equal(table.column("w1").to_numpy(), keys[0]):
            raise ValueError("model table of order 1 does not hold every word id once, in order")
        log10_prob.append(table.column("log10_prob").to_numpy().astype(np.float64, copy=False))
        log10_backoff.append(table.column("log10_backoff").to_numpy().astype(np.float64, copy=False))
    return BackoffModel(V, tuple(keys), tuple(log10_prob), tuple(log10_backoff)), vocab


_NGRAM_COUNT = re.compile(r"ngram\s+(\d+)\s*=\s*(\d+)$")
_SECTION = re.compile(r"\\(\d+)-grams:$")


def parse_arpa(lines: Iterable[str]) -> tuple[BackoffModel, list[str]]:
    """Read an ARPA file (as lines) into a `BackoffModel` and its vocabulary.

    The vocabulary is `<unk>`, `<s>`, `</s>` (ids 0, 1, 2, as in models/text/tokenizer.py) then the other
    unigrams in file order. Every n-gram's prefix must be in the model (as lmplz writes them). Malformed
    input raises ValueError naming the line.
    """
    numbered = ((i, raw.strip()) for i, raw in enumerate(lines, start=1))
    lineno = 0

    def fail(message: str, at: int | None = None) -> ValueError:
        return ValueError(f"ARPA line {lineno if at is None else at}: {message}")

    def next_line() -> str:
        """The next non-blank line."""
        nonlocal lineno
        for lineno, text in numbered:  # noqa: B007  (lineno is the nonlocal the caller reads)
            if text:
                return text
        lineno += 1
        raise fail("unexpected end of file")

    while next_line() != "\\data\\":
        pass
    sizes: list[int] = []
    text = next_line()
    while not text.startswith("\\"):
        match = _NGRAM_COUNT.match(text)
        if not match:
            raise fail(f"expected 'ngram N=count', got {text[:80]!r}")
        if int(match.group(1)) != len(sizes) + 1:
            raise fail(f"expected the count of order {len(sizes) + 1}, got order {match.group(1)}")
        sizes.append(int(match.group(2)))
        text = next_line()
    if not sizes:
        raise fail("no 'ngram N=count' lines after \\data\\")
    N = len(sizes)

    index: dict[str, int] = {}
    vocab: list[str] = []
    grams: list[list[list[int]]] = []  # [n-1]: word ids of each n-gram, file order
    numbers: list[tuple[list[float], list[float], list[int]]] = []  # [n-1]: probs, backoffs, line numbers
    unigram_header = 0
    for n in range(1, N + 1):
        match = _SECTION.match(text)
        if not match or int(match.group(1)) != n:
            raise fail(f"expected '\\{n}-grams:', got {text[:80]!r}")
        unigram_header = unigram_header or lineno
        ids_n: list[list[int]] = []
        probs, backoffs, where = [], [], []
        for _ in range(sizes[n - 1]):
            fields = next_line().split()
            if len(fields) not in ((n + 1, n + 2) if n < N else (n + 1,)):
                raise fail(
                    f"an order-{n} line needs a log10 prob, {n} word{'s' if n > 1 else ''}"
                    + (" and an optional backoff" if n < N else " and no backoff (highest order)")
                )
            try:
                values = [float(x) for x in (fields[0], *fields[n + 1 :])]  # log10 prob [, log10 backoff]
            except ValueError:
                raise fail(f"not a number in {' '.join(fields)[:80]!r}") from None
            if any(math.isnan(x) for x in values):
                raise fail("NaN in an n-gram line")
            if n == 1:
                word = fields[1]
                if word in index:
                    raise fail(f"duplicate unigram {word!r}")
                index[word] = len(vocab)
                vocab.append(word)
                ids = [index[word]]
            else:
                try:
                    ids = [index[w] for w in fields[1 : n + 1]]
                except KeyError as e:
                    raise fail(f"word {e.args[0]!r} is not a unigram") from None
            ids_n.append(ids)
            probs.append(values[0])
            backoffs.append(values[1] if len(values) > 1 else 0.0)
            where.append(lineno)
        grams.append(ids_n)
        numbers.append((probs, backoffs, where))
        text = next_line()
    if text != "\\end\\":
        raise fail(f"expected '\\end\\', got {text[:80]!r}")

    # Renumber so the specials are ids 0, 1, 2 and the others follow in file order.
    missing = [w for w in (UNK, BOS, EOS) if w not in index]
    if missing:
        raise fail(f"the unigrams lack {missing}", at=unigram_header)
    new_vocab = [UNK, BOS, EOS] + [w for w in vocab if w not in (UNK, BOS, EOS)]
    V = len(new_vocab)
    remap = np.empty(V, dtype=np.int64)
    remap[[index[w] for w in new_vocab]] = np.arange(V)  # old id -> new id

    keys: list[np.ndarray] = [np.arange(V, dtype=np.int64)]
    log10_prob: list[np.ndarray] = []
    log10_backoff: list[np.ndarray] = []
    for n in range(1, N + 1):
        probs, backoffs, where = (np.asarray(x) for x in numbers[n - 1])
        ids = remap[np.asarray(grams[n - 1], dtype=np.int64).reshape(-1, n)]  # (G, n)
        if n == 1:
            order = np.argsort(ids[:, 0])
        else:
            prefix = _rows_of(keys, ids[:, :-1])  # (G,)
            if np.any(prefix < 0):
                orphan = int(where[np.argmax(prefix < 0)])
                raise fail(f"the context of this {n}-gram is not an order-{n - 1} n-gram", at=orphan)
            key = prefix * V + ids[:, -1]
            order = np.argsort(key, kind="stable")
            key = key[order]
            same = np.flatnonzero(key[1:] == key[:-1])
            if len(same):
                raise fail(f"duplicate {n}-gram", at=int(where[order[same[0] + 1]]))
            keys.append(key)
        log10_prob.append(probs[order].astype(np.float64))
        log10_backoff.append(backoffs[order].astype(np.float64))
    return BackoffModel(V, tuple(keys), tuple(log10_prob), tuple(log10_backoff)), new_vocab
