"""The one training loop of Kiln: every model family trains through `train`.

AdamW (decoupled weight decay on matrices only), linear warmup then cosine decay, gradient clipping,
evaluation every K steps, a clear error on a NaN/inf loss, deterministic seeding, a progress bar with
throughput, and a checkpoint every K steps that a re-run resumes from. A checkpoint carries a
fingerprint of everything that shaped the run (configs and data); a checkpoint whose fingerprint differs
is set aside, never resumed into the wrong run. Checkpoints hold only tensors and plain Python values and
load with `weights_only=True`.

Under `torchrun` (WORLD_SIZE > 1 in the environment) the same loop trains data-parallel: one process per
rank, DistributedDataParallel over gloo (CPU) or NCCL (CUDA). Every rank draws the same seeded global batch
and keeps its rank-strided share, so N ranks with a global `batch_size` B take the steps one process with
batch B takes (exactly, for a loss that is a mean over equally many items per rank and draws no random
numbers). Rank 0 alone logs to MLflow and writes checkpoints; every rank evaluates (no collectives there,
the same weights give the same figures).

With `ema_decay` > 0 the loop also keeps an exponential moving average of the weights (`WeightEMA`): the
evaluations see the average, and `train` returns the model holding it, so a stage samples, scores and saves
the averaged weights, as DDPM, ADM, DiT and SD3 report theirs. The checkpoint keeps both.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from tasks import threads
from tasks.errors import StaleArtefact, rerun_hint, shown_path
from tasks.io import atomic_path
from tasks.phases import in_phase
from tasks.tracking import StageRun


@dataclass(frozen=True)
class TrainConfig:
    """A training section of params (e.g. `params/lm.yaml: lm_train`)."""

    steps: int  # optimizer steps in total
    batch_size: int
    lr: float  # peak learning rate, reached after warmup
    min_lr_ratio: float  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int
    weight_decay: float  # AdamW, on weight matrices and embeddings only
    beta1: float
    beta2: float
    grad_clip: float  # max global gradient norm; 0 turns clipping off
    eval_every: int  # steps between evaluations (and one at the end)
    checkpoint_every: int  # steps between resumable checkpoints (and one at the end)
    log_every: int  # steps between logged train metrics
    precision: Literal["fp32", "bf16"]  # bf16: autocast where the device supports it, else fp32
    ema_decay: float = 0.0  # > 0: evaluate and return an EMA of the weights with this decay (WeightEMA); 0: off
    # Convolutional weights in NHWC (`place_model`): oneDNN's faster convolution kernels on CPU; the same
    # arithmetic up to the order of float sums. benchmarks/bench_detection.py measures the gain.
    channels_last: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type in (float, "float") and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"{f.name} must be a finite number, got {getattr(self, f.name)!r}")
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps], got {self.warmup_steps}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf: training stops instead of writing a broken model."""


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def place_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """`model` on `device`, its 4-D weights in channels-last (NHWC) order where `cfg.channels_last`, in place.

    A convolution whose weight is channels-last computes in NHWC whatever the input's layout (PyTorch's
    memory-format propagation), so the batches need no conversion. On 2 CPU cores this makes a training step
    of the one-stage detector 1.2x and of ThunderNet 1.1x as fast (benchmarks/bench_detection.py), and the
    image family's networks 1.1-1.3x on one thread (benchmarks/bench_images.py section 7). The state dict
    keeps NHWC strides, and `load_model_with_meta` gives the loaded model the same layout.
    """
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on tensors of rank >= 2 only: not on biases and norms, nor on parameters a
    model marks `_no_weight_decay` (the SSM state matrices and step sizes, as the S4/Mamba papers do)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decays = [p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) for p in params]
    groups = [
        {"params": [p for p, d in zip(params, decays) if d], "weight_decay": cfg.weight_decay},
        {"params": [p for p, d in zip(params, decays) if not d], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast where the device runs it natively; fp32 otherwise (bf16 on CPU is slower)."""
    if precision == "bf16" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class TrainResult:
    steps: int
    resumed_from: int  # 0: a fresh start
    history: list[dict[str, float]] = field(default_factory=list)  # one row per evaluation
    train_seconds: float = 0.0
    items_per_second: float = 0.0
    weights: Literal["raw", "ema"] = "raw"  # what the returned model and every evaluation hold


class WeightEMA:
    """Polyak averaging of a model's weights: after every optimizer step
    theta_ema <- d_n theta_ema + (1 - d_n) theta, with d_n = min(decay, (1 + n) / (10 + n)) after n updates.

    The warm-up of d_n is TensorFlow's `ExponentialMovingAverage(num_updates=n)`, which the DDPM code used:
    a run of a few thousand steps would otherwise average in its random initialisation for most of its length
    (at decay 0.999 the initial weights keep a share 0.999^n, still 0.22 after 1,500 steps). Buffers (norm
    statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.updates = 0

    def rate(self) -> float:
        """d_n for the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.rate()
        ema = list(self.model.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - d)  # ema += (1 - d)(p - ema)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.updates += 1

    @torch.no_grad()
    def update_ref(self, model: nn.Module) -> None:
        """`update` one tensor at a time, as the formula reads: the twin the tests compare with."""
        d = self.rate()
        for mine, theirs in zip(self.model.parameters(), model.parameters()):
            mine.copy_(d * mine + (1 - d) * theirs)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


Batch = Any


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int


def distributed_context(device: torch.device) -> Distributed | None:
    """The torchrun job this process belongs to (None: a plain single process). Joins the process group
    (gloo on CPU, NCCL on CUDA) unless the caller already did."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shard_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank `rank`'s share of a global batch: items rank, rank + N, ... of every tensor (first dimension)
    and list (per-item targets); tuples and dicts keep their structure."""
    if isinstance(batch, Tensor):
        return batch[rank::world_size]
    if isinstance(batch, tuple):
        return tuple(shard_batch(b, rank, world_size) for b in batch)
    if isinstance(batch, dict):
        return {k: shard_batch(v, rank, world_size) for k, v in batch.items()}
    if isinstance(batch, list):
        return batch[rank::world_size]
    raise TypeError(f"cannot shard a batch of type {type(batch).__name__} across ranks")


class _LossModule(nn.Module):
    """`loss_fn(model, batch)` as a module's forward, so DDP sees the whole loss (a loss may call model
    methods other than forward, e.g. a VAE's `training_losses`) and synchronises every gradient."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Batch], Tensor]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Batch) -> Tensor:
        return self.loss_fn(self.model, batch)


def code_digest(model: nn.Module, *modules: Any) -> str:
    """sha256 of the source files that define the model's modules, the given Python modules (the task's
    loss) and this loop: a checkpoint made by other code is never resumed, as DVC reruns a stage precisely
    when its code changed."""
    import hashlib
    import inspect

    own = {sys.modules[type(m).__module__] for m in model.modules() if not type(m).__module__.startswith("torch")}
    # ... and the project modules those import from (box coding, RoI align, HiPPO matrices).
    package = {m.__name__.split(".")[0] for m in own}
    used = {
        sys.modules[v.__module__] if not inspect.ismodule(v) else v
        for m in own
        for v in vars(m).values()
        if (inspect.ismodule(v) and v.__name__.split(".")[0] in package)
        or (callable(v) and getattr(v, "__module__", "").split(".")[0] in package)
    }
    files = {Path(inspect.getfile(m)) for m in own | used | set(modules)} | {Path(__file__)}
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.read_bytes())
    return digest.hexdigest()


@dataclass
class _Loop:
    """What the steps of one `train` call share."""

    model: nn.Module
    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # draws the batches; checkpointed so a resumed run sees the same ones
    result: TrainResult
    device: torch.device
    ddp: Distributed | None
    run: StageRun | None
    checkpoint: Path | None
    fingerprint: dict[str, Any]
    desc: str
    item_name: str
    ema: WeightEMA | None = None


def _is_due(done: int, every: int, cfg: TrainConfig) -> bool:
    # The last step always counts, so a run ends logged, evaluated and checkpointed whatever `every` is.
    return done % every == 0 or done == cfg.steps


def _setup_distributed(
    cfg: TrainConfig, device: torch.device, run: StageRun | None, desc: str
) -> tuple[Distributed | None, torch.device, StageRun | None]:
    """The torchrun job (None: one process), this rank's device and its run (None off rank 0)."""
    ddp = distributed_context(device)
    if ddp is None:
        return None, device, run
    if cfg.batch_size % ddp.world_size:
        raise ValueError(f"{desc}: batch_size {cfg.batch_size} does not split evenly over {ddp.world_size} ranks")
    if device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    if ddp.rank != 0:
        run = None  # rank 0 logs for the job
    return ddp, device, run


@in_phase("loading")
def _resume(loop: _Loop) -> None:
    """Load the checkpoint into the model, optimizer and both RNGs when it was made by this very run."""
    checkpoint, desc = loop.checkpoint, loop.desc
    if checkpoint is None or not checkpoint.is_file():
        return
    state = torch.load(checkpoint, map_location=loop.device, weights_only=True)
    if state.get("fingerprint") == loop.fingerprint and state.get("step", 0) <= loop.cfg.steps:
        loop.model.load_state_dict(state["model"])
        loop.optimizer.load_state_dict(state["optimizer"])
        if loop.ema is not None:
            loop.ema.load_state_dict(state["ema"])  # present: the fingerprint holds ema_decay
        torch.set_rng_state(state["torch_rng"])
        loop.generator.set_state(state["batch_rng"])
        loop.result.resumed_from = int(state["step"])
        loop.result.history = list(state["history"])
        print(f"{desc}: resuming from {checkpoint} at step {loop.result.resumed_from}")
    else:
        print(f"{desc}: {checkpoint} was made by another configuration or data; starting afresh")


def _data_parallel(model: nn.Module, loss_fn: Callable[[nn.Module, Batch], Tensor], device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters: a detector's branch may get no gradient on a rank whose images lack it.
    return DistributedDataParallel(
        _LossModule(model, loss_fn),
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )


def _progress_bar(loop: _Loop) -> tqdm:
    resumed_from, ddp = loop.result.resumed_from, loop.ddp
    return tqdm(
        range(resumed_from, loop.cfg.steps),
        desc=loop.desc,
        initial=resumed_from,
        total=loop.cfg.steps,
        file=sys.stderr,
        mininterval=1.0 if sys.stderr.isatty() else 15.0,
        dynamic_ncols=True,
        disable=ddp is not None and ddp.rank != 0,
    )


def _train_step(
    loop: _Loop,
    step: int,
    next_batch: Callable[[torch.Generator], Batch],
    loss_fn: Callable[[nn.Module, Batch], Tensor],
    net: nn.Module | None,
) -> tuple[float, Tensor, Tensor]:
    """One optimizer step; returns its learning rate, the job's loss and the gradient norm before clipping."""
    cfg, ddp, desc = loop.cfg, loop.ddp, loop.desc
    lr = learning_rate(step, cfg)
    for group in loop.optimizer.param_groups:
        group["lr"] = lr
    batch = next_batch(loop.generator)
    if ddp is None:
        with autocast_context(loop.device, cfg.precision):
            loss = loss_fn(loop.model, batch)
        job_loss = loss
    else:
        with autocast_context(loop.device, cfg.precision):
            loss = net(shard_batch(batch, ddp.rank, ddp.world_size))
        # The job's loss (mean over ranks) for the NaN check and the log: every rank stops together.
        job_loss = loss.detach().clone()
        torch.distributed.all_reduce(job_loss)
        job_loss /= ddp.world_size
    if not torch.isfinite(job_loss):
        raise NonFiniteLoss(
            f"{desc}: loss is {loss.item()} at step {step} (lr {lr:.3g}); lower the learning rate or raise warmup_steps"
        )
    loop.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(loop.model.parameters(), cfg.grad_clip or float("inf"))
    loop.optimizer.step()
    return lr, job_loss, grad_norm


@dataclass
class _Throughput:
    """Items per second over the whole run and over the window since the last log."""

    items_per_batch: int
    start: float = field(default_factory=time.perf_counter)
    items: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    window_items: int = 0

    def add_batch(self) -> None:
        self.items += self.items_per_batch
        self.window_items += self.items_per_batch

    def window_rate(self) -> float:
        """The rate since the previous call (or the start), which opens a new window."""
        now = time.perf_counter()
        rate = self.window_items / max(now - self.window_start, 1e-9)
        self.window_start, self.window_items = now, 0
        return rate


def _log_step(loop: _Loop, bar: tqdm, done: int, lr: float, loss: Tensor, grad_norm: Tensor, rate: float) -> None:
    bar.set_postfix(loss=f"{loss.item():.3f}", **{f"{loop.item_name}/s": f"{rate:,.0f}"})
    if loop.run is not None:
        loop.run.log_metrics(
            {"train_loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm), f"{loop.item_name}_per_s": rate},
            step=done,
        )


@in_phase("evaluation")
def _evaluate(loop: _Loop, evaluate: Callable[[nn.Module], dict[str, float]], step: int) -> None:
    # With an EMA the evaluations (and any choice made from them) see the weights the stage will use.
    target = loop.ema.model if loop.ema is not None else loop.model
    target.eval()
    with torch.no_grad():
        metrics = evaluate(target)
    if loop.ema is None:
        loop.model.train()  # the EMA copy is never trained, and the training model never left train mode
    loop.result.history.append({"step": float(step), **metrics})
    if loop.run is not None:
        loop.run.log_metrics(metrics, step=step)


@in_phase("io")
def _save_checkpoint(loop: _Loop, step: int) -> None:
    if loop.checkpoint is not None and (loop.ddp is None or loop.ddp.rank == 0):
        with atomic_path(loop.checkpoint) as tmp:
            torch.save(
                {
                    "fingerprint": loop.fingerprint,
                    "step": step,
                    "model": loop.model.state_dict(),
                    "optimizer": loop.optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "batch_rng": loop.generator.get_state(),
                    "history": loop.result.history,
                    **({"ema": loop.ema.state_dict()} if loop.ema is not None else {}),
                },
                tmp,
            )
    if loop.ddp is not None:
        torch.distributed.barrier()  # no rank runs ahead of a checkpoint that a restart resumes from


@in_phase("training")
def train(
    model: nn.Module,
    cfg: TrainConfig,
    *,
    next_batch: Callable[[torch.Generator], Batch],
    loss_fn: Callable[[nn.Module, Batch], Tensor],
    evaluate: Callable[[nn.Module], dict[str, float]],
    items_per_batch: int,
    seed: int,
    device: torch.device,
    checkpoint: Path | None = None,
    fingerprint: dict[str, Any] | None = None,
    run: StageRun | None = None,
    item_name: str = "tokens",
    desc: str = "train",
) -> TrainResult:
    """Train `model` in place for `cfg.steps` steps, resuming from `checkpoint` when it matches.

    `next_batch(generator)` draws a batch with the loop's seeded generator (its state is checkpointed, so a
    resumed run sees the batches an uninterrupted one would); `loss_fn(model, batch)` returns the mean loss;
    `evaluate(model)` returns metrics (logged at the eval step). `items_per_batch` counts throughput.
    With `cfg.ema_decay` > 0, `evaluate` gets the EMA weights and `model` ends holding them.
    """
    import inspect

    fingerprint = {**(fingerprint or {}), "code": code_digest(model, *filter(None, [inspect.getmodule(loss_fn)]))}
    ddp, device, run = _setup_distributed(cfg, device, run, desc)
    torch.manual_seed(seed)
    place_model(model, cfg, device)
    loop = _Loop(
        model=model,
        cfg=cfg,
        optimizer=make_optimizer(model, cfg),
        generator=torch.Generator().manual_seed(seed),
        result=TrainResult(steps=cfg.steps, resumed_from=0),
        device=device,
        ddp=ddp,
        run=run,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        desc=desc,
        item_name=item_name,
        ema=WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None,
    )
    _resume(loop)
    # Wrapped after resuming: DDP broadcasts rank 0's (resumed) weights to the other ranks when built.
    net = _data_parallel(model, loss_fn, device) if ddp is not None else None

    model.train()
    throughput = _Throughput(items_per_batch)
    bar = _progress_bar(loop)
    for step in bar:
        lr, loss, grad_norm = _train_step(loop, step, next_batch, loss_fn, net)
        if loop.ema is not None:
            loop.ema.update(model)
        throughput.add_batch()
        threads.tick()  # fewer threads while other work holds cores, more when it ends
        done = step + 1
        if _is_due(done, cfg.log_every, cfg):
            _log_step(loop, bar, done, lr, loss, grad_norm, throughput.window_rate())
        if _is_due(done, cfg.eval_every, cfg):
            _evaluate(loop, evaluate, done)
        if _is_due(done, cfg.checkpoint_every, cfg):
            _save_checkpoint(loop, done)
    bar.close()
    result = loop.result
    result.train_seconds = time.perf_counter() - throughput.start
    result.items_per_second = throughput.items / max(result.train_seconds, 1e-9)
    # Resumed at the last step from a checkpoint that holds no evaluation: the result still reports one.
    if result.resumed_from == cfg.steps and not result.history:
        _evaluate(loop, evaluate, cfg.steps)
    if loop.ema is not None:
        model.load_state_dict(loop.ema.model.state_dict())
        result.weights = "ema"
    return result


@in_phase("io")
def save_model(path: Path, name: str, config: Any, model: nn.Module, meta: dict[str, str] | None = None) -> None:
    """A trained model as an artifact that carries its config: registry name, config fields, weights, and
    `meta`, strings about what it was trained on (the LMs' `vocab_digest`), returned by `load_model_with_meta`."""
    import dataclasses

    saved = {"model": name, "config": dataclasses.asdict(config), "state_dict": model.state_dict()}
    if meta is not None:
        saved["meta"] = {str(k): str(v) for k, v in meta.items()}
    with atomic_path(path) as tmp:
        torch.save(saved, tmp)


def load_model(
    path: Path, build: Callable[[str, dict[str, Any]], nn.Module], device: torch.device | str = "cpu"
) -> tuple[str, nn.Module]:
    """Rebuild a `save_model` artifact with `build(name, config)` and load its weights (eval mode)."""
    name, model, _ = load_model_with_meta(path, build, device)
    return name, model


@in_phase("loading")
def load_model_with_meta(
    path: Path, build: Callable[[str, dict[str, Any]], nn.Module], device: torch.device | str = "cpu"
) -> tuple[str, nn.Module, dict[str, str]]:
    """`load_model`, and the artifact's `meta` ({} for one saved without it, or before it existed)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained model here; run the stage that trains it first")
    saved = torch.load(path, map_location=device, weights_only=True)
    model = build(saved["model"], saved["config"])
    load_in_saved_layout(model, saved["state_dict"])
    return saved["model"], model.to(device).eval(), dict(saved.get("meta") or {})


def load_in_saved_layout(module: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """`state_dict` into `module`, in the memory layout it was saved in: the layout it trained in
    (`place_model`), so a stage that samples or scores with it gets the same NHWC kernels (1.2-1.4x a forward
    pass on one thread, benchmarks/bench_images.py section 7). load_state_dict alone copies the values into
    the fresh module's NCHW weights. For models `load_model_with_meta` builds and those built elsewhere (the
    ControlNet, the flows in `kiln sample`)."""
    module.load_state_dict(state_dict)
    if trained_channels_last(state_dict):
        module.to(memory_format=torch.channels_last)


def trained_channels_last(state_dict: dict[str, Tensor]) -> bool:
    """Whether a saved state dict's convolution weights are in channels-last order (`place_model` trained
    them so). A weight whose NCHW and NHWC strides coincide (1x1 kernels on one channel) says nothing."""
    return any(
        t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        for t in state_dict.values()
    )


# ------------------------------------------------------------------- what a model was trained on


def require_meta(root: Path, path: Path, meta: dict[str, str], expected: dict[str, str], stage: str) -> None:
    """Refuse the artefact at `path` unless its `meta` records every `expected` key with the expected value: a
    `StaleArtefact` (one line) names the file, the key, both values and the stage to rerun."""
    rerun = rerun_hint(stage)
    for key, current in expected.items():
        recorded = meta.get(key)
        if not recorded:
            raise StaleArtefact(f"{shown_path(root, path)} records no {key}: {rerun}")
        if str(recorded) != str(current):
            raise StaleArtefact(
                f"{shown_path(root, path)} was trained on other data ({key}: {recorded} vs {current}): {rerun}"
            )


def read_model_meta(path: Path) -> dict[str, str]:
    """The `meta` a `save_model` artifact records ({} for none), without building its model."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained model here; run the stage that trains it first")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return dict(saved.get("meta") or {})


def data_digest(values: dict[str, Any]) -> str:
    """sha256 (first 16 hex digits) of `values` as canonical JSON: the families' data digests."""
    import hashlib
    import json

    text = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
