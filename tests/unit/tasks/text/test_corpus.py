"""The corpus stage's compute: document split, vocabulary from train only, clear input errors."""

from dataclasses import replace

import numpy as np
import pytest

from flows.registry import section_config
from models.text.tokenizer import BOS_ID, EOS_ID, sentence_bounds
from tasks.text.corpus import (
    CorpusConfig,
    CorpusError,
    Document,
    build_corpus,
    contamination_audit,
    read_documents,
)

CFG = CorpusConfig(
    source="builtin",
    path="",
    min_count=2,
    val_fraction=0.1,
    test_fraction=0.1,
    split_seed=0,
    max_documents=0,
    max_test_13gram_share=0.5,
)


@pytest.fixture(scope="module")
def builtin():
    documents, source = read_documents(CFG, root=None)
    return documents, source


def test_builtin_split_is_by_document_deterministic_and_sized(builtin):
    documents, source = builtin
    corpus = build_corpus(documents, CFG, source)
    table = corpus.documents
    assert table["document"].is_unique and set(table["split"]) == {"train", "val", "test"}
    share = table.groupby("split")["tokens"].sum() / table["tokens"].sum()
    # Whole documents are held out until each split reaches its share; one document may overshoot.
    largest = table["tokens"].max() / table["tokens"].sum()
    for split in ("val", "test"):
        assert 0.1 <= share[split] <= 0.1 + largest
    again = build_corpus(documents, CFG, source)
    assert all(np.array_equal(corpus.streams[s], again.streams[s]) for s in corpus.streams)
    other = build_corpus(documents, replace(CFG, split_seed=1), source)
    assert not other.documents["split"].equals(corpus.documents["split"])


def test_streams_are_well_formed_and_vocab_comes_from_train(builtin):
    documents, source = builtin
    corpus = build_corpus(documents, CFG, source)
    for stream in corpus.streams.values():
        assert stream[0] == BOS_ID and stream[-1] == EOS_ID
        assert np.count_nonzero(stream == BOS_ID) == np.count_nonzero(stream == EOS_ID)
    counts = corpus.vocab_counts
    assert counts[3:].min() >= CFG.min_count  # every real word reached min_count in train
    assert np.array_equal(counts, np.bincount(corpus.streams["train"], minlength=len(corpus.vocab)))
    metrics = corpus.metrics()
    assert 0 < metrics["test_unk_rate"] < 0.2 and metrics["train_unk_rate"] < metrics["test_unk_rate"]


def test_user_folder_and_single_file(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i:02}.txt").write_text(f"Document {i} says hello. It is number {i}.\n" * 5)
    documents, source = read_documents(replace(CFG, source="path", path=str(folder)), tmp_path)
    assert [d.name for d in documents] == [f"doc{i:02}.txt" for i in range(12)]
    single = tmp_path / "book.txt"
    single.write_text("\n\n".join(f"Paragraph {i}. Some words here." for i in range(20)))
    documents, _ = read_documents(replace(CFG, source="path", path="book.txt"), tmp_path)
    assert len(documents) == 20 and documents[3].name == "book.txt#3"


def test_non_utf8_file_is_named(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "good.txt").write_text("fine text.")
    (folder / "bad.txt").write_bytes(b"caf\xe9 latin-1\n")
    with pytest.raises(CorpusError, match=r"bad\.txt: not UTF-8 \(byte 3, line 1\)"):
        read_documents(replace(CFG, source="path", path=str(folder)), tmp_path)


def test_missing_path_empty_corpus_and_empty_split_are_errors(tmp_path):
    with pytest.raises(CorpusError, match="nothing.txt: corpus.path names no file or folder"):
        read_documents(replace(CFG, source="path", path="nothing.txt"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .txt files"):
        read_documents(replace(CFG, source="path", path="empty"), tmp_path)
    with pytest.raises(CorpusError, match="the corpus is empty"):
        build_corpus([Document("a", "  \n"), Document("b", "")], CFG, "mine")
    with pytest.raises(CorpusError, match="the train split is empty"):
        build_corpus([Document("a", "one doc only."), Document("b", "and another.")], CFG, "mine")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="min_count"):
        replace(CFG, min_count=0)
    with pytest.raises(ValueError, match="test_fraction"):
        replace(CFG, test_fraction=0.7)
    with pytest.raises(ValueError, match="path"):
        replace(CFG, source="path", path="")
    with pytest.raises(ValueError, match="max_test_13gram_share"):
        replace(CFG, max_test_13gram_share=1.5)
    with pytest.raises(ValueError, match="max_test_13gram_share"):
        replace(CFG, max_test_13gram_share=float("nan"))


# ------------------------------------------------------------------- cross-split duplicates

# Ten documents of equal size with val and test fractions 0.2: the seeded split puts two whole documents in
# each of val and test. Which ones depends only on the sizes, so a filler corpus of the same sizes tells.
SMALL = replace(CFG, min_count=1, val_fraction=0.2, test_fraction=0.2)


def _roles(cfg: CorpusConfig, sentence_words: int, sentences: int = 3, n: int = 10) -> dict[str, list[int]]:
    def filler(i: int) -> str:  # no sentence repeats another, so removal leaves every split as it is
        return " ".join(" ".join([f"filler{i}x{k}"] * sentence_words) + "." for k in range(sentences))

    table = build_corpus([Document(f"d{i}", filler(i)) for i in range(n)], cfg, "roles").documents
    roles = {split: [int(i) for i in table.index[table["split"] == split]] for split in ("train", "val", "test")}
    assert [len(roles[s]) for s in ("train", "val", "test")] == [n - 4, 2, 2]
    return roles


def _corpus(cfg: CorpusConfig, texts: dict[str, list[str]], sentence_words: int, sentences: int = 3):
    roles = _roles(cfg, sentence_words, sentences)
    docs = [""] * 10
    for split, split_texts in texts.items():
        for i, text in zip(roles[split], split_texts, strict=True):
            docs[i] = text
    assert all(docs)
    return build_corpus([Document(f"d{i}", t) for i, t in enumerate(docs)], cfg, "planted"), roles


def _sentences(corpus, split: str) -> list[str]:
    stream = corpus.streams[split]
    return [" ".join(corpus.vocab[t] for t in stream[a + 1 : b - 1]) for a, b in zip(*sentence_bounds(stream))]


def test_planted_duplicates_are_removed_from_the_later_split_only():
    # Every sentence is four words and a full stop (five tokens, six stream tokens with </s>).
    texts = {
        "train": [
            "Shared one two three. Train zero alpha beta. Train zero gamma delta.",
            "Shared one two three. Train one alpha beta. Train one gamma delta.",  # a repeat within train stays
            "Drop me one two. Drop me three four. Drop me five six.",
            "Here words only val. Test and val both. Here words only test.",  # the words, not the sentences
            "Train four alpha beta. Train four gamma delta. Train four epsilon zeta.",
            "Train five alpha beta. Train five gamma delta. Train five epsilon zeta.",
        ],
        "val": [
            "SHARED one TWO  three. Val only words here. Both val and test.",  # the same after normalisation
            "Drop me one two. Drop me three four. Drop me five six.",  # all in train: the document drops out
        ],
        "test": [
            "Shared one two three. Both val and test. Test only words here.",
            "Test only words here. Test only words here. Drop me five six.",  # a repeat within test stays
        ],
    }
    corpus, roles = _corpus(SMALL, texts, sentence_words=4)
    assert _sentences(corpus, "val") == ["val only words here .", "both val and test ."]
    assert _sentences(corpus, "test") == ["test only words here ."] * 3
    assert _sentences(corpus, "train").count("shared one two three .") == 2
    assert corpus.vocab_counts[corpus.vocab.index("shared")] == 2
    metrics = corpus.metrics()
    assert metrics["train_sentences"] == 18 and metrics["val_sentences"] == 2 and metrics["test_sentences"] == 3
    assert metrics["removed_val_sentences"] == 4 and metrics["removed_val_tokens"] == 4 * 6
    assert metrics["removed_test_sentences"] == 3 and metrics["removed_test_tokens"] == 3 * 6
    assert metrics["val_tokens"] + metrics["removed_val_tokens"] == 6 * 6  # before: two documents of three
    for name in ("val_sentences_in_train_share", "test_sentences_in_train_share"):
        assert metrics[name] == 0.0
    for name in ("val_tokens_in_train_share", "test_tokens_in_train_share"):
        assert metrics[name] == 0.0
    table = corpus.documents.set_index("document")
    assert list(table.loc[[f"d{i}" for i in roles["val"]], "kept_sentences"]) == [2, 0]
    assert list(table.loc[[f"d{i}" for i in roles["test"]], "kept_sentences"]) == [1, 2]
    assert (table["sentences"] == 3).all() and (table["tokens"] == 15).all()  # the split's own sizes


def test_a_split_left_empty_by_removal_is_an_error():
    train = [f"Train {i} alpha beta. Train {i} gamma delta. Train {i} epsilon zeta." for i in range(6)]
    texts = {"train": train, "val": train[:2], "test": [train[2].replace("Train", "Test"), train[3]]}
    with pytest.raises(CorpusError, match="the val split is empty once sentences that occur in an earlier split"):
        _corpus(SMALL, texts, sentence_words=4)


def _words(prefix: str, n: int = 14) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


# One sentence of 14 words and a full stop per document: three 13-grams each. The first test document is a
# near-duplicate of a train one (its last word differs), so it shares exactly one 13-gram out of test's six.
NEAR = {
    "train": [f"{_words('w')}.", *(f"{_words(f't{j}_')}." for j in range(5))],
    "val": [f"{_words('v0_')}.", f"{_words('v1_')}."],
    "test": [f"{_words('w', 13)} other.", f"{_words('x')}."],
}


def test_near_duplicate_gives_a_known_13gram_share():
    corpus, _ = _corpus(replace(SMALL, max_test_13gram_share=0.2), NEAR, sentence_words=14, sentences=1)
    metrics = corpus.metrics()
    assert metrics["removed_test_sentences"] == 0 and metrics["test_sentences"] == 2  # not an exact match
    assert metrics["test_sentences_in_train_share"] == 0.0
    assert metrics["test_13grams_in_train_share"] == pytest.approx(1 / 6)
    assert metrics["test_word_13grams_in_train_share"] == pytest.approx(1 / 6)  # every 13-gram has a word


def test_all_punctuation_13grams_count_only_in_the_raw_share():
    rule = ("-",) * 13  # a table's rule: shared, but no leaked prose
    train, test = [rule, ("a",) * 13], [rule, ("b",) * 13]
    audit, example = contamination_audit({"train": train, "val": [("c",)], "test": test})
    assert audit["test_13grams_in_train_share"] == 0.5
    assert audit["test_word_13grams_in_train_share"] == 0.0 and example == ""


def test_audit_counts_sentences_and_stream_tokens():
    train = [("a", "b", "c", "d"), ("e",) * 13]
    val = [("a", "b", "c", "d"), ("z",) * 9]  # one of two sentences, 5 of 15 stream tokens
    test = [("e",) * 14, ("a", "b", "c", "d"), ("y",) * 13]  # 2 + 0 + 1 13-grams; two are the train one
    audit, example = contamination_audit({"train": train, "val": val, "test": test})
    assert audit["val_sentences_in_train_share"] == 0.5
    assert audit["val_tokens_in_train_share"] == pytest.approx(5 / 15)
    assert audit["test_sentences_in_train_share"] == pytest.approx(1 / 3)
    assert audit["test_tokens_in_train_share"] == pytest.approx(5 / (15 + 5 + 14))
    assert audit["test_13grams_in_train_share"] == pytest.approx(2 / 3)
    assert example == " ".join(["e"] * 13)


def test_13gram_share_over_the_threshold_is_an_error_naming_share_and_example():
    with pytest.raises(CorpusError) as err:
        _corpus(replace(SMALL, max_test_13gram_share=0.1), NEAR, sentence_words=14, sentences=1)
    message = str(err.value)
    assert "test_word_13grams_in_train_share = 0.1667 exceeds corpus.max_test_13gram_share = 0.1" in message
    assert f"'{_words('w', 13)}'" in message and "\n" not in message


def test_builtin_corpus_has_no_sentence_of_train_in_val_or_test(repo_root):
    cfg = section_config(repo_root / "params", "corpus")
    documents, source = read_documents(cfg, repo_root)
    corpus = build_corpus(documents, cfg, source)
    train = set(_sentences(corpus, "train"))
    # Compared as encoded (with <unk>): mapping words to <unk> can only merge sentences, never separate them.
    assert not [s for s in _sentences(corpus, "test") if s in train]
    assert not [s for s in _sentences(corpus, "val") if s in train]
    metrics = corpus.metrics()
    assert metrics["removed_test_sentences"] > 0 and metrics["test_sentences_in_train_share"] == 0.0
    assert 0.0 <= metrics["test_word_13grams_in_train_share"] <= cfg.max_test_13gram_share
