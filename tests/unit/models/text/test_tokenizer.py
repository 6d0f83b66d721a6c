"""The word-level tokenizer rules the README states."""

import numpy as np
import pytest

from models.text.tokenizer import (
    BOS_ID,
    EOS_ID,
    UNK_ID,
    build_vocab,
    encode,
    sentence_bounds,
    split_sentences,
    tokenize_document,
    tokenize_sentence,
)


def test_sentences_split_at_terminal_punctuation_and_blank_lines_not_at_wrapped_lines():
    text = "The Object is\nreturned. Is it?  Yes!\n\nA new paragraph\nhere"
    assert split_sentences(text) == ["the object is\nreturned.", "is it?", "yes!", "a new paragraph\nhere"]


def test_tokens_are_words_with_inner_apostrophes_and_single_symbols():
    assert tokenize_sentence("don't call f(x)=3.5, ok") == [
        "don't",
        "call",
        "f",
        "(",
        "x",
        ")",
        "=",
        "3",
        ".",
        "5",
        ",",
        "ok",
    ]


def test_nfkc_normalisation_and_lower_case():
    assert tokenize_document("ﬁle ＡＢ") == [["file", "ab"]]


def test_vocab_order_min_count_and_specials():
    sentences = [["b", "a", "a"], ["c", "a", "b"], ["<unk>"]]
    assert build_vocab(sentences, min_count=1) == ["<unk>", "<s>", "</s>", "a", "b", "c"]
    assert build_vocab(sentences, min_count=2) == ["<unk>", "<s>", "</s>", "a", "b"]
    with pytest.raises(ValueError, match="min_count"):
        build_vocab(sentences, min_count=0)


def test_encode_wraps_sentences_and_maps_oov_to_unk():
    vocab = ["<unk>", "<s>", "</s>", "a", "b"]
    stream = encode([["a", "zzz"], ["b"]], vocab)
    assert stream.dtype == np.int32
    assert stream.tolist() == [BOS_ID, 3, UNK_ID, EOS_ID, BOS_ID, 4, EOS_ID]
    starts, ends = sentence_bounds(stream)
    assert starts.tolist() == [0, 4] and ends.tolist() == [4, 7]
    with pytest.raises(ValueError):
        sentence_bounds(stream[:-1])
