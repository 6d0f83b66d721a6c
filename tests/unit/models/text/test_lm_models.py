"""Properties every Kiln language model shares, and the registry, sampler and NLL of models/text/language_models.py."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from models.text.language_models import LANGUAGE_MODELS, build_language_model, sample, sequence_nll
from models.text.lstm import LSTMConfig
from models.text.mamba import MambaConfig
from models.text.s4d import S4DConfig
from models.text.transformer import TransformerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V = 17
TINY = {
    "transformer": dict(vocab_size=V, context_length=32, n_layer=2, n_head=2, d_model=32, dropout=0.0),
    "s4d": dict(vocab_size=V, context_length=32, n_layer=2, d_model=32, d_state=8, mlp_ratio=2, dropout=0.0),
    "mamba": dict(vocab_size=V, context_length=32, n_layer=2, d_model=32, d_state=8, chunk_size=4),
    # d_hidden != d_embed: the head is tied through the projection
    "lstm": dict(vocab_size=V, context_length=32, n_layer=2, d_embed=32, d_hidden=48, dropout=0.0),
}
NAMES = sorted(TINY)


def tiny(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_language_model(name, {**TINY[name], **overrides})


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_registry(name):
    model = tiny(name)
    assert isinstance(model, LANGUAGE_MODELS[name][1])
    idx = torch.randint(0, V, (3, 11))
    assert model(idx).shape == (3, 11, V)


@pytest.mark.parametrize("name", NAMES)
def test_causality(name):
    # float64 so the one model with an FFT (s4d) leaks only ~1e-16 of roundoff into the past; every other
    # model must leave earlier logits bit-identical
    model = tiny(name).double().eval()
    idx = torch.randint(0, V, (2, 20))
    t = 9
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % V
    with torch.no_grad():
        a, b = model(idx), model(changed)
    if name == "s4d":
        assert (a[:, :t] - b[:, :t]).abs().max() < 1e-10
    else:
        assert torch.equal(a[:, :t], b[:, :t])
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=(0, 2)).min() > 1e-6  # every later position sees the change


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    model = tiny(name, seed=0).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = tiny(name, seed=1).eval()
    other.load_state_dict(torch.load(buffer, weights_only=True))
    idx = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        assert torch.equal(model(idx), other(idx))


@pytest.mark.parametrize("name", NAMES)
def test_tiny_model_overfits_repeated_sequence(name):
    # a cycle through 8 tokens: each token determines the next, so the loss can go to ~0
    model = tiny(name)
    cycle = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:8]
    seq = cycle.repeat(4)[None].expand(4, -1)  # (4, 32)
    x, y = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # targets after the first cycle are determined; the first 7 need the cycle to be remembered from token 0
    assert loss.item() < 0.1, f"{name} final loss {loss.item():.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_forward_backward(name):
    # the training loop's bf16 precision: every model runs under CPU autocast, gradients stay finite
    model = tiny(name)
    idx = torch.randint(0, V, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
    loss = F.cross_entropy(logits.float().flatten(0, 1), idx.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["s4d", "mamba", "lstm"])
def test_recurrent_step_matches_forward(name):
    model = tiny(name).eval()
    idx = torch.randint(0, V, (2, 15))
    with torch.no_grad():
        full = model(idx)
        state = model.init_state(2)
        steps = []
        for t in range(idx.shape[1]):
            logits, state = model.step(idx[:, t], state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "config_cls, kwargs, field",
    [
        (TransformerConfig, dict(d_model=30, n_head=4), "d_model"),
        (TransformerConfig, dict(n_layer=0), "n_layer"),
        (TransformerConfig, dict(context_length=0), "context_length"),
        (TransformerConfig, dict(dropout=1.0), "dropout"),
        (S4DConfig, dict(d_state=7), "d_state"),
        (S4DConfig, dict(d_state=0), "d_state"),
        (S4DConfig, dict(init="legt"), "init"),
        (S4DConfig, dict(dt_min=0.2, dt_max=0.1), "dt_min"),
        (S4DConfig, dict(mlp_ratio=-1), "mlp_ratio"),
        (MambaConfig, dict(d_state=0), "d_state"),
        (MambaConfig, dict(d_conv=0), "d_conv"),
        (MambaConfig, dict(dt_rank=-1), "dt_rank"),
        (MambaConfig, dict(chunk_size=0), "chunk_size"),
        (MambaConfig, dict(scan="fast"), "scan"),
        (LSTMConfig, dict(d_hidden=0), "d_hidden"),
        (LSTMConfig, dict(vocab_size=0), "vocab_size"),
        (LSTMConfig, dict(dropout=-0.1), "dropout"),
    ],
)
def test_config_validation_names_the_field(config_cls, kwargs, field):
    kwargs = {"vocab_size": V, **kwargs}
    with pytest.raises(ValueError, match=field):
        config_cls(**kwargs)


def test_build_language_model_is_strict():
    with pytest.raises(ValueError, match="unknown language model"):
        build_language_model("gru", {"vocab_size": V})
    with pytest.raises(ValueError, match="n_heads"):
        build_language_model("transformer", {"vocab_size": V, "n_heads": 2})
    with pytest.raises(ValueError, match="vocab_size"):
        build_language_model("lstm", {"d_embed": 8})
    with pytest.raises(TypeError):
        build_language_model("lstm", S4DConfig(vocab_size=V))
    assert build_language_model("lstm", LSTMConfig(vocab_size=V, d_embed=8, d_hidden=8)).proj is None


def test_sample_shapes_determinism_and_top_k():
    model = tiny("transformer")
    prompt = torch.randint(0, V, (2, 40))  # longer than context_length: sampling crops the window
    out = sample(model, prompt, 5, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 45) and torch.equal(out[:, :40], prompt)
    again = sample(model, prompt, 5, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert model.training  # restored
    # top_k=1 is greedy, whatever the temperature
    greedy = sample(model, prompt[0], 4, temperature=0.0)
    assert greedy.shape == (44,)
    assert torch.equal(sample(model, prompt[0], 4, temperature=5.0, top_k=1), greedy)
    # every sampled token is among the top-k of its step
    model.eval()
    with torch.no_grad():
        logits = model(out[:, -32 - 1 : -1])  # last step's window: predicts out[:, -1]
    top3 = logits[:, -1].topk(3).indices
    assert all(out[b, -1] in top3[b] for b in range(2))
    with pytest.raises(ValueError, match="top_k"):
        sample(model, prompt, 1, top_k=0)


def test_sequence_nll():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, V)
    targets = torch.randint(0, V, (2, 5))
    total, count = sequence_nll(logits, targets)
    expected = -logits.log_softmax(-1).gather(-1, targets[..., None]).sum()
    torch.testing.assert_close(total, expected)
    assert count == 10
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :3] = True
    total_masked, count_masked = sequence_nll(logits, targets, mask)
    torch.testing.assert_close(total_masked, -logits[0, :3].log_softmax(-1).gather(-1, targets[0, :3, None]).sum())
    assert count_masked == 3
    # uniform logits: perplexity equals the vocabulary size
    total_u, count_u = sequence_nll(torch.zeros(1, 4, V), targets[:1, :4])
    assert math.isclose(math.exp(total_u.item() / count_u), V, rel_tol=1e-6)
