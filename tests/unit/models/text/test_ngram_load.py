"""`kiln score`'s n-gram load (tasks/text/scoring.py `load_ngram`): the stage's model tables when they are
model.arpa's, the ARPA file otherwise, the same model either way."""

from __future__ import annotations

import numpy as np
import pytest

from models.text import ngram as kn
from models.text.tokenizer import build_vocab, encode, tokenize_document
from tasks.layout import NGRAM_DIR


@pytest.fixture(scope="module")
def trained():
    from pydoc_data.topics import topics

    sentences = [s for key in sorted(topics)[:40] for s in tokenize_document(topics[key])]
    vocab = build_vocab(sentences, min_count=1)
    counts = kn.count_ngrams(encode(sentences, vocab), len(vocab), 3)
    return kn.estimate_kneser_ney(counts, kn.NgramConfig(order=3)).model, vocab


def _write_stage_output(root, model, vocab, tables: bool = True):
    from tasks.text.ngram import write_model_tables

    out = root / NGRAM_DIR
    out.mkdir(parents=True, exist_ok=True)
    arpa = out / "model.arpa"
    arpa.write_bytes(b"".join(kn.arpa_chunks(model, vocab)))
    if tables:
        write_model_tables(model, vocab, out, arpa.stat().st_size)
    return arpa


def _assert_same(a: kn.BackoffModel, b: kn.BackoffModel) -> None:
    for field in ("keys", "log10_prob", "log10_backoff"):
        for x, y in zip(getattr(a, field), getattr(b, field), strict=True):
            np.testing.assert_array_equal(x, y)


def test_load_reads_the_tables_and_gets_the_arpa_model(tmp_path, trained, monkeypatch):
    from tasks.text import scoring

    model, vocab = trained
    arpa = _write_stage_output(tmp_path, model, vocab)
    with open(arpa, encoding="utf-8") as lines:
        parsed, parsed_vocab = kn.parse_arpa(lines)

    def no_parse(lines):
        raise AssertionError("the ARPA file was parsed although the tables are its")

    monkeypatch.setattr(scoring.kn, "parse_arpa", no_parse)
    loaded, loaded_vocab = scoring.load_ngram(tmp_path)
    assert loaded_vocab == parsed_vocab
    _assert_same(loaded, parsed)


@pytest.mark.parametrize("change", ["no tables", "other arpa", "order table missing"])
def test_load_parses_the_arpa_when_the_tables_are_not_its(tmp_path, trained, change):
    from tasks.text.scoring import load_ngram

    model, vocab = trained
    arpa = _write_stage_output(tmp_path, model, vocab, tables=change != "no tables")
    if change == "other arpa":  # a hand-edited or replaced model.arpa: its size no longer matches
        text = arpa.read_text(encoding="utf-8")
        arpa.write_text(text.replace("\t", "\t", 1).replace("\n\\end\\", "\n\n\\end\\"), encoding="utf-8")
    if change == "order table missing":
        (arpa.parent / "model_3.parquet").unlink()
    with open(arpa, encoding="utf-8") as lines:
        parsed, _ = kn.parse_arpa(lines)
    loaded, _ = load_ngram(tmp_path)
    _assert_same(loaded, parsed)


def test_load_errors_name_the_file(tmp_path, trained):
    from tasks.text.scoring import load_ngram

    with pytest.raises(FileNotFoundError, match="model.arpa: no trained n-gram model"):
        load_ngram(tmp_path)
    model, vocab = trained
    arpa = _write_stage_output(tmp_path, model, vocab, tables=False)
    arpa.write_text(arpa.read_text(encoding="utf-8").replace("\\end\\", ""), encoding="utf-8")
    with pytest.raises(ValueError, match=r"model.arpa: ARPA line \d+: unexpected end of file"):
        load_ngram(tmp_path)
