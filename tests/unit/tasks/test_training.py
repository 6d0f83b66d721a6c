"""The one training loop: schedule, NaN stop, checkpoint resume equal to an uninterrupted run."""

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from tasks.training import NonFiniteLoss, TrainConfig, learning_rate, make_optimizer, train

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
