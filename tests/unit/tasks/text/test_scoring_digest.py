"""A trained model records the vocabulary it was trained on; `kiln score` refuses one whose vocabulary is not the
corpus's (or unknown) and names the stage to rerun."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from models.text import ngram as kn
from models.text.lstm import LSTMConfig
from models.text.tokenizer import SPECIALS, encode
from tasks.errors import InputError
from tasks.layout import CORPUS_DIR, LM_DIR, NGRAM_DIR
from tasks.text.corpus import Corpus, read_vocab, vocab_digest, write_corpus
from tasks.training import load_model, load_model_with_meta, save_model

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "."]
SENTENCES = [
    ["the", "cat", "sat", "on", "the", "mat", "."],
    ["a", "dog", "ran", "on", "the", "mat", "."],
    ["the", "dog", "sat", "."],
    ["a", "cat", "ran", "."],
]


# ------------------------------------------------------------------------------------ digest


def test_digest_is_stable_short_hex_and_of_the_tokens_in_id_order():
    vocab = [*SPECIALS, *WORDS]
    digest = vocab_digest(vocab)
    assert digest == vocab_digest(list(vocab))
    assert len(digest) == 16 and int(digest, 16) >= 0
    import hashlib

    assert digest == hashlib.sha256("\n".join(vocab).encode("utf-8")).hexdigest()[:16]


def test_digest_changes_with_order_and_with_any_token():
    vocab = [*SPECIALS, *WORDS]
    swapped = [*SPECIALS, WORDS[1], WORDS[0], *WORDS[2:]]
    changed = [*SPECIALS, *WORDS[:-1], "!"]
    longer = [*vocab, "bird"]
    digests = {vocab_digest(v) for v in (vocab, swapped, changed, longer)}
    assert len(digests) == 4


# ------------------------------------------------------------------------- save/load meta


def _build_linear(name: str, config: dict) -> nn.Module:
    assert name == "linear"
    return nn.Linear(config["vocab_size"], 2)


def test_save_model_round_trips_meta(tmp_path):
    model = nn.Linear(3, 2)
    path = tmp_path / "model.pt"
    save_model(path, "linear", LSTMConfig(vocab_size=3), model, meta={"vocab_digest": "0123456789abcdef"})
    name, again, meta = load_model_with_meta(path, _build_linear)
    assert name == "linear" and meta == {"vocab_digest": "0123456789abcdef"}
    assert torch.equal(again.weight, model.weight)
    # The plain loader still answers (name, model), as every existing caller expects.
    name, plain = load_model(path, _build_linear)
    assert name == "linear" and torch.equal(plain.weight, model.weight)


def test_a_model_saved_without_meta_loads_with_empty_meta(tmp_path):
    path = tmp_path / "model.pt"
    save_model(path, "linear", LSTMConfig(vocab_size=3), nn.Linear(3, 2))
    assert "meta" not in torch.load(path, weights_only=True)  # the file is what it was before meta existed
    assert load_model_with_meta(path, _build_linear)[2] == {}


# ------------------------------------------------------------------ the scorers' check


def _write_corpus(root: Path, words: list[str]) -> list[str]:
    vocab = [*SPECIALS, *words]
    streams = {split: encode(SENTENCES, vocab) for split in ("train", "val", "test")}
    counts = np.bincount(streams["train"], minlength=len(vocab)).astype(np.int64)
    columns = ("document", "split", "sentences", "tokens", "kept_sentences", "kept_tokens")
    documents = pd.DataFrame(dict(zip(columns, (["d"], ["train"], [4], [22], [4], [22]))))
    write_corpus(Corpus(vocab, counts, streams, documents), root / CORPUS_DIR)
    assert read_vocab(root / CORPUS_DIR) == vocab
    return vocab


def _write_lstm(root: Path, vocab: list[str], meta: dict[str, str] | None) -> Path:
    from models.text.language_models import build_language_model

    cfg = LSTMConfig(vocab_size=len(vocab), context_length=8, d_embed=8, d_hidden=8, n_layer=1, dropout=0.0)
    torch.manual_seed(0)
    path = root / LM_DIR / "lstm" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, "lstm", cfg, build_language_model("lstm", cfg), meta=meta)
    return path


def _write_ngram(root: Path, vocab: list[str], digest: str | None) -> None:
    from tasks.text.ngram import VOCAB_DIGEST_FILE

    counts = kn.count_ngrams(encode(SENTENCES, vocab), len(vocab), 2)
    model = kn.estimate_kneser_ney(counts, kn.NgramConfig(order=2))
    out = root / NGRAM_DIR
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "model.arpa", "wb") as arpa:
        for chunk in kn.arpa_chunks(model.model, vocab):
            arpa.write(chunk)
    if digest is not None:
        (out / VOCAB_DIGEST_FILE).write_text(digest + "\n", encoding="utf-8")


@pytest.fixture
def project(tmp_path) -> tuple[Path, list[str], list[str]]:
    """A corpus now built from other words than the ones the models below were trained on."""
    trained = [*SPECIALS, *WORDS]
    current = _write_corpus(tmp_path, [*WORDS[::-1], "bird"])
    return tmp_path, trained, current


def test_lstm_trained_on_the_corpus_vocabulary_scores(tmp_path):
    from tasks.text.scoring import score_sentences

    vocab = _write_corpus(tmp_path, WORDS)
    _write_lstm(tmp_path, vocab, {"vocab_digest": vocab_digest(vocab)})
    [score] = score_sentences(tmp_path, ["the cat"], ["lstm"])
    assert score.model == "lstm" and np.isfinite(score.perplexity)


def test_lstm_trained_on_another_vocabulary_is_refused_with_the_rerun(project):
    from tasks.text.scoring import score_sentences

    root, trained, current = project
    _write_lstm(root, trained, {"vocab_digest": vocab_digest(trained)})
    with pytest.raises(InputError) as err:
        score_sentences(root, ["the cat"], ["lstm"])
    message = str(err.value)
    assert message.startswith("data/models/lm/lstm/model.pt was trained on another vocabulary")
    assert vocab_digest(trained) in message and vocab_digest(current) in message
    assert "`dvc repro lm@lstm`" in message and "`kiln run --target lm@lstm`" in message
    assert "\n" not in message


def test_lstm_without_a_digest_is_refused_with_the_rerun(project):
    from tasks.text.scoring import score_sentences

    root, trained, _ = project
    _write_lstm(root, trained, None)
    with pytest.raises(
        InputError, match=r"data/models/lm/lstm/model.pt records no vocabulary digest: .*dvc repro lm@lstm"
    ):
        score_sentences(root, ["the cat"], ["lstm"])


def test_a_missing_lstm_keeps_its_error(project):
    from tasks.text.scoring import score_sentences

    with pytest.raises(FileNotFoundError, match="no trained model here"):
        score_sentences(project[0], ["the cat"], ["lstm"])


def test_ngram_estimated_on_the_corpus_vocabulary_scores(tmp_path):
    from tasks.text.scoring import score_sentences

    vocab = _write_corpus(tmp_path, WORDS)
    _write_ngram(tmp_path, vocab, vocab_digest(vocab))
    [score] = score_sentences(tmp_path, ["the cat"])
    assert score.model == "ngram" and np.isfinite(score.perplexity)


def test_ngram_estimated_on_another_vocabulary_is_refused_with_the_rerun(project):
    from tasks.text.scoring import score_sentences

    root, trained, current = project
    _write_ngram(root, trained, vocab_digest(trained))
    with pytest.raises(InputError) as err:
        score_sentences(root, ["the cat"])
    message = str(err.value)
    assert message.startswith("data/models/ngram/model.arpa was trained on another vocabulary")
    assert vocab_digest(trained) in message and vocab_digest(current) in message
    assert "`dvc repro ngram`" in message and "`kiln run --target ngram`" in message


def test_ngram_without_a_digest_is_refused_with_the_rerun(project):
    from tasks.text.scoring import score_sentences

    root, trained, _ = project
    _write_ngram(root, trained, None)
    with pytest.raises(
        InputError, match=r"data/models/ngram/model.arpa records no vocabulary digest: .*dvc repro ngram"
    ):
        score_sentences(root, ["the cat"])


def test_a_missing_ngram_keeps_its_error(project):
    from tasks.text.scoring import score_sentences

    with pytest.raises(FileNotFoundError, match="no trained n-gram model"):
        score_sentences(project[0], ["the cat"])
