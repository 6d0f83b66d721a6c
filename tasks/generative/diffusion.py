"""Diffusion tasks: `diffusion@{ddpm,sde_vp,sde_ve,ldm,dit_rf}` (train a network under one generative
process, then FID against the test split for every sampler and number of steps) and `guidance`
(classifier-free and classifier guidance swept over the guidance scale: FID against class accuracy).

The process (models/generative/ddpm.py, models/generative/sde.py, models/generative/rectified_flow.py) and the
network (models/generative/unet.py,
models/generative/dit.py) are separate: every generator here is a (process, network, data space) triple from
`GENERATORS`, trained by the one training loop and sampled through the processes' shared
`sample(model, shape, steps=, sampler=, guidance=, y=)`. All networks are class-conditional and trained
with label dropout (the process's `p_uncond`), so one model samples conditionally, unconditionally (the
null label) and with classifier-free guidance.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import Tensor, nn

from models.generative.ddpm import DiffusionConfig, GaussianDiffusion, Guidance
from models.generative.dit import DiT, DiTConfig
from models.generative.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from models.generative.sde import SDE, SDEConfig, build_sde
from models.generative.unet import UNet, UNetConfig
from tasks.generative.fid import FIDConfig, FIDEvaluator, balanced_labels, check_fid_net, draw_spread, image_meta
from tasks.generative.images import image_grid, read_images, to_model_range, to_pixels, write_png
from tasks.generative.vae import latent_model_meta, load_vae, read_latents
from tasks.io import atomic_path, write_json
from tasks.layout import DIFFUSION_DIR, LATENTS_DIR, METRICS_DIR, PLOTS_DIR
from tasks.phases import in_phase
from tasks.spec import StageContext, StageSpec, replicated
from tasks.tracking import StageRun
from tasks.training import (
    TrainConfig,
    code_digest,
    load_model_with_meta,
    read_model_meta,
    require_meta,
    resolve_device,
    save_model,
    train,
)

Process = GaussianDiffusion | SDE | RectifiedFlow
ProcessConfig = DiffusionConfig | SDEConfig | RectifiedFlowConfig
NetworkConfig = UNetConfig | DiTConfig
NETWORKS: dict[str, tuple[type, type[nn.Module]]] = {"unet": (UNetConfig, UNet), "dit": (DiTConfig, DiT)}


@dataclass(frozen=True)
class DiffusionEvalConfig:
    """`params/images.yaml: diffusion_eval`: how every generator is sampled and scored."""

    steps: list[int]  # the FID-versus-steps sweep, for each fixed-step sampler (the ODE solver is adaptive)
    flow_steps: list[int]  # the rectified-flow (Euler) sweep; dit_rf also runs the ldm UNet at these steps
    val_images: int  # val images in the validation loss at each evaluation
    grid_per_class: int  # samples per class in the logged grid

    def __post_init__(self) -> None:
        for name in ("steps", "flow_steps"):
            if not getattr(self, name) or any(s < 1 for s in getattr(self, name)):
                raise ValueError(f"{name} must be a non-empty list of ints >= 1, got {getattr(self, name)}")
        if self.val_images < 1 or self.grid_per_class < 1:
            raise ValueError("val_images and grid_per_class must be >= 1")


@dataclass(frozen=True)
class GeneratorSpec:
    process_section: str  # params section of the process config
    network_section: str  # params section of the network config
    network: Literal["unet", "dit"]
    train_section: str
    space: Literal["pixels", "latents"]
    samplers: tuple[str, ...]  # all evaluated; "ode" once (adaptive), the others at every step count
    headline: str  # the sampler whose FID at the most steps is the stage's `fid`
    steps_field: Literal["steps", "flow_steps"] = "steps"  # which diffusion_eval list is swept
    compare_with: str | None = None  # another generator sampled at the same step counts, for the comparison


GENERATORS: dict[str, GeneratorSpec] = {
    "ddpm": GeneratorSpec(
        process_section="ddpm",
        network_section="unet",
        network="unet",
        train_section="diffusion_train",
        space="pixels",
        samplers=("ancestral", "ddim"),
        headline="ancestral",
    ),
    "sde_vp": GeneratorSpec(
        process_section="sde_vp",
        network_section="unet",
        network="unet",
        train_section="diffusion_train",
        space="pixels",
        samplers=("euler_maruyama", "pc", "ode"),
        headline="pc",
    ),
    "sde_ve": GeneratorSpec(
        process_section="sde_ve",
        network_section="unet",
        network="unet",
        train_section="diffusion_train",
        space="pixels",
        samplers=("euler_maruyama", "pc", "ode"),
        headline="pc",
    ),
    "ldm": GeneratorSpec(
        process_section="ldm",
        network_section="ldm_unet",
        network="unet",
        train_section="ldm_train",
        space="latents",
        samplers=("ancestral", "ddim"),
        headline="ancestral",
    ),
    "dit_rf": GeneratorSpec(
        process_section="dit_rf",
        network_section="dit",
        network="dit",
        train_section="dit_train",
        space="latents",
        samplers=("euler",),
        headline="euler",
        steps_field="flow_steps",
        compare_with="ldm",
    ),
}
GENERATOR_NAMES = tuple(GENERATORS)
# Each generator's process config class (the params section `GENERATORS[name].process_section` holds it).
PROCESS_CONFIGS: dict[str, type] = {
    "ddpm": DiffusionConfig,
    "sde_vp": SDEConfig,
    "sde_ve": SDEConfig,
    "ldm": DiffusionConfig,
    "dit_rf": RectifiedFlowConfig,
}
SDE_KINDS = {"sde_vp": "vp", "sde_ve": "ve"}


def build_process(name: str, cfg: ProcessConfig) -> Process:
    if isinstance(cfg, SDEConfig):
        if cfg.kind != SDE_KINDS[name]:
            raise ValueError(f"params/images.yaml: {name}.kind must be {SDE_KINDS[name]!r}, got {cfg.kind!r}")
        return build_sde(cfg)
    if isinstance(cfg, RectifiedFlowConfig):
        return RectifiedFlow(cfg)
    return GaussianDiffusion(cfg)


def build_network(name: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a saved generator network: `name` is its NETWORKS key ("unet", "dit")."""
    config_cls, network_cls = NETWORKS[name]
    return network_cls(config_cls(**config))


def generator_meta(root: Path, name: str) -> dict[str, str]:
    """What generator `name` records it was trained on: the images' digest, and the latents cache's for a
    latent-space one."""
    return latent_model_meta(root) if GENERATORS[name].space == "latents" else image_meta(root)


def load_generator(root: Path, name: str, device: torch.device | str = "cpu") -> nn.Module:
    """The `diffusion@name` stage's network, refused (`StaleArtefact`) unless trained on the current data."""
    path = root / DIFFUSION_DIR / name / "model.pt"
    _, model, meta = load_model_with_meta(path, build_network, device)
    require_meta(root, path, meta, generator_meta(root, name), f"diffusion@{name}")
    return model


def check_generator(root: Path, name: str) -> None:
    """`load_generator`'s check alone, without building the network (a stage checks before it trains)."""
    path = root / DIFFUSION_DIR / name / "model.pt"
    require_meta(root, path, read_model_meta(path), generator_meta(root, name), f"diffusion@{name}")


def derived_generator_fields(name: str):
    """The UNet's channels, size and classes: from the images, or from the latent cache for `ldm`."""

    def derive(root: Path) -> dict[str, dict[str, Any]]:
        meta = json.loads((root / METRICS_DIR / "images.json").read_text())
        spec = GENERATORS[name]
        fields = {
            "in_channels": int(meta["channels"]),
            "image_size": int(meta["height"]),
            "num_classes": int(meta["classes"]),
        }
        if spec.space == "latents":
            c, h, _ = json.loads((root / LATENTS_DIR / "latents.json").read_text())["shape"]
            fields.update(in_channels=int(c), image_size=int(h))
        return {spec.network_section: fields}

    return derive


# ----------------------------------------------------------------------------------- data space


@dataclass
class DataSpace:
    """Training data in the space the process runs in, and the way back to pixels."""

    train: Tensor  # (N, c, h, w) model inputs
    train_labels: Tensor
    val: Tensor
    val_labels: Tensor
    decode: Callable[[Tensor], Tensor]  # model space -> images in [-1, 1]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def pixel_space(root: Path) -> DataSpace:
    train, val = read_images(root, "train"), read_images(root, "val")
    return DataSpace(
        to_model_range(train.pixels),
        torch.as_tensor(train.labels),
        to_model_range(val.pixels),
        torch.as_tensor(val.labels),
        decode=lambda x: x.clamp(-1, 1),
    )


def vae_space(
    vae: nn.Module, train: Tensor, train_labels: Tensor, val: Tensor, val_labels: Tensor, scale: float, batch_size: int
) -> DataSpace:
    """Unscaled latents times `scale` (unit variance); decoding divides it out again."""
    device = next(vae.parameters()).device

    @torch.no_grad()
    def decode(z: Tensor) -> Tensor:
        return torch.cat(
            [vae.decode(z[i : i + batch_size].to(device) / scale).cpu() for i in range(0, len(z), batch_size)]
        ).clamp(-1, 1)

    return DataSpace(train * scale, train_labels, val * scale, val_labels, decode)


def latent_space(root: Path, device: torch.device, batch_size: int) -> DataSpace:
    """The cached latents, scaled by the cache's scale factor, decoded by the `vae` stage's model."""
    train, val = read_latents(root, "train"), read_latents(root, "val")
    return vae_space(
        load_vae(root, device),
        torch.from_numpy(np.array(train.latents)),
        torch.as_tensor(train.labels),
        torch.from_numpy(np.array(val.latents)),
        torch.as_tensor(val.labels),
        train.scale_factor,
        batch_size,
    )


# ------------------------------------------------------------------------------------ sampling


@in_phase("sampling")
def sample_images(
    process: Process,
    model: nn.Module,
    space: DataSpace,
    labels: Tensor,
    *,
    sampler: str,
    steps: int | None,
    guidance: Callable[[Tensor], Guidance] | None = None,
    seed: int,
    batch_size: int,
    conditional: bool = True,
) -> tuple[Tensor, int]:
    """len(labels) images in [-1, 1] and the network evaluations per image. Every call with the same seed
    starts from the same noise, so samplers and step counts are compared on equal footing."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    parts, nfe = [], 0
    for i in range(0, len(labels), batch_size):
        y = labels[i : i + batch_size].to(device)
        if guidance is not None:
            cond: dict[str, Any] = {"guidance": guidance(y)}
        else:
            cond = {"y": y} if conditional else {}
        out = process.sample(
            model,
            (len(y), *space.sample_shape),
            steps=steps,
            sampler=sampler,
            generator=generator,
            device="cpu" if device.type == "cpu" else device,
            **cond,
        )
        parts.append(out.x.float().cpu())
        nfe = out.nfe
    return space.decode(torch.cat(parts)), nfe


@dataclass
class Sweep:
    rows: list[dict[str, Any]]  # one per (sampler, steps): fid, class accuracy, nfe, speed
    headline: dict[str, Any]  # the full FID report of the headline sampler at the most steps
    images: Tensor  # its samples, in [-1, 1]
    labels: Tensor


def sweep_samplers(
    name: str,
    process: Process,
    model: nn.Module,
    space: DataSpace,
    evaluator: FIDEvaluator,
    step_counts: list[int],
    fid_cfg: FIDConfig,
    seed: int,
    samplers: tuple[str, ...],
    headline_sampler: str,
) -> Sweep:
    """FID and class accuracy for every sampler and step count, and the headline samples."""
    labels = balanced_labels(fid_cfg.samples, evaluator.classifier.cfg.num_classes)
    rows: list[dict[str, Any]] = []
    sweep = None
    step_counts = sorted(step_counts)
    for sampler in samplers:
        for steps in [None] if sampler == "ode" else step_counts:
            start = time.perf_counter()
            images, nfe = sample_images(
                process,
                model,
                space,
                labels,
                sampler=sampler,
                steps=steps,
                seed=seed + 1,
                batch_size=fid_cfg.batch_size,
            )
            seconds = time.perf_counter() - start
            report = evaluator.report(images, labels)
            rows.append(
                {
                    "sampler": sampler,
                    "steps": steps or nfe,
                    "nfe": nfe,
                    "fid": report["fid"],
                    "class_accuracy": report["class_accuracy"],
                    "sample_seconds": seconds,
                    "images_per_s": len(labels) / seconds,
                }
            )
            print(
                f"{name}: {sampler} {steps or 'adaptive'} steps ({nfe} evaluations): FID {report['fid']:.3f}, "
                f"class accuracy {report['class_accuracy']:.3f}, {len(labels) / seconds:.1f} images/s"
            )
            if sampler == headline_sampler and (sampler == "ode" or steps == step_counts[-1]):
                sweep = Sweep(rows, {**report, "headline_steps": steps or nfe}, images, labels)
    assert sweep is not None, f"{name}: headline sampler {headline_sampler!r} is not among its samplers"
    return sweep


def headline_spread(
    process: Process,
    model: nn.Module,
    space: DataSpace,
    evaluator: FIDEvaluator,
    sweep: Sweep,
    sampler: str,
    fid_cfg: FIDConfig,
    seed: int,
) -> dict[str, float]:
    """The headline FID over `fid_cfg.headline_draws` independent sample sets: the sweep's own (seed + 1) and
    more with seeds seed + 1 + 100 k, same labels, sampler and steps. One sample set's FID moves with its noise
    by more than some of the differences the sweep shows; the spread says by how much."""
    fids = [sweep.headline["fid"]]
    for k in range(1, fid_cfg.headline_draws):
        images, _ = sample_images(
            process,
            model,
            space,
            sweep.labels,
            sampler=sampler,
            steps=None if sampler == "ode" else int(sweep.headline["headline_steps"]),
            seed=seed + 1 + 100 * k,
            batch_size=fid_cfg.batch_size,
        )
        fids.append(evaluator.fid(images).fid)
    return draw_spread(fids)


def fid_steps_figure(name: str, rows: list[dict], floor: float, ceiling: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    frame = pd.DataFrame(rows)
    for sampler, part in frame.groupby("sampler", sort=False):
        ax.plot(part["nfe"], part["fid"], marker="o", label=sampler)
    ax.axhline(floor, color="gray", linestyle="--", label=f"floor (train vs test) {floor:.2f}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="network evaluations per image",
        ylabel="FID vs test",
        title=f"{name}: FID by sampler and steps (noise ceiling {ceiling:.0f})",
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def class_grid_of(images: Tensor, labels: Tensor, per_class: int, num_classes: int) -> np.ndarray:
    """A grid with one row per class: its first `per_class` samples (fewer if every class has fewer)."""
    per_class = min(per_class, *(int((labels == k).sum()) for k in range(num_classes)))
    index = torch.cat([torch.nonzero(labels == k).flatten()[:per_class] for k in range(num_classes)])
    return image_grid(to_pixels(images[index]), per_class)


# ------------------------------------------------------------------------------------ training


def diffusion_loss(process: Process) -> Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]:
    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x0, y = batch
        return process.training_losses(model, x0, y=y)["loss"]

    return loss


def fit_generator(
    name: str,
    process: Process,
    net_cfg: NetworkConfig,
    train_cfg: TrainConfig,
    space: DataSpace,
    eval_cfg: DiffusionEvalConfig,
    *,
    seed: int,
    device: torch.device,
    checkpoint: Path | None,
    run: StageRun | None,
    fingerprint: dict[str, Any],
):
    torch.manual_seed(seed)
    model = NETWORKS[GENERATORS[name].network][1](net_cfg)
    x_train, y_train = space.train.to(device), space.train_labels.to(device)
    x_val, y_val = space.val[: eval_cfg.val_images].to(device), space.val_labels[: eval_cfg.val_images].to(device)

    def next_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(x_train), (train_cfg.batch_size,), generator=generator)
        return x_train[idx], y_train[idx]

    def evaluate(m: nn.Module) -> dict[str, float]:
        # The same timesteps and noise at every evaluation, so the curve shows the model, not the draw.
        g = torch.Generator(device).manual_seed(seed)
        return {"val_loss": float(process.training_losses(m, x_val, y=y_val, generator=g)["loss"])}

    fingerprint = {
        **fingerprint,
        "process_code": code_digest(model, sys.modules[type(process).__module__]),
        "network": asdict(net_cfg),
        "train": asdict(train_cfg),
        "seed": seed,
        "n": len(x_train),
        "train_checksum": float(space.train.double().sum()),
    }
    result = train(
        model,
        train_cfg,
        next_batch=next_batch,
        loss_fn=diffusion_loss(process),
        evaluate=evaluate,
        items_per_batch=train_cfg.batch_size,
        seed=seed,
        device=device,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        run=run,
        item_name="images",
        desc=f"diffusion@{name}",
    )
    model.eval()
    return model, result


@dataclass(frozen=True)
class DiffusionInputs:
    process: Any  # the item's process section (ddpm, sde_vp, ...), typed by GENERATORS
    network: Any  # its network section (unet, ldm_unet, dit)
    train: TrainConfig  # its training section
    diffusion_eval: DiffusionEvalConfig
    fid: FIDConfig
    compare: Any  # the process of GENERATORS[item].compare_with (its own where there is none)


@task(name="diffusion", cache_policy=NO_CACHE)
def diffusion_task(ctx: StageContext, inputs: DiffusionInputs) -> dict[str, float]:
    root, name, run, seed, device_name = ctx.root, ctx.item, ctx.run, ctx.seed, ctx.device
    instance = ctx.instance  # where the outputs go: `ddpm`, or `ddpm-2` for a replicate
    process_cfg, net_cfg, train_cfg = inputs.process, inputs.network, inputs.train
    eval_cfg, fid_cfg = inputs.diffusion_eval, inputs.fid
    compare_cfg = inputs.compare if GENERATORS[name].compare_with else None
    """Train generator `name`, sweep its samplers; `compare_cfg` is the process config of the generator
    `GENERATORS[name].compare_with`, whose trained model is sampled at the same step counts."""
    device = resolve_device(device_name)
    spec = GENERATORS[name]
    process = build_process(name, process_cfg)
    check_fid_net(root)  # before training: the samples are scored with it
    if spec.compare_with is not None and compare_cfg is not None:
        check_generator(root, spec.compare_with)  # sampled after training, beside this one
    space = pixel_space(root) if spec.space == "pixels" else latent_space(root, device, fid_cfg.batch_size)
    out = root / DIFFUSION_DIR / instance
    model, result = fit_generator(
        name,
        process,
        net_cfg,
        train_cfg,
        space,
        eval_cfg,
        seed=seed,
        device=device,
        checkpoint=out / "checkpoint.pt",
        run=run,
        fingerprint={"process": asdict(process_cfg)},
    )
    save_model(out / "model.pt", spec.network, net_cfg, model, meta=generator_meta(root, name))

    evaluator = FIDEvaluator.load(root, fid_cfg, device)
    step_counts = getattr(eval_cfg, spec.steps_field)
    sweep = sweep_samplers(
        name, process, model, space, evaluator, step_counts, fid_cfg, seed, spec.samplers, spec.headline
    )
    rows, images, labels, headline = sweep.rows, sweep.images, sweep.labels, sweep.headline
    spread = headline_spread(process, model, space, evaluator, sweep, spec.headline, fid_cfg, seed)
    samplers = list(spec.samplers)
    if spec.compare_with is not None and compare_cfg is not None:
        # The same latent space, noise and step counts: the network and the process are what differ.
        other_model = load_generator(root, spec.compare_with, device)
        other_rows = sweep_samplers(
            spec.compare_with,
            build_process(spec.compare_with, compare_cfg),
            other_model,
            space,
            evaluator,
            step_counts,
            fid_cfg,
            seed,
            ("ddim",),
            "ddim",
        ).rows
        rows += [{**r, "sampler": f"{spec.compare_with}_{r['sampler']}"} for r in other_rows]
        samplers.append(f"{spec.compare_with}_ddim")
    metrics = {
        **headline,
        "ema_decay": train_cfg.ema_decay,  # the weights every number here comes from (0: the trained ones)
        **spread,
        "headline_sampler": spec.headline,
        "train_seconds": result.train_seconds,
        "train_images_per_s": result.items_per_second,
        "sweep": rows,
    }
    write_json(root / METRICS_DIR / "diffusion" / f"{instance}.json", metrics)
    with atomic_path(root / PLOTS_DIR / "diffusion" / f"{instance}_fid_vs_steps.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    grid = write_png(
        class_grid_of(images, labels, eval_cfg.grid_per_class, evaluator.classifier.cfg.num_classes),
        out / "samples.png",
        upscale=2,
    )

    flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    run.log_metrics(flat)
    for sampler in samplers:
        part = [r for r in rows if r["sampler"] == sampler]
        run.log_metric_series(f"fid_{sampler}", {int(r["steps"]): r["fid"] for r in part})
        run.log_metric_series(f"images_per_s_{sampler}", {int(r["steps"]): r["images_per_s"] for r in part})
    run.log_figure(fid_steps_figure(instance, rows, evaluator.floor, evaluator.ceiling), "plots/fid_vs_steps.png")
    run.log_artifact(grid, "samples")
    run.set_tags({"kiln.headline": f"{spec.headline} sampler at {metrics['headline_steps']} steps"})
    print(
        f"diffusion@{instance} (seed {seed}): FID {headline['fid']:.3f} "
        f"({spec.headline}, {metrics['headline_steps']} steps; "
        f"{spread['fid_mean']:.3f} [{spread['fid_ci_low']:.3f}, {spread['fid_ci_high']:.3f}] over "
        f"{int(spread['fid_draws'])} sample sets; "
        f"floor {evaluator.floor:.3f}, noise ceiling {evaluator.ceiling:.1f}), "
        f"class accuracy {headline['class_accuracy']:.3f}"
    )
    return flat


def generator_sections(item: str) -> dict[str, tuple[str, type]]:
    spec = GENERATORS[item]
    compare = GENERATORS[spec.compare_with or item]
    return {
        "process": (spec.process_section, PROCESS_CONFIGS[item]),
        "network": (spec.network_section, NETWORKS[spec.network][0]),
        "train": (spec.train_section, TrainConfig),
        "compare": (compare.process_section, PROCESS_CONFIGS[spec.compare_with or item]),
    }


SPEC = StageSpec(
    name="diffusion",
    family="generative",
    task=diffusion_task,
    inputs=DiffusionInputs,
    items=GENERATOR_NAMES,
    sections=generator_sections,
    derive=lambda root, item: derived_generator_fields(item)(root),
    placeholders={
        "unet": {"in_channels": 1, "image_size": 16, "num_classes": 10},
        "ldm_unet": {"in_channels": 4, "image_size": 8, "num_classes": 10},
        "dit": {"in_channels": 4, "image_size": 8, "num_classes": 10},
    },
)

# The pixel generators again with seeds runtime.seed + r, r from `replicates.diffusion`:
# `diffusion_replicate@ddpm-1`, its outputs under `ddpm-1`. Only the pixel ones: they share their deps and
# params layout, which one DVC matrix of plain names can express; ldm and dit_rf differ in both.
PIXEL_GENERATORS = tuple(name for name, spec in GENERATORS.items() if spec.space == "pixels")
REPLICATE_SPEC = replicated(SPEC, name="diffusion_replicate", replicates="diffusion", items=PIXEL_GENERATORS)
SPECS = [SPEC, REPLICATE_SPEC]
