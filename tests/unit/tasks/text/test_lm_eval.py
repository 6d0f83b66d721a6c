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
