"""Normalizing-flow tasks: `nflow@{realnvp,cnf}`. Each trains an exact-likelihood generator by the one
training loop on uniformly dequantised images, reports test bits per dimension (the accounting in
models/generative/realnvp.py), and scores its samples with FID against the test split exactly as the diffusion
stages do (FIDEvaluator, with the floor and noise ceiling).

realnvp: models/generative/realnvp.py, maximum likelihood in logit space. cnf: the flow-matching process of
models/generative/cnf.py driving the UNet of models/generative/unet.py (unconditional, time input scaled), sampled
and scored by integrating its ODE (with the divergence for the likelihood).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import Tensor, nn

from models.generative.cnf import CNFConfig, FlowMatching
from models.generative.realnvp import (
    RealNVP,
    RealNVPConfig,
    dequantize,
    quantize,
    realnvp_loss,
)
from models.generative.unet import UNet, UNetConfig
from tasks.generative.fid import (
    FIDConfig,
    FIDEvaluator,
    check_fid_net,
    derived_image_fields,
    draw_spread,
    image_meta,
)
from tasks.generative.images import image_grid, read_images, to_model_range, to_pixels, write_png
from tasks.io import write_json
from tasks.layout import METRICS_DIR, NFLOW_DIR
from tasks.phases import in_phase
from tasks.spec import StageContext, StageSpec
from tasks.tracking import StageRun
from tasks.training import TrainConfig, code_digest, resolve_device, save_model, train


@dataclass(frozen=True)
class NFlowEvalConfig:
    """`params/nflow.yaml: nflow_eval`: how every flow is scored and sampled."""

    val_images: int  # val images in the validation metric at each evaluation during training
    bpd_images: int  # test images whose bits/dim are reported; 0: the whole test split
    bpd_batch_size: int  # images per likelihood batch
    grid_images: int  # samples in the logged grid
    grid_columns: int

    def __post_init__(self) -> None:
        for name in ("val_images", "bpd_batch_size", "grid_images", "grid_columns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.bpd_images < 0:
            raise ValueError(f"bpd_images must be >= 0 (0: the whole test split), got {self.bpd_images}")


@dataclass(frozen=True)
class NormalizingFlowSpec:
    model_section: str  # RealNVPConfig, or the CNF process's CNFConfig
    net_section: str | None  # the CNF's vector-field network (a UNetConfig); RealNVP is its own network
    train_section: str


NORMALIZING_FLOWS: dict[str, NormalizingFlowSpec] = {
    "realnvp": NormalizingFlowSpec("realnvp", None, "realnvp_train"),
    "cnf": NormalizingFlowSpec("cnf", "cnf_unet", "cnf_train"),
}
NORMALIZING_FLOW_NAMES = tuple(NORMALIZING_FLOWS)


def derived_flow_fields(name: str):
    """Channels and size of the flow's network from the images (the flows are unconditional)."""
    spec = NORMALIZING_FLOWS[name]
    return derived_image_fields(spec.net_section or spec.model_section, ("in_channels", "image_size"))


# ------------------------------------------------------------------------------------ the two flows


@dataclass
class NormalizingFlow:
    """A trainable flow behind one interface: its network, loss, bits/dim and sampler."""

    name: str
    model: nn.Module
    loss: Callable[..., Tensor]  # (model, dequantised y in [0, 1), generator=None) -> mean loss
    bpd: Callable[[nn.Module, Tensor, torch.Generator], tuple[Tensor, int]]  # -> (B,) bpd, evaluations
    sample: Callable[[nn.Module, int, torch.Generator], tuple[Tensor, int]]  # -> y (n, C, H, W) in [0, 1], nfe
    config: Any  # what save_model stores
    registry_name: str
    process_module: Any


def realnvp_model(cfg: RealNVPConfig) -> NormalizingFlow:
    def loss(model: nn.Module, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return realnvp_loss(model, y)  # deterministic given y

    def bpd(model: nn.Module, y: Tensor, generator: torch.Generator) -> tuple[Tensor, int]:
        with torch.no_grad():
            return model.bits_per_dim(y), 1

    def sample(model: nn.Module, n: int, generator: torch.Generator) -> tuple[Tensor, int]:
        return model.sample(n, generator), 1

    return NormalizingFlow("realnvp", RealNVP(cfg), loss, bpd, sample, cfg, "realnvp", sys.modules[RealNVP.__module__])


def cnf_model(cfg: CNFConfig, unet_cfg: UNetConfig) -> NormalizingFlow:
    process = FlowMatching(cfg)
    shape = (unet_cfg.in_channels, unet_cfg.image_size, unet_cfg.image_size)

    def loss(model: nn.Module, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return process.training_losses(model, 2 * y - 1, generator)["loss"]

    def bpd(model: nn.Module, y: Tensor, generator: torch.Generator) -> tuple[Tensor, int]:
        return process.bits_per_dim(model, y, generator)

    def sample(model: nn.Module, n: int, generator: torch.Generator) -> tuple[Tensor, int]:
        device = next(model.parameters()).device
        x, nfe = process.sample(model, (n, *shape), generator, device=device)
        return ((x + 1) / 2).clamp(0, 1), nfe

    return NormalizingFlow(
        "cnf", UNet(unet_cfg), loss, bpd, sample, unet_cfg, "unet", sys.modules[FlowMatching.__module__]
    )


def build_normalizing_flow(
    name: str, model_cfg: RealNVPConfig | CNFConfig, net_cfg: UNetConfig | None
) -> NormalizingFlow:
    if name == "realnvp":
        assert isinstance(model_cfg, RealNVPConfig)
        return realnvp_model(model_cfg)
    assert isinstance(model_cfg, CNFConfig) and net_cfg is not None
    if net_cfg.num_classes:
        raise ValueError("params/nflow.yaml: cnf_unet.num_classes must be 0: the flows model p(x), unconditional")
    return cnf_model(model_cfg, net_cfg)


# ------------------------------------------------------------------------------------------ compute


def pixels_of(root: Path, split: str) -> Tensor:
    return torch.from_numpy(read_images(root, split).pixels).float()  # (N, C, H, W) in 0..255


def fit_normalizing_flow(
    flow: NormalizingFlow,
    train_cfg: TrainConfig,
    train_pixels: Tensor,
    val_pixels: Tensor,
    *,
    seed: int,
    device: torch.device,
    checkpoint: Path | None,
    run: StageRun | None,
    fingerprint: dict[str, Any],
) -> Any:
    torch.manual_seed(seed)
    model = flow.model
    # The val images keep one dequantisation, so the curve shows the model, not the draw.
    y_val = dequantize(val_pixels, torch.Generator().manual_seed(seed)).to(device)

    def next_batch(generator: torch.Generator) -> Tensor:
        idx = torch.randint(0, len(train_pixels), (train_cfg.batch_size,), generator=generator)
        return dequantize(train_pixels[idx], generator).to(device)  # fresh uniform noise every batch

    def evaluate(m: nn.Module) -> dict[str, float]:
        # The CNF loss draws t and x_0: the same draw at every evaluation, from its own generator.
        return {"val_loss": float(flow.loss(m, y_val, torch.Generator(device).manual_seed(seed)))}

    fingerprint = {
        **fingerprint,
        "process_code": code_digest(model, flow.process_module),
        "train": asdict(train_cfg),
        "seed": seed,
        "n": len(train_pixels),
        "train_checksum": float(train_pixels.double().sum()),
    }
    result = train(
        model,
        train_cfg,
        next_batch=next_batch,
        loss_fn=flow.loss,
        evaluate=evaluate,
        items_per_batch=train_cfg.batch_size,
        seed=seed,
        device=device,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        run=run,
        item_name="images",
        desc=f"nflow@{flow.name}",
    )
    model.eval()
    return result


@in_phase("evaluation")
def split_bits_per_dim(
    flow: NormalizingFlow, pixels: Tensor, eval_cfg: NFlowEvalConfig, *, seed: int, device: torch.device
) -> dict[str, float]:
    """Mean bits/dim of the test images (one seeded dequantisation) and how long the likelihood took."""
    if eval_cfg.bpd_images:
        pixels = pixels[: eval_cfg.bpd_images]
    generator = torch.Generator().manual_seed(seed)
    y = dequantize(pixels, generator)
    start, parts, nfe = time.perf_counter(), [], 0
    for i in range(0, len(y), eval_cfg.bpd_batch_size):
        bpd, nfe = flow.bpd(flow.model, y[i : i + eval_cfg.bpd_batch_size].to(device), generator)
        parts.append(bpd.detach().cpu())
    seconds = time.perf_counter() - start
    bpd = torch.cat(parts).double()
    return {
        "test_bpd": float(bpd.mean()),
        "test_bpd_stderr": float(bpd.std() / len(bpd) ** 0.5),
        "test_bpd_images": float(len(bpd)),
        "likelihood_seconds": seconds,
        "likelihood_nfe": float(nfe),
    }


@in_phase("sampling")
def sample_images(flow: NormalizingFlow, n: int, batch_size: int, *, seed: int) -> tuple[Tensor, dict[str, float]]:
    """n samples as images in [-1, 1], quantised to pixels as the data are, and the sampling speed."""
    generator = torch.Generator().manual_seed(seed)
    start, parts, nfe = time.perf_counter(), [], 0
    for i in range(0, n, batch_size):
        y, nfe = flow.sample(flow.model, min(batch_size, n - i), generator)
        parts.append(quantize(y.float().cpu()))
    seconds = time.perf_counter() - start
    return to_model_range(torch.cat(parts)), {
        "sample_seconds": seconds,
        "sample_images_per_s": n / seconds,
        "sample_nfe": float(nfe),
    }


@dataclass(frozen=True)
class NFlowInputs:
    model: Any  # the item's section: RealNVPConfig or CNFConfig
    network: Any  # the CNF's vector field (UNetConfig); RealNVP repeats its own section
    train: TrainConfig
    nflow_eval: NFlowEvalConfig
    fid: FIDConfig


@task(name="nflow", cache_policy=NO_CACHE)
def nflow_task(ctx: StageContext, inputs: NFlowInputs) -> dict[str, float]:
    root, name, run, seed, device_name = ctx.root, ctx.item, ctx.run, ctx.seed, ctx.device
    model_cfg, train_cfg, eval_cfg, fid_cfg = inputs.model, inputs.train, inputs.nflow_eval, inputs.fid
    net_cfg = inputs.network if NORMALIZING_FLOWS[name].net_section else None
    device = resolve_device(device_name)
    flow = build_normalizing_flow(name, model_cfg, net_cfg)
    check_fid_net(root)  # before training: the samples are scored with it
    out = root / NFLOW_DIR / name
    train_pixels, val_pixels = pixels_of(root, "train"), pixels_of(root, "val")[: eval_cfg.val_images]
    result = fit_normalizing_flow(
        flow,
        train_cfg,
        train_pixels,
        val_pixels,
        seed=seed,
        device=device,
        checkpoint=out / "checkpoint.pt",
        run=run,
        fingerprint={"model": asdict(model_cfg), "net": asdict(net_cfg) if net_cfg else None},
    )
    save_model(out / "model.pt", flow.registry_name, flow.config, flow.model, meta=image_meta(root))

    likelihood = split_bits_per_dim(flow, pixels_of(root, "test"), eval_cfg, seed=seed + 2, device=device)
    evaluator = FIDEvaluator.load(root, fid_cfg, device)
    images, speed = sample_images(flow, fid_cfg.samples, fid_cfg.batch_size, seed=seed + 1)
    report = evaluator.report(images, None)
    # The headline FID over independent sample sets (seed + 1 + 100 k): its spread from the sampling noise.
    more = [
        evaluator.fid(sample_images(flow, fid_cfg.samples, fid_cfg.batch_size, seed=seed + 1 + 100 * k)[0]).fid
        for k in range(1, fid_cfg.headline_draws)
    ]
    metrics: dict[str, Any] = {
        **likelihood,
        "ema_decay": train_cfg.ema_decay,  # the weights every number here comes from (0: the trained ones)
        **report,
        **draw_spread([report["fid"], *more]),
        **speed,
        "train_seconds": result.train_seconds,
        "train_images_per_s": result.items_per_second,
    }
    if isinstance(model_cfg, CNFConfig):
        metrics["trace"] = model_cfg.trace
        metrics["sample_solver"] = model_cfg.sample_solver
        metrics["likelihood_solver"] = model_cfg.likelihood_solver
    write_json(root / METRICS_DIR / "nflow" / f"{name}.json", metrics)
    grid = write_png(
        image_grid(to_pixels(images[: eval_cfg.grid_images]), eval_cfg.grid_columns), out / "samples.png", upscale=2
    )

    flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    run.log_metrics(flat)
    run.log_artifact(grid, "samples")
    print(
        f"nflow@{name}: test {metrics['test_bpd']:.3f} bits/dim ({int(metrics['test_bpd_images'])} images), "
        f"FID {report['fid']:.3f} (floor {evaluator.floor:.3f}, noise ceiling {evaluator.ceiling:.1f}), "
        f"{speed['sample_images_per_s']:.1f} samples/s"
    )
    return flat


def flow_sections(item: str) -> dict[str, tuple[str, type]]:
    spec = NORMALIZING_FLOWS[item]
    model_cls = {"realnvp": RealNVPConfig, "cnf": CNFConfig}[item]
    net = (spec.net_section, UNetConfig) if spec.net_section else (spec.model_section, model_cls)
    return {"model": (spec.model_section, model_cls), "network": net, "train": (spec.train_section, TrainConfig)}


SPEC = StageSpec(
    name="nflow",
    family="generative",
    task=nflow_task,
    inputs=NFlowInputs,
    items=NORMALIZING_FLOW_NAMES,
    sections=flow_sections,
    derive=lambda root, item: derived_flow_fields(item)(root),
    placeholders={"realnvp": {"in_channels": 1, "image_size": 16}, "cnf_unet": {"in_channels": 1, "image_size": 16}},
)
