"""The `controlnet` stage: a ControlNet (models/generative/controlnet.py) trained on the frozen `diffusion@ddpm` UNet
with Canny edge maps of the images as the condition, then scored by how well samples follow their condition (F1
between the condition and the edges of the sample) with and without the control, next to FID.

The edge maps of every split are a stage output (data/models/controlnet/edges/<split>.npy), so what the
network was conditioned on can be inspected. The evaluation takes the first `fid.samples` val images (all 270 on
the built-in data): their edge maps are the conditions, their labels the labels; the base model alone samples
from the same labels and the same initial noise, so the control is the only difference. FID is against the test
split's statistics. Conditions from the test images themselves would let the control copy the very images FID
compares with, crediting it with a match the base model cannot have; val is in neither the reference nor the
training data.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import Tensor

from models.bootstrap import interval, ratio_resamples, resample_indices
from models.generative.controlnet import (
    ControlledUNet,
    ControlNet,
    ControlNetConfig,
    canny_edges,
    edge_f1,
)
from models.generative.ddpm import DiffusionConfig, GaussianDiffusion
from models.generative.unet import UNet
from tasks.generative.diffusion import load_generator
from tasks.generative.fid import FIDConfig, FIDEvaluator, check_fid_net, draw_spread, image_meta
from tasks.generative.images import image_grid, read_images, to_model_range, to_pixels, write_png
from tasks.io import atomic_path, write_json
from tasks.layout import CONTROLNET_DIR, METRICS_DIR, SPLITS
from tasks.phases import in_phase
from tasks.spec import StageContext, StageSpec
from tasks.tracking import StageRun
from tasks.training import TrainConfig, code_digest, resolve_device, train


@dataclass(frozen=True)
class ControlNetEvalConfig:
    """`params/images.yaml: controlnet_eval`: how the controlled and the base model are sampled and scored."""

    sampler: Literal["ancestral", "ddim"]
    steps: int
    f1_tolerance: int  # pixels an edge may be off and still match (0: exact)
    val_images: int  # val images in the validation loss at each evaluation
    grid_rows: int  # examples in the logged grid (condition | controlled | base)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.val_images < 1 or self.grid_rows < 1:
            raise ValueError("steps, val_images and grid_rows must be >= 1")
        if self.f1_tolerance < 0:
            raise ValueError(f"f1_tolerance must be >= 0, got {self.f1_tolerance}")


def edges_of(images: Tensor, cfg: ControlNetConfig, batch_size: int = 512) -> Tensor:
    """Canny edge maps (N, 1, H, W) in {0, 1} of model-range images (N, C, H, W)."""
    return torch.cat(
        [
            canny_edges(images[i : i + batch_size], cfg.edge_low, cfg.edge_high)
            for i in range(0, len(images), batch_size)
        ]
    )


@in_phase("io")
def save_controlnet(path: Path, controlnet: ControlNet, meta: dict[str, str] | None = None) -> None:
    """Weights with both configs: the ControlNet's and the base UNet's it was copied from, and `meta` (what it
    was trained on, as `save_model` records it)."""
    with atomic_path(path) as tmp:
        torch.save(
            {
                "model": "controlnet",
                "config": asdict(controlnet.cfg),
                "base_config": asdict(controlnet.base_cfg),
                "state_dict": controlnet.state_dict(),
                **({"meta": {str(k): str(v) for k, v in meta.items()}} if meta is not None else {}),
            },
            tmp,
        )


def fit_controlnet(
    process: GaussianDiffusion,
    base: UNet,
    cfg: ControlNetConfig,
    train_cfg: TrainConfig,
    data: dict[str, tuple[Tensor, Tensor, Tensor]],
    val_images: int,
    *,
    seed: int,
    device: torch.device,
    checkpoint: Path | None,
    run: StageRun | None,
) -> tuple[ControlledUNet, Any]:
    """Train a ControlNet on the frozen `base`: the DDPM loss of the controlled model, only ControlNet
    parameters in the optimizer (the base's have requires_grad False). `data[split]` = (x0, labels, edges)."""
    torch.manual_seed(seed)
    model = ControlledUNet(base, ControlNet(base, cfg)).to(device)
    x_train, y_train, c_train = (t.to(device) for t in data["train"])
    x_val, y_val, c_val = (t[:val_images].to(device) for t in data["val"])

    def next_batch(generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.randint(0, len(x_train), (train_cfg.batch_size,), generator=generator)
        return x_train[idx], y_train[idx], c_train[idx]

    def loss(m: ControlledUNet, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x0, y, c = batch
        return process.training_losses(m, x0, y=y, cond=c)["loss"]

    def evaluate(m: ControlledUNet) -> dict[str, float]:
        g = torch.Generator(device).manual_seed(seed)  # the same t and noise each time
        controlled = float(process.training_losses(m, x_val, y=y_val, cond=c_val, generator=g)["loss"])
        g = torch.Generator(device).manual_seed(seed)
        alone = float(process.training_losses(m, x_val, y=y_val, generator=g)["loss"])
        return {"val_loss": controlled, "val_loss_base": alone}

    fingerprint = {
        "controlnet": asdict(cfg),
        "train": asdict(train_cfg),
        "seed": seed,
        "n": len(x_train),
        "process": asdict(process.cfg),
        "base_checksum": float(sum(p.double().sum() for p in base.parameters())),
        "process_code": code_digest(model, sys.modules[type(process).__module__]),
    }
    result = train(
        model,
        train_cfg,
        next_batch=next_batch,
        loss_fn=loss,
        evaluate=evaluate,
        items_per_batch=train_cfg.batch_size,
        seed=seed,
        device=device,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        run=run,
        item_name="images",
        desc="controlnet",
    )
    model.eval()
    return model, result


@in_phase("sampling")
@torch.no_grad()
def sample(
    process: GaussianDiffusion,
    model: ControlledUNet,
    x_T: Tensor,
    labels: Tensor,
    cond: Tensor | None,
    eval_cfg: ControlNetEvalConfig,
    batch_size: int,
) -> Tensor:
    """Samples (N, C, H, W) in [-1, 1] from the given initial noise; `cond=None`: the base model alone."""
    device = x_T.device
    out = []
    for i in range(0, len(x_T), batch_size):
        extra = {} if cond is None else {"cond": cond[i : i + batch_size].to(device)}
        torch.manual_seed(i)  # the ancestral sampler's fresh noise: the same draws with and without control
        x = process.sample(
            model,
            tuple(x_T[i : i + batch_size].shape),
            steps=eval_cfg.steps,
            sampler=eval_cfg.sampler,
            x_T=x_T[i : i + batch_size],
            device=device,
            y=labels[i : i + batch_size].to(device),
            **extra,
        ).x
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class ControlNetInputs:
    controlnet: ControlNetConfig
    controlnet_train: TrainConfig
    controlnet_eval: ControlNetEvalConfig
    ddpm: DiffusionConfig
    fid: FIDConfig


@task(name="controlnet", cache_policy=NO_CACHE)
def controlnet_task(ctx: StageContext, inputs: ControlNetInputs) -> dict[str, float]:
    root, run, seed, device_name = ctx.root, ctx.run, ctx.seed, ctx.device
    cfg, train_cfg, eval_cfg = inputs.controlnet, inputs.controlnet_train, inputs.controlnet_eval
    ddpm_cfg, fid_cfg = inputs.ddpm, inputs.fid
    device = resolve_device(device_name)
    start = time.perf_counter()
    out = root / CONTROLNET_DIR
    process = GaussianDiffusion(ddpm_cfg)
    base = load_generator(root, "ddpm", device)
    check_fid_net(root)  # before training: the samples are scored with it
    data = {}
    for split in SPLITS:
        images = read_images(root, split)
        x = to_model_range(images.pixels)
        edges = edges_of(x, cfg)
        with atomic_path(out / "edges" / f"{split}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, edges.to(torch.uint8).numpy())
        data[split] = (x, torch.as_tensor(images.labels), edges)
    edge_density = float(data["train"][2].mean())

    model, result = fit_controlnet(
        process,
        base,
        cfg,
        train_cfg,
        data,
        eval_cfg.val_images,
        seed=seed,
        device=device,
        checkpoint=out / "checkpoint.pt",
        run=run,
    )
    save_controlnet(out / "model.pt", model.controlnet, meta=image_meta(root))

    evaluator = FIDEvaluator.load(root, fid_cfg, device)  # test statistics
    x_cond, y_cond, c_cond = data["val"]  # held-out conditions: in neither the FID reference nor training
    n = min(fid_cfg.samples, len(x_cond))
    labels, conditions = y_cond[:n], c_cond[:n]
    x_T = torch.randn((n, *x_cond.shape[1:]), generator=torch.Generator().manual_seed(seed + 1)).to(device)
    sample_start = time.perf_counter()
    controlled = sample(process, model, x_T, labels, conditions, eval_cfg, fid_cfg.batch_size)
    alone = sample(process, model, x_T, labels, None, eval_cfg, fid_cfg.batch_size)
    sample_seconds = time.perf_counter() - sample_start

    edges_control, edges_base = edges_of(controlled, cfg), edges_of(alone, cfg)
    f1_control = edge_f1(edges_control, conditions, eval_cfg.f1_tolerance)
    f1_base = edge_f1(edges_base, conditions, eval_cfg.f1_tolerance)
    report = evaluator.report(controlled, labels)
    report_base = evaluator.report(alone, labels)
    # Spread: more sample sets (initial noise seed + 1 + 100 k), each shared by the controlled and the base
    # sampling, so the FID difference is paired; and a bootstrap over the condition images for edge F1.
    fids, fids_base = [report["fid"]], [report_base["fid"]]
    for k in range(1, fid_cfg.headline_draws):
        g = torch.Generator().manual_seed(seed + 1 + 100 * k)
        noise = torch.randn((n, *x_cond.shape[1:]), generator=g).to(device)
        fids.append(evaluator.fid(sample(process, model, noise, labels, conditions, eval_cfg, fid_cfg.batch_size)).fid)
        fids_base.append(evaluator.fid(sample(process, model, noise, labels, None, eval_cfg, fid_cfg.batch_size)).fid)
    f1_gain = (f1_control - f1_base).double().numpy()  # (n,) per condition image
    gain = interval(f1_gain.mean(), ratio_resamples(f1_gain, np.ones(n), resample_indices(n, 1000, seed)))
    metrics: dict[str, Any] = {
        "ema_decay": train_cfg.ema_decay,  # the weights every number here comes from (0: the trained ones)
        "fid": report["fid"],
        "fid_base": report_base["fid"],
        **draw_spread(fids),
        **draw_spread(fids_base, prefix="fid_base"),
        **draw_spread([a - b for a, b in zip(fids, fids_base)], prefix="fid_control_minus_base"),
        "edge_f1_control_minus_base": gain.point,
        "edge_f1_control_minus_base_ci_low": gain.low,
        "edge_f1_control_minus_base_ci_high": gain.high,
        "fid_floor": evaluator.floor,
        "fid_ceiling": evaluator.ceiling,
        "fid_samples": report["fid_samples"],
        "fid_reference_images": report["fid_reference_images"],
        "condition_images": float(n),  # val images whose edges and labels condition both samplings
        "class_accuracy": report["class_accuracy"],
        "class_accuracy_base": report_base["class_accuracy"],
        "edge_f1_control": float(f1_control.mean()),
        "edge_f1_base": float(f1_base.mean()),
        # At 16 px a digit's edges cover ~20% of the image and a 1 px tolerance forgives a lot: the exact
        # (tolerance 0) agreement separates controlled from uncontrolled samples more sharply.
        "edge_f1_control_exact": float(edge_f1(edges_control, conditions, 0).mean()),
        "edge_f1_base_exact": float(edge_f1(edges_base, conditions, 0).mean()),
        "edge_density": edge_density,
        "val_loss": result.history[-1].get("val_loss", float("nan")),
        "val_loss_base": result.history[-1].get("val_loss_base", float("nan")),
        "train_seconds": result.train_seconds,
        "sample_seconds": sample_seconds,
        "trainable_parameters": float(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "frozen_parameters": float(sum(p.numel() for p in model.base.parameters())),
        "stage_seconds": time.perf_counter() - start,
    }
    write_json(root / METRICS_DIR / "controlnet.json", metrics)

    k = min(eval_cfg.grid_rows, n)
    triplets = torch.stack(
        [(conditions[:k] * 2 - 1).expand_as(controlled[:k]), controlled[:k], alone[:k]], dim=1
    ).flatten(0, 1)  # (3k, C, H, W)
    grid = write_png(image_grid(to_pixels(triplets), 3), out / "samples.png", upscale=2)

    flat = {key: float(v) for key, v in metrics.items() if isinstance(v, (int, float))}
    run.log_metrics(flat)
    run.log_artifact(grid, "samples")
    run.set_tags(
        {
            "kiln.headline": f"edge F1 {metrics['edge_f1_control']:.3f} with control, "
            f"{metrics['edge_f1_base']:.3f} without"
        }
    )
    print(
        f"controlnet: edge F1 {metrics['edge_f1_control']:.3f} with control vs {metrics['edge_f1_base']:.3f} base "
        f"alone; FID {metrics['fid']:.3f} (base {metrics['fid_base']:.3f}, floor {evaluator.floor:.3f}); "
        f"class accuracy {metrics['class_accuracy']:.3f}; {metrics['stage_seconds']:.1f} s"
    )
    return flat


SPEC = StageSpec(name="controlnet", family="generative", task=controlnet_task, inputs=ControlNetInputs)
