"""models/text/ngram.py: counts, modified Kneser-Ney by hand, normalisation, KenLM parity, ARPA round trip."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from models.text.ngram import (
    NgramConfig,
    arpa_chunks,
    count_ngrams,
    counts_frame,
    counts_from_frames,
    estimate_kneser_ney,
    next_word_log10,
    parse_arpa,
    score_stream,
)
from models.text.tokenizer import BOS_ID, EOS_ID, UNK_ID, build_vocab, encode, tokenize_document
from tests.conftest import reference

# ----------------------------------------------------------------------------------- the hand corpus
# Seven sentences over a, b, c; the vocabulary also holds <unk>, never seen, so V = 6 and the uniform
# distribution gives each word but <s> 1/5. S = <s>, E = </s>.
HAND_SENTENCES = [s.split() for s in ["a a", "a b a", "b b", "b b a", "b b", "b b a", "c a"]]
HAND_VOCAB = ["<unk>", "<s>", "</s>", "a", "b", "c"]


@pytest.fixture(scope="module")
def hand():
    stream = encode(HAND_SENTENCES, HAND_VOCAB)
    counts = count_ngrams(stream, len(HAND_VOCAB), 3)
    return estimate_kneser_ney(counts, NgramConfig(order=3))


def test_hand_counts_of_counts_and_discounts(hand):
    # Trigrams, raw counts: S b b 4; b a E 3; b b E 2, b b a 2; S a a, a a E, S a b, a b a, S c a, c a E 1.
    # Bigrams, continuation counts (distinct words before them) except S-bigrams, which keep raw counts:
    #   S b 4; a E 3 (a, b, c before it); S a 2, b a 2 (a, b); a a, a b, b b, b E, c a 1 (only S or one
    #   word before), S c 1.
    # Unigrams, continuation counts: a 4 (S, a, b, c), b 3 (S, a, b), E 2 (a, b), c 1 (S); <unk>, <s> 0.
    coc = {1: (1, 1, 1, 1), 2: (6, 2, 1, 1), 3: (6, 2, 1, 1)}
    assert hand.counts_of_counts.tolist() == [list(coc[n]) for n in (1, 2, 3)]

    for n, (n1, n2, n3, n4) in coc.items():  # eq. 26
        y = n1 / (n1 + 2 * n2)
        expected = [1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3]
        assert hand.discounts[n - 1] == pytest.approx(expected, abs=1e-12)
    # Written out: order 1 Y = 1/3 -> 1/3, 1, 5/3; orders 2, 3 Y = 0.6 -> 0.6, 1.1, 0.6.
    written_out = [[1 / 3, 1, 5 / 3], [0.6, 1.1, 0.6], [0.6, 1.1, 0.6]]
    np.testing.assert_allclose(hand.discounts, written_out, rtol=0, atol=1e-12)
    assert hand.warnings == ()


def _hand_probabilities() -> dict[str, float]:
    """p_MKN (Chen & Goodman sec. 3) by hand for the hand corpus, trigram model."""
    u1, u2, u3 = 1 / 3, 1.0, 5 / 3  # unigram D1, D2, D3+
    d1, d2, d3 = 0.6, 1.1, 0.6  # bigram and trigram D1, D2, D3+
    # Unigrams: continuation counts a 4, b 3, E 2, c 1, total 10; gamma = (D1 N1 + D2 N2 + D3+ N3+) / 10.
    g0 = (u1 * 1 + u2 * 1 + u3 * 2) / 10
    p1 = {
        "a": (4 - u3) / 10 + g0 / 5,
        "b": (3 - u3) / 10 + g0 / 5,
        "c": (1 - u1) / 10 + g0 / 5,
        "E": (2 - u2) / 10 + g0 / 5,
        "unk": g0 / 5,
    }
    # Bigram context b: b a 2, b b 1, b E 1 (continuation counts), total 4.
    g_b = (d2 * 1 + d1 * 2) / 4
    p2_a_b = (2 - d2) / 4 + g_b * p1["a"]
    p2_E_b = (1 - d1) / 4 + g_b * p1["E"]
    # Bigram context S: S a 2, S b 4, S c 1 (raw counts), total 7.
    g_S = (d1 * 1 + d2 * 1 + d3 * 1) / 7
    # Trigram contexts: b b -> a 2, E 2 (total 4); S b -> b 4 (total 4); a b -> a 1 (total 1).
    g_bb, g_Sb, g_ab = (d2 * 2) / 4, (d3 * 1) / 4, (d1 * 1) / 1
    return {
        "a|b b": (2 - d2) / 4 + g_bb * p2_a_b,
        "c|S": (1 - d1) / 7 + g_S * p1["c"],
        "E|S b": g_Sb * p2_E_b,  # S b E was never seen: all of it comes through gamma(S b)
        "unk|a b": g_ab * g_b * p1["unk"],  # <unk> never occurs: the uniform share, twice backed off
        "a|a b": (1 - d1) / 1 + g_ab * p2_a_b,
        "sum1": sum(p1.values()),
    }


def test_hand_probabilities(hand):
    want = _hand_probabilities()
    assert want["sum1"] == pytest.approx(1.0, abs=1e-12)  # the hand arithmetic itself is consistent
    S, a, b, c, E = BOS_ID, 3, 4, 5, EOS_ID
    model = hand.model
    cases = {
        "a|b b": ([S, b, b], a),
        "c|S": ([S], c),
        "E|S b": ([S, b], E),
        "unk|a b": ([S, a, b], UNK_ID),
        "a|a b": ([S, a, b], a),
    }
    for name, (context, word) in cases.items():
        assert 10 ** next_word_log10(model, context)[word] == pytest.approx(want[name], abs=1e-9), name

    # The stream scorer agrees: S c a E and S b E score c|S and E|S b; S a b a scores a|a b.
    scores = score_stream(model, np.array([S, c, a, E, S, b, E, S, a, b, a, E], dtype=np.int32))
    assert 10 ** scores.token_log10[1] == pytest.approx(want["c|S"], abs=1e-9)
    assert 10 ** scores.token_log10[6] == pytest.approx(want["E|S b"], abs=1e-9)
    assert 10 ** scores.token_log10[10] == pytest.approx(want["a|a b"], abs=1e-9)
    assert scores.token_log10[[0, 4, 7]].tolist() == [0.0, 0.0, 0.0]  # <s> is not predicted
    assert scores.predicted == 9
    assert scores.sentence_log10.sum() == pytest.approx(scores.token_log10.sum(), abs=1e-12)
    assert scores.perplexity == pytest.approx(10 ** (-scores.token_log10.sum() / 9), rel=1e-12)


def test_streams_shorter_than_the_order_score():
    """A one-word sentence (`<s> c </s>`: 3 tokens) under an order-5 model, shorter than the context the
    scorer shifts in, gets each token's probability (`kiln score hello` raised a broadcast error)."""
    S, c, E = BOS_ID, 5, EOS_ID
    stream = encode(HAND_SENTENCES, HAND_VOCAB)
    model = estimate_kneser_ney(count_ngrams(stream, len(HAND_VOCAB), 5), NgramConfig(order=5)).model
    short = score_stream(model, np.array([S, c, E], dtype=np.int32))
    assert short.predicted == 2
    assert short.token_log10[1] == pytest.approx(next_word_log10(model, [S])[c], abs=1e-12)
    assert short.token_log10[2] == pytest.approx(next_word_log10(model, [S, c])[E], abs=1e-12)


def test_undefined_discounts_fall_back_with_warning():
    # One sentence: every adjusted count is 1, so n2 = 0 and eq. 26 is undefined at both orders.
    vocab = ["<unk>", "<s>", "</s>", "x", "y"]
    counts = count_ngrams(encode([["x", "y"]], vocab), len(vocab), 2)
    kn = estimate_kneser_ney(counts, NgramConfig(order=2, discount_fallback=[0.4, 0.9, 1.2]))
    assert kn.discounts.tolist() == [[0.4, 0.9, 1.2], [0.4, 0.9, 1.2]]
    assert len(kn.warnings) == 2
    assert "order 1" in kn.warnings[0] and "n1=3 n2=0 n3=0 n4=0" in kn.warnings[0]  # x, y, E once each
    assert "order 2" in kn.warnings[1] and "n1=3 n2=0" in kn.warnings[1]  # S x, x y, y E
    for lp in (*kn.model.log10_prob, *kn.model.log10_backoff):
        assert np.all(np.isfinite(lp))
    p = next_word_log10(kn.model, [BOS_ID, 3])
    assert np.all(np.isfinite(p))
    assert (10 ** np.delete(p, BOS_ID)).sum() == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------------------------- pydoc corpus


@pytest.fixture(scope="module")
def pydoc():
    from pydoc_data.topics import topics

    sentences = [s for key in sorted(topics) for s in tokenize_document(topics[key])]
    train, test = sentences[:-300], sentences[-300:]
    vocab = build_vocab(train, min_count=2)
    counts = count_ngrams(encode(train, vocab), len(vocab), 5)
    return vocab, counts, encode(train, vocab), test


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_sums_to_one(pydoc, order):
    vocab, counts, train, _ = pydoc
    model = estimate_kneser_ney(counts, NgramConfig(order=order)).model
    rng = np.random.default_rng(order)
    starts = np.flatnonzero(train == BOS_ID)
    contexts = [[], [BOS_ID], [BOS_ID, UNK_ID, UNK_ID], list(rng.integers(3, len(vocab), 4))]  # some unseen
    depth = np.arange(len(train)) - starts[np.searchsorted(starts, np.arange(len(train)), side="right") - 1]
    for m in range(1, order):  # seen contexts of every length, some starting at <s>
        for j in rng.choice(np.flatnonzero(depth >= m), 4):
            contexts.append(list(train[j - m : j]))
    for context in contexts:
        p = 10 ** next_word_log10(model, context)
        assert np.delete(p, BOS_ID).sum() == pytest.approx(1.0, abs=1e-6), context


@pytest.mark.parametrize("order", [2, 3, 5])
def test_matches_kenlm(pydoc, order, tmp_path):
    kenlm = reference("kenlm")
    vocab, counts, _, test = pydoc
    model = estimate_kneser_ney(counts, NgramConfig(order=order)).model
    path = tmp_path / "model.arpa"
    with open(path, "wb") as f:
        for chunk in arpa_chunks(model, vocab, rows_per_chunk=5000):  # several chunks per order
            f.write(chunk)
    lm = kenlm.Model(str(path))
    assert lm.order == order

    stream = encode(test, vocab)
    ours = score_stream(model, stream)
    starts = np.flatnonzero(stream == BOS_ID)
    ends = np.append(starts[1:], len(stream))
    with_unk = 0
    for i, (start, end) in enumerate(zip(starts, ends)):
        words = [vocab[w] for w in stream[start + 1 : end - 1]]
        with_unk += "<unk>" in words
        sentence = " ".join(words)
        theirs = np.array([prob for prob, _, _ in lm.full_scores(sentence, bos=True, eos=True)])
        mine = ours.token_log10[start + 1 : start + 2 + len(words)]
        np.testing.assert_allclose(mine, theirs, atol=1e-4)
        assert ours.sentence_log10[i] == pytest.approx(theirs.sum(), abs=1e-4)
        if len(words) < 200:  # KenLM adds a sentence up in float32: long ones drift by more than 1e-4
            assert ours.sentence_log10[i] == pytest.approx(lm.score(sentence, bos=True, eos=True), abs=1e-4)
    assert with_unk >= 20  # the held-out text does exercise <unk>


def test_threads_change_nothing(pydoc):
    """Two threads count the natural text's n-grams and write its ARPA file exactly as one does."""
    vocab, counts, train, _ = pydoc
    two = count_ngrams(train, len(vocab), 5, threads=2)
    for field in ("keys", "counts", "suffix"):
        for a, b in zip(getattr(two, field), getattr(counts, field), strict=True):
            np.testing.assert_array_equal(a, b)
    model = estimate_kneser_ney(counts, NgramConfig(order=5)).model
    one = b"".join(arpa_chunks(model, vocab))
    assert b"".join(arpa_chunks(model, vocab, rows_per_chunk=777, threads=2)) == one
    assert b"".join(arpa_chunks(model, vocab, rows_per_chunk=10**6, threads=3)) == one  # fewer chunks than threads


def test_arpa_round_trip(pydoc):
    vocab, counts, _, test = pydoc
    model = estimate_kneser_ney(counts, NgramConfig(order=3)).model
    text = b"".join(arpa_chunks(model, vocab)).decode()
    back, back_vocab = parse_arpa(text.splitlines())
    assert back_vocab == vocab
    for n in range(3):
        np.testing.assert_array_equal(back.keys[n], model.keys[n])
        np.testing.assert_allclose(back.log10_prob[n], model.log10_prob[n], atol=1e-5)  # float32 in the file
        np.testing.assert_allclose(back.log10_backoff[n], model.log10_backoff[n], atol=1e-5)
    stream = encode(test, vocab)
    np.testing.assert_allclose(
        score_stream(back, stream).token_log10, score_stream(model, stream).token_log10, atol=1e-4
    )


def _arpa_lines(hand) -> list[str]:
    return b"".join(arpa_chunks(hand.model, HAND_VOCAB)).decode().splitlines()


def _order_of(line: str) -> int:
    fields = line.split("\t")
    return len(fields[1].split()) if len(fields) > 1 else 0


def _edit_first(lines: list[str], order: int, change) -> tuple[list[str], int]:
    """`lines` with the first n-gram line of `order` changed, and that line's number."""
    i = next(i for i, line in enumerate(lines) if _order_of(line) == order)
    return lines[:i] + [change(lines[i])] + lines[i + 1 :], i + 1


@pytest.mark.parametrize(
    "order, change, message",
    [
        (3, lambda line: "x" + line[line.index("\t") :], "not a number"),
        (2, lambda line: line.replace("\t", "\tzzz", 1), "not a unigram"),
        (3, lambda line: line + "\t-0.5", "3 words"),
        (1, lambda line: line.split("\t")[0], "1 word"),
    ],
)
def test_malformed_ngram_line_names_the_line(hand, order, change, message):
    good = _arpa_lines(hand)
    parse_arpa(good)
    bad, lineno = _edit_first(good, order, change)
    assert bad != good
    with pytest.raises(ValueError, match=rf"line {lineno}: .*{message}"):
        parse_arpa(bad)


def test_malformed_structure_names_the_line(hand):
    good = _arpa_lines(hand)
    header = next(i for i, line in enumerate(good) if line.startswith("ngram 2="))
    with pytest.raises(ValueError, match=rf"line {header + 1}: expected the count of order 2"):
        parse_arpa([line.replace("ngram 2=", "ngram 3=") for line in good])
    with pytest.raises(ValueError, match=rf"line {len(good)}: unexpected end of file"):
        parse_arpa(good[:-1])  # the \end\ line is missing
    with pytest.raises(ValueError, match="line 1: unexpected end of file"):
        parse_arpa([])


def test_duplicate_and_orphan_ngrams_raise(hand):
    good = _arpa_lines(hand)
    i = next(i for i, line in enumerate(good) if line.endswith("\tb a </s>"))
    duplicated = good[: i + 1] + [good[i]] + good[i + 1 :]
    duplicated = [line.replace("ngram 3=10", "ngram 3=11") for line in duplicated]
    with pytest.raises(ValueError, match=rf"line {i + 2}\b.*duplicate"):
        parse_arpa(duplicated)
    orphan = [line.replace("\tc a </s>", "\tc c </s>") for line in good]  # bigram c c does not exist
    j = next(j for j, line in enumerate(orphan) if line.endswith("\tc c </s>"))
    with pytest.raises(ValueError, match=rf"line {j + 1}\b.*context"):
        parse_arpa(orphan)


# ---------------------------------------------------------------------------------------------- counts


def test_counts_match_naive_counter():
    rng = random.Random(0)
    words = ["a", "b", "c", "d"]
    sentences = [[rng.choice(words) for _ in range(rng.randint(0, 7))] for _ in range(60)]
    vocab = ["<unk>", "<s>", "</s>", *words]
    stream = encode(sentences, vocab)
    counts = count_ngrams(stream, len(vocab), 4)
    for n in range(1, 5):
        naive: Counter[tuple[int, ...]] = Counter()
        for s in sentences:  # an n-gram lies inside <s> ... </s> and starts at <s> or later
            ids = [BOS_ID, *(vocab.index(w) for w in s), EOS_ID]
            naive.update(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
        frame = counts_frame(counts, n)
        assert list(frame.columns) == [f"w{k + 1}" for k in range(n)] + ["count"]
        assert all(frame[f"w{k + 1}"].dtype == np.int32 for k in range(n))
        assert frame["count"].dtype == np.int64
        ours = {tuple(int(x) for x in row[:-1]): int(row[-1]) for row in frame.itertuples(index=False)}
        assert ours == dict(naive)
        assert list(ours) == sorted(ours)  # rows come sorted

    # Rebuilt from the frames (as read back from Parquet) the counts estimate the same model.
    again = counts_from_frames([counts_frame(counts, n) for n in range(1, 5)], len(vocab))
    for field in ("keys", "counts", "suffix"):
        for a, b in zip(getattr(counts, field), getattr(again, field), strict=True):
            np.testing.assert_array_equal(a, b)


def test_bad_streams_raise():
    with pytest.raises(ValueError):
        count_ngrams(np.array([3, 4], dtype=np.int32), 5, 2)  # no <s> ... </s>
    with pytest.raises(ValueError):
        count_ngrams(np.array([BOS_ID, 9, EOS_ID], dtype=np.int32), 5, 2)  # id outside the vocabulary
    counts = count_ngrams(np.array([BOS_ID, 3, EOS_ID], dtype=np.int32), 5, 2)
    with pytest.raises(ValueError, match="order 3"):
        estimate_kneser_ney(counts, NgramConfig(order=3))


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"order": 0}, "order"),
        ({"order": 2.0}, "order"),
        ({"order": True}, "order"),
        ({"discount_fallback": [0.5, 1.0]}, "discount_fallback"),
        ({"discount_fallback": [1.0, 1.0, 1.5]}, "discount_fallback"),
        ({"discount_fallback": [0.5, 0.0, 1.5]}, "discount_fallback"),
        ({"discount_fallback": [0.5, 1.0, 3.0]}, "discount_fallback"),
        ({"discount_fallback": [0.5, 1.0, math.nan]}, "discount_fallback"),
    ],
)
def test_invalid_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NgramConfig(**kwargs)


# ------------------------------------------------------------------------------- fast paths vs references


def _random_stream(rng: np.random.Generator, vocab_size: int, sentences: int) -> np.ndarray:
    """<s> ... </s> sentences of 0..8 words drawn from <unk> and the ordinary words (skewed, so n-grams repeat)."""
    pool = np.array([UNK_ID, *range(3, vocab_size)])
    weights = 1.0 / np.arange(1, len(pool) + 1)
    out: list[int] = []
    for _ in range(sentences):
        words = rng.choice(pool, int(rng.integers(0, 9)), p=weights / weights.sum())
        out += [BOS_ID, *words.tolist(), EOS_ID]
    return np.array(out, dtype=np.int32)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_count_ngrams_equals_reference(seed, threads):
    """Small vocabularies leave some of the first-word ranges empty, and one word may span several shares."""
    from models.text.ngram import count_ngrams_ref

    rng = np.random.default_rng(seed)
    vocab_size = int(rng.integers(4, 40))
    stream = _random_stream(rng, vocab_size, int(rng.integers(1, 300)))
    order = int(rng.integers(1, 7))
    fast = count_ngrams(stream, vocab_size, order, threads=threads)
    ref = count_ngrams_ref(stream, vocab_size, order)
    # The fast tables keep counts and rows as int32 (less memory); the values are the reference's.
    for field, dtype in (("keys", np.int64), ("counts", np.int32), ("suffix", np.int32)):
        for a, b in zip(getattr(fast, field), getattr(ref, field), strict=True):
            assert a.dtype == dtype
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("chunk_rows", [1 << 20, 7])
@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_estimate_equals_reference_to_the_bit(pydoc, order, chunk_rows, monkeypatch):
    """In one chunk per order, and in chunks of about 7 rows (thousands per order, contexts far longer than
    a chunk among them): per-chunk sums of whole contexts are the reference's sums, bit for bit."""
    from models.text import ngram
    from models.text.ngram import estimate_kneser_ney_ref

    monkeypatch.setattr(ngram, "_ESTIMATE_ROWS", chunk_rows)
    _, counts, _, _ = pydoc
    fast = estimate_kneser_ney(counts, NgramConfig(order=order))
    ref = estimate_kneser_ney_ref(counts, NgramConfig(order=order))
    np.testing.assert_array_equal(fast.discounts, ref.discounts)
    np.testing.assert_array_equal(fast.counts_of_counts, ref.counts_of_counts)
    assert fast.warnings == ref.warnings
    for field in ("keys", "log10_prob", "log10_backoff"):
        for a, b in zip(getattr(fast.model, field), getattr(ref.model, field), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)  # bit-identical, not merely close


@pytest.mark.parametrize("rows", [1, 3, 50])
def test_context_chunks_cover_every_row_and_split_no_context(pydoc, rows):
    from models.text.ngram import _context_chunks

    vocab, counts, _, _ = pydoc
    V = len(vocab)
    for keys in counts.keys:
        chunks = list(_context_chunks(keys, V, rows))
        assert [c.start for c in chunks] == [0] + [c.stop for c in chunks[:-1]] and chunks[-1].stop == len(keys)
        context = keys // V
        for chunk in chunks[1:]:
            assert context[chunk.start] != context[chunk.start - 1]  # a context never spans two chunks


def test_estimate_equals_reference_with_fallback_discounts():
    from models.text.ngram import estimate_kneser_ney_ref

    stream = _random_stream(np.random.default_rng(7), 6, 3)  # too few n-grams for eq. 26
    counts = count_ngrams(stream, 6, 3)
    fast = estimate_kneser_ney(counts, NgramConfig(order=3))
    ref = estimate_kneser_ney_ref(counts, NgramConfig(order=3))
    assert fast.warnings == ref.warnings and fast.warnings
    for a, b in zip(fast.model.log10_prob, ref.model.log10_prob, strict=True):
        np.testing.assert_array_equal(a, b)


def test_model_tables_hold_what_the_arpa_file_holds(pydoc):
    from models.text.ngram import model_from_tables, model_tables

    vocab, counts, _, _ = pydoc
    model = estimate_kneser_ney(counts, NgramConfig(order=4)).model
    parsed, parsed_vocab = parse_arpa(b"".join(arpa_chunks(model, vocab)).decode().splitlines())
    tables = model_tables(model, vocab)
    assert [t.num_rows for t in tables] == [len(k) for k in model.keys]
    assert tables[2].column_names == ["w1", "w2", "w3", "context", "log10_prob", "log10_backoff"]
    loaded, loaded_vocab = model_from_tables(tables)
    assert loaded_vocab == parsed_vocab == vocab
    for field in ("keys", "log10_prob", "log10_backoff"):
        for a, b in zip(getattr(loaded, field), getattr(parsed, field), strict=True):
            np.testing.assert_array_equal(a, b)  # the ARPA text's numbers exactly, not the float32s
    # The word columns are the n-grams themselves, for readers other than ours.
    np.testing.assert_array_equal(tables[1].column("w2").to_numpy(), model.keys[1] % len(vocab))


def test_model_tables_out_of_order_raise(pydoc):
    import pyarrow as pa

    from models.text.ngram import model_from_tables, model_tables

    vocab, counts, _, _ = pydoc
    tables = model_tables(estimate_kneser_ney(counts, NgramConfig(order=2)).model, vocab)
    shuffled = tables[1].take(pa.array(np.random.default_rng(0).permutation(tables[1].num_rows)))
    with pytest.raises(ValueError, match="order 2 is not in the sorted table order"):
        model_from_tables([tables[0], shuffled])
