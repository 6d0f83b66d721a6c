"""The training loop under DistributedDataParallel: two CPU processes (gloo) that each take their
rank-strided half of the seeded global batch end at the weights one process reaches with the whole batch;
only rank 0 logs and writes the checkpoint."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tasks.training import TrainConfig, shard_batch, train

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
    checkpoint_every=6,
    log_every=2,
    precision="fp32",
)


class RecordingRun:
    """Stands in for a StageRun: remembers what was logged."""

    def __init__(self) -> None:
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))


def fit(checkpoint: Path | None) -> dict:
    """A toy regression, the same on every rank: w_true and the batches come from fixed seeds."""
    w_true = torch.randn(5, 1, generator=torch.Generator().manual_seed(0))

    def next_batch(generator):
        x = torch.randn(CFG.batch_size, 5, generator=generator)
        return x, x @ w_true + 0.1 * torch.randn(CFG.batch_size, 1, generator=generator)

    seen = []  # the inputs of every step, to check which share of the batch a rank trained on

    def loss_fn(model, batch):
        x, y = batch
        seen.append(x.tolist())
        return nn.functional.mse_loss(model(x), y)

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    run = RecordingRun()
    result = train(
        model,
        CFG,
        next_batch=next_batch,
        loss_fn=loss_fn,
        evaluate=lambda m: {"w_norm": float(sum(p.norm() ** 2 for p in m.parameters()))},
        items_per_batch=CFG.batch_size,
        seed=7,
        device=torch.device("cpu"),
        checkpoint=checkpoint,
        run=run,
    )
    return {
        "weights": [p.detach().flatten().tolist() for p in model.parameters()],
        "history": result.history,
        "train_loss": [m["train_loss"] for _, m in run.logged if "train_loss" in m],
        "logged": len(run.logged),
        "seen": seen,
    }


def _rank(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "GLOO_SOCKET_IFNAME": "lo",
        }
    )
    torch.set_num_threads(1)
    try:
        fitted = fit(Path(out) / "checkpoint.pt")
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(fitted))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_reach_what_one_process_reaches_with_the_same_global_batch(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = fit(tmp_path / "single.pt")
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    for got in ranks:
        for a, b in zip(got["weights"], single["weights"]):
            assert a == pytest.approx(b, abs=1e-5)
        assert [h["w_norm"] for h in got["history"]] == pytest.approx(
            [h["w_norm"] for h in single["history"]], abs=1e-5
        )
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP keeps the replicas identical
    for r, got in enumerate(ranks):  # each rank trained on its rank-strided half of every global batch
        assert got["seen"] == [rows[r::2] for rows in single["seen"]]
    # Rank 0 logs the job's loss (the mean over ranks), which is the single process's loss; rank 1 logs nothing.
    assert ranks[0]["train_loss"] == pytest.approx(single["train_loss"], abs=1e-5)
    assert ranks[0]["logged"] == single["logged"] and ranks[1]["logged"] == 0
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == CFG.steps and not any(k.startswith("module.") for k in saved["model"])


def test_shard_batch_takes_rank_strided_items_and_keeps_structure():
    x = torch.arange(6)
    targets = [{"i": i} for i in range(6)]
    assert shard_batch(x, 1, 2).tolist() == [1, 3, 5]
    xs, ts = shard_batch((x, targets), 0, 3)
    assert xs.tolist() == [0, 3] and ts == [{"i": 0}, {"i": 3}]
    assert shard_batch({"a": x}, 2, 3)["a"].tolist() == [2, 5]
    with pytest.raises(TypeError, match="cannot shard"):
        shard_batch(3, 0, 2)
