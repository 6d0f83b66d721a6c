"""Neural LM evaluation: every token scored exactly once, as with the full context when it fits."""

import numpy as np
import pytest
import torch

from models.text.language_models import build_language_model
from models.text.transformer import TransformerConfig
from tasks.text.lm import stream_nll, token_log_probs

DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_language_model(
        "transformer", TransformerConfig(vocab_size=11, context_length=16, n_layer=1, n_head=2, d_model=16, dropout=0.0)
    ).eval()


def stream(length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = rng.integers(3, 11, size=length).astype(np.int32)
    s[0] = 1
    s[rng.choice(np.arange(2, length), size=length // 6, replace=False)] = 2  # some </s>
    for i in np.flatnonzero(s[:-1] == 2):
        s[i + 1] = 1  # every </s> is followed by <s>
    return s


def test_full_context_equals_one_forward(model):
    ids = stream(16)
    with torch.no_grad():
        direct = torch.log_softmax(model(torch.as_tensor(ids[:-1], dtype=torch.long)[None]), -1)[0]
    expected = direct.gather(-1, torch.as_tensor(ids[1:], dtype=torch.long)[:, None])[:, 0].double().numpy()
    with torch.no_grad():
        np.testing.assert_allclose(token_log_probs(model, ids, 16, 4, DEVICE), expected, atol=1e-6)


@torch.no_grad()
def log_p_given(model, ids: np.ndarray, start: int, i: int) -> float:
    """log p(ids[i + 1] | ids[start .. i]) by a direct forward."""
    logits = model(torch.as_tensor(ids[start : i + 1], dtype=torch.long)[None])[0, -1]
    return torch.log_softmax(logits, -1)[ids[i + 1]].item()


@pytest.mark.parametrize("length", [5, 17, 40, 41, 100])
def test_every_token_is_scored_once_with_at_least_half_a_window_of_history(model, length):
    ids = stream(length, seed=length)
    with torch.no_grad():
        logp = token_log_probs(model, ids, 16, 3, DEVICE)
    assert logp.shape == (length - 1,)
    for i in range(length - 1):
        # The window that scored position i started between 15 and 8 tokens back (or at the stream start).
        starts = [0] if i < 8 else range(max(0, i - 15), i - 7)
        assert any(np.isclose(logp[i], log_p_given(model, ids, s, i), atol=1e-5) for s in starts), i


def test_nll_counts_every_target_but_bos(model):
    ids = stream(60)
    with torch.no_grad():
        nll, count = stream_nll(model, ids, 16, 4, DEVICE)
        logp = token_log_probs(model, ids, 16, 4, DEVICE)
    assert count == int(np.sum(ids[1:] != 1))
    assert nll == pytest.approx(-logp[ids[1:] != 1].sum())


def test_saved_model_reloads_to_identical_logits(model, tmp_path):
    from tasks.text.lm import load_language_model
    from tasks.training import save_model

    path = tmp_path / "model.pt"
    save_model(path, "transformer", model.cfg, model)
    name, again = load_language_model(path)
    x = torch.as_tensor(stream(16)[None, :16], dtype=torch.long)
    assert name == "transformer"
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_context_longer_than_the_corpus_names_the_key():
    from tasks.text.lm import LMEvalConfig, fit_language_model
    from tasks.training import TrainConfig

    cfg = TransformerConfig(vocab_size=11, context_length=64, n_layer=1, n_head=2, d_model=16)
    train = TrainConfig(
        steps=1,
        batch_size=1,
        lr=1e-3,
        min_lr_ratio=0.1,
        warmup_steps=0,
        weight_decay=0.0,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        eval_every=1,
        checkpoint_every=1,
        log_every=1,
        precision="fp32",
    )
    evaluation = LMEvalConfig(batch_size=1, val_max_tokens=0, sample_tokens=1, sample_temperature=1.0, sample_top_k=1)
    streams = {"train": stream(200), "val": stream(40), "test": stream(200)}
    with pytest.raises(
        ValueError, match=r"transformer.context_length = 64 is longer than the val stream \(40 tokens\)"
    ):
        fit_language_model(
            "transformer", cfg, train, evaluation, streams, ["w"] * 11, seed=0, device=DEVICE, checkpoint=None, run=None
        )


def test_bad_model_params_name_the_file_and_key(tmp_path, repo_root):
    import shutil

    from flows.registry import section_config
    from tasks.params import ParamsError

    params = tmp_path / "params"
    shutil.copytree(repo_root / "params", params)
    lm = params / "lm.yaml"
    lm.write_text(lm.read_text().replace("  d_state: 16", "  d_state: 0"))
    with pytest.raises(ParamsError, match=r"lm.yaml: mamba: d_state must be >= 1"):
        section_config(params, "mamba", vocab_size=100)
    lm.write_text(lm.read_text().replace("  d_state: 0", "  d_state: 16\n  vocab_size: 5", 1))
    with pytest.raises(ParamsError, match=r"mamba.vocab_size: is set from the data"):
        section_config(params, "mamba", vocab_size=100)


# ------------------------------------------------------------- sentence context (like for like with the n-gram)


def sentences(lengths: list[int], seed: int = 0) -> np.ndarray:
    """A stream of `<s> w.. </s>` sentences with `lengths` words each (ids 3..10)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([[1, *rng.integers(3, 11, size=n), 2] for n in lengths]).astype(np.int32)


LENGTHS = [3, 0, 7, 40, 1, 14, 15, 16, 5, 22]  # sentences of 2..42 tokens, some longer than the context


def tiny_model(name: str):
    from models.text.lstm import LSTMConfig
    from models.text.mamba import MambaConfig
    from models.text.s4d import S4DConfig

    configs = {
        "transformer": TransformerConfig(
            vocab_size=11, context_length=16, n_layer=1, n_head=2, d_model=16, dropout=0.0
        ),
        "lstm": LSTMConfig(vocab_size=11, context_length=16, d_embed=8, d_hidden=8, n_layer=1, dropout=0.0),
        "s4d": S4DConfig(vocab_size=11, context_length=16, d_model=8, n_layer=1, d_state=4, dropout=0.0),
        "mamba": MambaConfig(vocab_size=11, context_length=16, d_model=8, n_layer=1, d_state=4),
    }
    torch.manual_seed(0)
    return build_language_model(name, configs[name]).eval()


@pytest.mark.parametrize("name", ["transformer", "lstm", "s4d", "mamba"])
@pytest.mark.parametrize(("context", "batch_size"), [(16, 1), (16, 3), (9, 2)])
def test_sentence_nll_equals_its_one_sentence_reference(name, context, batch_size):
    from tasks.text.lm import sentence_nll, sentence_nll_ref

    model, ids = tiny_model(name), sentences(LENGTHS)
    nll, count = sentence_nll(model, ids, context, batch_size, DEVICE)
    ref_nll, ref_count = sentence_nll_ref(model, ids, context, DEVICE)
    assert count == ref_count == len(ids) - len(LENGTHS)  # every token but <s>, as the n-gram counts
    assert nll == pytest.approx(ref_nll, rel=1e-5, abs=1e-5)


def test_sentence_context_starts_at_each_sentence(model):
    """A sentence scores the same alone as inside a stream: no context from the sentences before it."""
    from tasks.text.lm import sentence_nll

    a, b = sentences([6], seed=1), sentences([9], seed=2)
    together, n = sentence_nll(model, np.concatenate([a, b]), 16, 4, DEVICE)
    alone = [sentence_nll(model, s, 16, 4, DEVICE) for s in (a, b)]
    assert n == alone[0][1] + alone[1][1] == 6 + 1 + 9 + 1
    assert together == pytest.approx(alone[0][0] + alone[1][0], rel=1e-6)
    with torch.no_grad():  # and differently from the stream, whose context crosses the boundary
        streamed, _ = stream_nll(model, np.concatenate([a, b]), 16, 4, DEVICE)
    assert streamed != pytest.approx(together, rel=1e-6)


class Unigram(torch.nn.Module):
    """Fixed next-token logits, whatever the context."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, idx):
        return self.logits.expand(*idx.shape, -1)


class Bigram(torch.nn.Module):
    """Next-token logits from the current token alone: the same under stream and sentence context."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, idx):
        return self.table(idx)


@pytest.mark.parametrize("cls", [Unigram, Bigram])
def test_sentence_nll_counts_the_tokens_the_stream_counts(cls):
    from tasks.text.lm import sentence_nll

    model, ids = cls(), sentences(LENGTHS, seed=3)
    with torch.no_grad():
        streamed, stream_count = stream_nll(model, ids, 16, 4, DEVICE)
    nll, count = sentence_nll(model, ids, 16, 4, DEVICE)
    assert count == stream_count == int(np.sum(ids != 1))
    assert nll == pytest.approx(streamed, rel=1e-5)


def test_sentence_nll_refuses_a_stream_that_is_not_sentences(model):
    from tasks.text.lm import sentence_nll

    with pytest.raises(ValueError, match="not a sequence of <s> ... </s> sentences"):
        sentence_nll(model, sentences([3, 4])[1:], 16, 4, DEVICE)
