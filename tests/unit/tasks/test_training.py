"""The one training loop: schedule, NaN stop, checkpoint resume equal to an uninterrupted run."""

import math
from dataclasses import asdict, replace

import pytest
import torch
from torch import nn

from tasks.training import (
    NonFiniteLoss,
    TrainConfig,
    WeightEMA,
    learning_rate,
    load_model_with_meta,
    make_optimizer,
    save_model,
    train,
    trained_channels_last,
)

CFG = TrainConfig(
    steps=12,
    batch_size=8,
    lr=0.05,
    min_lr_ratio=0.1,
    warmup_steps=4,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,
    eval_every=4,
    checkpoint_every=3,
    log_every=2,
    precision="fp32",
)


def test_warmup_then_cosine_to_the_floor():
    assert learning_rate(0, CFG) == pytest.approx(0.05 / 4)
    assert learning_rate(3, CFG) == pytest.approx(0.05)
    assert learning_rate(4, CFG) == pytest.approx(0.05)  # cosine starts at the peak
    middle = 4 + (12 - 4) / 2
    assert learning_rate(int(middle), CFG) == pytest.approx(0.005 + 0.5 * 0.045 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(12, CFG) == pytest.approx(0.005)


def test_weight_decay_only_on_matrices_not_on_marked_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    marked = nn.Parameter(torch.zeros(2, 2))
    marked._no_weight_decay = True
    model.register_parameter("state", marked)
    decay, no_decay = make_optimizer(model, CFG).param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 4


def regression():
    torch.manual_seed(0)
    w_true = torch.randn(5, 1)

    def next_batch(generator):
        x = torch.randn(CFG.batch_size, 5, generator=generator)
        return x, x @ w_true

    def loss_fn(model, batch):
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    return next_batch, loss_fn


def run(cfg, checkpoint=None, fingerprint=None, loss_fn=None):
    next_batch, default_loss = regression()
    torch.manual_seed(1)
    model = nn.Linear(5, 1)
    result = train(
        model,
        cfg,
        next_batch=next_batch,
        loss_fn=loss_fn or default_loss,
        evaluate=lambda m: {"w_norm": float(m.weight.norm())},
        items_per_batch=cfg.batch_size,
        seed=7,
        device=torch.device("cpu"),
        checkpoint=checkpoint,
        fingerprint=fingerprint,
    )
    return model, result


def test_evaluates_every_k_steps_and_at_the_end():
    _, result = run(replace(CFG, steps=40, eval_every=10))
    assert [row["step"] for row in result.history] == [10, 20, 30, 40]


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    uninterrupted, _ = run(CFG)
    checkpoint = tmp_path / "checkpoint.pt"
    _, default_loss = regression()
    calls = {"n": 0}

    def dies_at_step_8(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("killed")
        return default_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        run(CFG, checkpoint, {"run": 1}, dies_at_step_8)
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 6  # the last checkpoint before the interruption
    resumed, result = run(CFG, checkpoint, {"run": 1})
    assert result.resumed_from == 6
    assert torch.equal(resumed.weight, uninterrupted.weight) and torch.equal(resumed.bias, uninterrupted.bias)
    assert [row["step"] for row in result.history] == [4, 8, 12]


def test_checkpoint_of_another_configuration_is_not_resumed(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    run(CFG, checkpoint, {"lr": 1})
    _, result = run(CFG, checkpoint, {"lr": 2})
    assert result.resumed_from == 0


def test_nan_loss_stops_with_a_clear_error():
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 0"):
        run(CFG, loss_fn=lambda model, batch: model(batch[0]).sum() * float("nan"))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="warmup_steps"):
        replace(CFG, warmup_steps=20)
    with pytest.raises(ValueError, match="lr must be > 0"):
        replace(CFG, lr=0.0)


@pytest.mark.parametrize(
    "field, value",
    [("grad_clip", math.inf), ("weight_decay", math.nan), ("lr", math.inf), ("min_lr_ratio", math.nan)],
)
def test_non_finite_float_fields_are_rejected(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a finite number, got {value!r}"):
        replace(CFG, **{field: value})


# ------------------------------------------------------------------------------------------ weight EMA


def test_ema_rate_warms_up_to_the_decay():
    ema = WeightEMA(nn.Linear(2, 1), decay=0.999)
    rates = []
    for n in (0, 90, 100_000):
        ema.updates = n
        rates.append(ema.rate())
    assert rates == [pytest.approx(0.1), pytest.approx(0.91), 0.999]


def test_ema_update_equals_its_formula_twin():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    fast, ref = WeightEMA(model, 0.9), WeightEMA(model, 0.9)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(6, 4))  # moves the batch-norm running statistics (buffers: copied, not averaged)
        fast.update(model)
        ref.update_ref(model)
    for a, b in zip(fast.model.state_dict().values(), ref.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert torch.equal(fast.model[1].running_mean, model[1].running_mean)


def test_ema_by_hand_on_a_scalar():
    """d_0 = 0.1, d_1 = 2/11: two updates from w0 through w1 and w2."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = WeightEMA(model, 0.5)
    for w in (3.0, 5.0):
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update(model)
    first = 0.1 * 1.0 + 0.9 * 3.0
    assert float(ema.model.weight) == pytest.approx(2 / 11 * first + 9 / 11 * 5.0)


def test_training_with_ema_evaluates_and_returns_the_average(tmp_path):
    cfg = replace(CFG, ema_decay=0.9)
    raw, raw_result = run(CFG)
    averaged, result = run(cfg)
    assert raw_result.weights == "raw" and result.weights == "ema"
    # Same steps (the EMA draws no random numbers), then the average replaces the weights.
    assert not torch.equal(averaged.weight, raw.weight)
    assert result.history[-1]["w_norm"] == pytest.approx(float(averaged.weight.detach().norm()))
    # An interrupted EMA run resumes both the weights and their average.
    checkpoint = tmp_path / "checkpoint.pt"
    _, default_loss = regression()
    calls = {"n": 0}

    def dies_at_step_8(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("killed")
        return default_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        run(cfg, checkpoint, {"run": 1}, dies_at_step_8)
    resumed, again = run(cfg, checkpoint, {"run": 1})
    assert again.resumed_from == 6 and torch.equal(resumed.weight, averaged.weight)


def test_ema_decay_out_of_range_is_refused():
    with pytest.raises(ValueError, match="ema_decay must be in"):
        replace(CFG, ema_decay=1.0)


def conv_run(cfg):
    """12 steps of a small conv net (conv, GroupNorm, depthwise conv, pooled head) on seeded images."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )

    def next_batch(generator):
        x = torch.randn(cfg.batch_size, 3, 12, 12, generator=generator)
        return x, x.mean(dim=(2, 3))[:, :2]

    def loss_fn(model, batch):
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    result = train(
        model,
        cfg,
        next_batch=next_batch,
        loss_fn=loss_fn,
        evaluate=lambda m: {"head_norm": float(m[-1].weight.norm())},
        items_per_batch=cfg.batch_size,
        seed=7,
        device=torch.device("cpu"),
    )
    return model, result


def test_channels_last_trains_the_same_weights_in_nhwc_order():
    plain, plain_result = conv_run(CFG)
    nhwc, nhwc_result = conv_run(replace(CFG, channels_last=True))
    conv = nhwc[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert plain[0].weight.is_contiguous()
    # The same arithmetic up to the order of float sums in the convolutions.
    for (name, a), b in zip(plain.state_dict().items(), nhwc.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    norms = [h["head_norm"] for h in plain_result.history], [h["head_norm"] for h in nhwc_result.history]
    assert len(norms[0]) == 3 and norms[1] == pytest.approx(norms[0], rel=1e-4)
    # Its state dict loads into a fresh (contiguous) model with the same values.
    fresh = conv_run(replace(CFG, steps=1, warmup_steps=0))[0]
    fresh.load_state_dict(nhwc.state_dict())
    assert fresh[0].weight.is_contiguous() and torch.equal(fresh[0].weight, nhwc[0].weight)


def test_a_model_saved_in_channels_last_loads_in_channels_last(tmp_path):
    """A downstream stage samples or scores in the layout the model trained in; an NCHW one stays NCHW."""
    nhwc, _ = conv_run(replace(CFG, channels_last=True, steps=2, warmup_steps=0))
    plain, _ = conv_run(replace(CFG, steps=2, warmup_steps=0))

    def build(name, config):
        assert name == "conv" and config == asdict(CFG)
        return conv_run(replace(CFG, steps=1, warmup_steps=0))[0]

    for model, expected in ((nhwc, True), (plain, False)):
        save_model(tmp_path / "m.pt", "conv", CFG, model)
        _, loaded, _ = load_model_with_meta(tmp_path / "m.pt", build)
        weight = loaded[0].weight
        assert weight.is_contiguous(memory_format=torch.channels_last) is expected
        assert weight.is_contiguous() is not expected
        assert torch.equal(weight, model[0].weight) and not loaded.training
        x = torch.randn(4, 3, 12, 12)
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_trained_channels_last_ignores_weights_whose_two_layouts_coincide():
    one_by_one = nn.Conv2d(1, 4, 1).to(memory_format=torch.channels_last)  # NCHW and NHWC strides agree
    assert not trained_channels_last(one_by_one.state_dict())
    assert not trained_channels_last(nn.Linear(3, 2).state_dict())
    assert trained_channels_last(nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last).state_dict())


def test_channels_last_must_be_a_bool(tmp_path):
    """The params loader refuses anything but true/false (it checks every field's type, bools included)."""
    from tasks.params import ParamsError, section_from_dict

    with pytest.raises(ParamsError, match="detector_train.channels_last: expected bool"):
        section_from_dict(TrainConfig, {**asdict(CFG), "channels_last": "yes"}, tmp_path / "x.yaml", "detector_train")
