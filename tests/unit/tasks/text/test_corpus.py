"""The corpus stage's compute: document split, vocabulary from train only, clear input errors."""

from dataclasses import replace

import numpy as np
import pytest

from models.text.tokenizer import BOS_ID, EOS_ID
from tasks.text.corpus import CorpusConfig, CorpusError, Document, build_corpus, read_documents

CFG = CorpusConfig(
    source="builtin", path="", min_count=2, val_fraction=0.1, test_fraction=0.1, split_seed=0, max_documents=0
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
