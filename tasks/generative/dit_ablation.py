"""`dit_ablation`: SD3 design choices each changed alone on the DiT with rectified flow, compared by FID."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.generative.dit import DiTConfig
from models.generative.rectified_flow import RectifiedFlow, RectifiedFlowConfig
from models.generative.vae import VAEConfig
from tasks.generative.diffusion import (
    DataSpace,
    DiffusionEvalConfig,
    derived_generator_fields,
    fit_generator,
    latent_space,
    sample_images,
    vae_space,
)
from tasks.generative.fid import FIDConfig, FIDEvaluator, balanced_labels, derived_image_fields, draw_spread
from tasks.generative.images import read_images, to_model_range
from tasks.generative.vae import fit_vae
from tasks.io import atomic_path, write_json
from tasks.layout import METRICS_DIR, PLOTS_DIR
from tasks.spec import StageContext, StageSpec
from tasks.training import TrainConfig, resolve_device

# ------------------------------------------------------------------------------- SD3 ablations


@dataclass(frozen=True)
class DiTAblationConfig:
    """`params/images.yaml: dit_ablation`: SD3's design choices, each changed alone from `dit` / `dit_rf`
    and trained with the same (shorter) budget as a re-trained baseline, compared by FID."""

    variants: list[str]  # names from ABLATIONS; "baseline" is the committed dit + dit_rf configuration
    train_steps: int  # optimizer steps of every variant (dit_train's other settings)
    sample_steps: int  # Euler steps of every variant's FID

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in ABLATIONS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be names from {sorted(ABLATIONS)}, got {self.variants}")
        if self.train_steps < 1 or self.sample_steps < 1:
            raise ValueError("train_steps and sample_steps must be >= 1")


# variant -> (process overrides, network overrides, VAE latent channels or None for the cached latents)
ABLATIONS: dict[str, tuple[dict[str, Any], dict[str, Any], int | None]] = {
    "baseline": ({}, {}, None),
    "uniform_t": ({"timestep_sampling": "uniform"}, {}, None),  # SD3: logit-normal beats uniform
    "pos1d": ({}, {"pos_embed": "1d"}, None),  # 1D sine-cosine over the flattened patch index
    "no_qknorm": ({}, {"qk_norm": False}, None),  # SD3 adds RMSNorm on q, k for stability
    "latent8": ({}, {}, 8),  # SD3: more latent channels reconstruct better and, at scale, generate better
}


def retrained_vae_space(
    root: Path,
    channels: int,
    vae_cfg: VAEConfig,
    vae_train: TrainConfig,
    seed: int,
    device: torch.device,
    batch_size: int,
) -> DataSpace:
    """A VAE like the `vae` stage's with another latent width, trained here, and its scaled latents."""
    splits = {s: read_images(root, s) for s in ("train", "val", "test")}
    fit = fit_vae(
        replace(vae_cfg, latent_channels=channels),
        vae_train,
        splits,
        seed=seed,
        device=device,
        checkpoint=None,
        run=None,
    )
    with torch.no_grad():
        train_z = fit.model.encode(to_model_range(splits["train"].pixels).to(device)).cpu()
        val_z = fit.model.encode(to_model_range(splits["val"].pixels).to(device)).cpu()
    return vae_space(
        fit.model,
        train_z,
        torch.as_tensor(splits["train"].labels),
        val_z,
        torch.as_tensor(splits["val"].labels),
        float(1 / train_z.std()),
        batch_size,
    )


def ablation_figure(rows: list[dict], floor: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=120)
    mean = np.array([r["fid_mean"] for r in rows])
    # 95 % interval over sample sets; NaN (one draw) draws no bar.
    err = np.nan_to_num(np.array([[m - r["fid_ci_low"], r["fid_ci_high"] - m] for m, r in zip(mean, rows)]).T)
    ax.barh([r["variant"] for r in rows], mean, xerr=err, capsize=3)
    ax.axvline(floor, color="gray", linestyle="--", label=f"FID floor {floor:.2f}")
    ax.set(
        xlabel="FID vs test, mean and 95 % interval over sample sets (lower is better)",
        title="DiT-RF: SD3 design choices, one at a time",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class DiTAblationInputs:
    dit_ablation: DiTAblationConfig
    dit: DiTConfig
    dit_rf: RectifiedFlowConfig
    dit_train: TrainConfig
    vae: VAEConfig
    vae_train: TrainConfig
    diffusion_eval: DiffusionEvalConfig
    fid: FIDConfig


@task(name="dit_ablation", cache_policy=NO_CACHE)
def dit_ablation_task(ctx: StageContext, inputs: DiTAblationInputs) -> dict[str, float]:
    root, run, seed, device_name = ctx.root, ctx.run, ctx.seed, ctx.device
    cfg, dit_cfg, rf_cfg, train_cfg = inputs.dit_ablation, inputs.dit, inputs.dit_rf, inputs.dit_train
    vae_cfg, vae_train, eval_cfg, fid_cfg = inputs.vae, inputs.vae_train, inputs.diffusion_eval, inputs.fid
    device = resolve_device(device_name)
    evaluator = FIDEvaluator.load(root, fid_cfg, device)
    budget = replace(
        train_cfg,
        steps=cfg.train_steps,
        warmup_steps=min(train_cfg.warmup_steps, cfg.train_steps),
        eval_every=cfg.train_steps,
        checkpoint_every=cfg.train_steps,
    )
    cached = latent_space(root, device, fid_cfg.batch_size)
    labels = balanced_labels(fid_cfg.samples, evaluator.classifier.cfg.num_classes)
    rows = []
    for variant in cfg.variants:
        process_changes, network_changes, channels = ABLATIONS[variant]
        space = (
            cached
            if channels is None
            else retrained_vae_space(root, channels, vae_cfg, vae_train, seed, device, fid_cfg.batch_size)
        )
        net_cfg = replace(dit_cfg, in_channels=space.sample_shape[0], **network_changes)
        process = RectifiedFlow(replace(rf_cfg, **process_changes))
        model, result = fit_generator(
            "dit_rf",
            process,
            net_cfg,
            budget,
            space,
            eval_cfg,
            seed=seed,
            device=device,
            checkpoint=None,
            run=None,
            fingerprint={},
        )
        images, _ = sample_images(
            process,
            model,
            space,
            labels,
            sampler="euler",
            steps=cfg.sample_steps,
            seed=seed + 1,
            batch_size=fid_cfg.batch_size,
        )
        report = evaluator.report(images, labels)
        # The same model sampled again with fresh noise (seed + 1 + 100 k): the FID's spread over sample sets.
        more = [
            evaluator.fid(
                sample_images(
                    process,
                    model,
                    space,
                    labels,
                    sampler="euler",
                    steps=cfg.sample_steps,
                    seed=seed + 1 + 100 * k,
                    batch_size=fid_cfg.batch_size,
                )[0]
            ).fid
            for k in range(1, fid_cfg.headline_draws)
        ]
        rows.append(
            {
                "variant": variant,
                "fid": report["fid"],
                **draw_spread([report["fid"], *more]),
                "class_accuracy": report["class_accuracy"],
                "latent_channels": space.sample_shape[0],
                "train_seconds": result.train_seconds,
            }
        )
        print(
            f"dit_ablation: {variant}: FID {report['fid']:.3f}, class accuracy {report['class_accuracy']:.3f} "
            f"({cfg.train_steps} steps, {cfg.sample_steps} Euler steps)"
        )
    metrics: dict[str, Any] = {
        "ema_decay": train_cfg.ema_decay,  # every variant's weights (0: the trained ones)
        "fid_floor": evaluator.floor,
        "fid_ceiling": evaluator.ceiling,
        "variants": rows,
        **{f"fid_{r['variant']}": r["fid"] for r in rows},
    }
    write_json(root / METRICS_DIR / "dit_ablation.json", metrics)
    with atomic_path(root / PLOTS_DIR / "dit_ablation.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    run.log_metrics(flat)
    run.log_figure(ablation_figure(rows, evaluator.floor), "plots/dit_ablation.png")
    return flat


def _derive(root: Path, item: str) -> dict[str, dict[str, Any]]:
    return {**derived_generator_fields("dit_rf")(root), **derived_image_fields("vae", ("in_channels",))(root)}


SPEC = StageSpec(
    name="dit_ablation",
    family="generative",
    task=dit_ablation_task,
    inputs=DiTAblationInputs,
    derive=_derive,
    placeholders={"dit": {"in_channels": 4, "image_size": 8, "num_classes": 10}, "vae": {"in_channels": 1}},
)
