"""`guidance`: classifier-free guidance of the ddpm UNet and classifier guidance with a noisy classifier, traded off
by scale.

The scale is a hyperparameter, so it is chosen on validation: every sweep point is scored against the val
split (`val_fid`, `val_class_accuracy`), `select_on_validation` picks the scale of lowest val FID, and only
that scale is scored on test, once, with fresh samples (`<kind>_selected_test_fid`). No test number enters
the choice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import Tensor, nn

from models.generative.ddpm import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    DiffusionConfig,
    GaussianDiffusion,
    Guidance,
)
from models.generative.unet import EncoderClassifier, UNetConfig
from tasks.generative.diffusion import (
    DataSpace,
    DiffusionEvalConfig,
    class_grid_of,
    load_generator,
    pixel_space,
    sample_images,
)
from tasks.generative.fid import (
    FIDConfig,
    FIDEvaluator,
    balanced_labels,
    check_fid_net,
    derived_image_fields,
    draw_spread,
    image_meta,
)
from tasks.generative.images import write_png
from tasks.io import atomic_path, write_json
from tasks.layout import GUIDANCE_DIR, METRICS_DIR, PLOTS_DIR
from tasks.spec import StageContext, StageSpec
from tasks.tracking import StageRun
from tasks.training import TrainConfig, resolve_device, save_model, train

# ------------------------------------------------------------------------------------ guidance


@dataclass(frozen=True)
class GuidanceConfig:
    """`params/images.yaml: guidance`: the guidance-scale sweeps on the DDPM."""

    cfg_scales: list[float]  # classifier-free: 0 unconditional, 1 conditional, > 1 guided
    classifier_scales: list[float]  # classifier guidance on the unconditional model: 0 is unguided
    sampler: Literal["ancestral", "ddim"]
    steps: int

    def __post_init__(self) -> None:
        if not self.cfg_scales or not self.classifier_scales:
            raise ValueError("cfg_scales and classifier_scales must be non-empty")
        if any(s < 0 for s in [*self.cfg_scales, *self.classifier_scales]):
            raise ValueError("guidance scales must be >= 0")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def noisy_classification_loss(process: GaussianDiffusion):
    """Cross-entropy of the classifier on x_t ~ q(x_t | x_0) at a uniform t (Dhariwal & Nichol Section 4.1)."""

    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x0, y = batch
        t = torch.randint(0, process.num_timesteps, (len(x0),), device=x0.device)
        return F.cross_entropy(model(process.q_sample(x0, t), t), y)

    return loss


def fit_noisy_classifier(
    process: GaussianDiffusion,
    cfg: UNetConfig,
    train_cfg: TrainConfig,
    space: DataSpace,
    *,
    seed: int,
    device: torch.device,
    checkpoint: Path | None,
    run: StageRun | None,
) -> tuple[EncoderClassifier, dict[str, float]]:
    torch.manual_seed(seed)
    model = EncoderClassifier(cfg)
    x_train, y_train = space.train.to(device), space.train_labels.to(device)
    x_val, y_val = space.val.to(device), space.val_labels.to(device)

    def next_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(x_train), (train_cfg.batch_size,), generator=generator)
        return x_train[idx], y_train[idx]

    def evaluate(m: nn.Module) -> dict[str, float]:
        g = torch.Generator(device).manual_seed(seed)
        metrics = {}
        # Accuracy on clean-ish and on mid-noise inputs: guidance needs both ends to carry signal.
        for label, frac in (("t10", 0.1), ("t50", 0.5)):
            t = torch.full((len(x_val),), int(frac * process.num_timesteps), device=device)
            noise = torch.randn(x_val.shape, generator=g, device=device)
            logits = m(process.q_sample(x_val, t, noise), t)
            metrics[f"val_accuracy_{label}"] = float((logits.argmax(-1) == y_val).float().mean())
        return metrics

    fingerprint = {
        "unet": asdict(cfg),
        "train": asdict(train_cfg),
        "seed": seed,
        "n": len(x_train),
        "process": asdict(process.cfg),
    }
    result = train(
        model,
        train_cfg,
        next_batch=next_batch,
        loss_fn=noisy_classification_loss(process),
        evaluate=evaluate,
        items_per_batch=train_cfg.batch_size,
        seed=seed,
        device=device,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        run=run,
        item_name="images",
        desc="guidance classifier",
    )
    model.eval()
    return model, {f"classifier_{k}": v for k, v in result.history[-1].items() if k != "step"}


def select_on_validation(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep row of lowest val FID (the smaller scale on a tie). It reads `val_fid` and `scale` only, so
    test numbers riding along in a row cannot sway the choice."""
    if not rows:
        raise ValueError("no sweep rows to select from")
    return min(rows, key=lambda r: (float(r["val_fid"]), float(r["scale"])))


def tradeoff_figure(rows: list[dict], floor: float, selected: dict[str, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    frame = pd.DataFrame(rows)
    for kind, part in frame.groupby("guidance", sort=False):
        (line,) = ax.plot(part["val_class_accuracy"], part["val_fid"], marker="o", label=kind)
        for _, r in part.iterrows():
            ax.annotate(
                f"{r['scale']:g}",
                (r["val_class_accuracy"], r["val_fid"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        chosen = part[part["scale"] == selected[kind]].iloc[0]
        ax.scatter(
            [chosen["val_class_accuracy"]], [chosen["val_fid"]], s=90, facecolors="none", edgecolors=line.get_color()
        )
    ax.axhline(floor, color="gray", linestyle="--", label=f"val FID floor {floor:.2f}")
    ax.set(
        xlabel="class accuracy of samples (fid_net)",
        ylabel="FID vs val",
        yscale="log",
        title="Guidance scale on val (circled: selected)",
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class GuidanceInputs:
    ddpm: DiffusionConfig
    guidance_classifier: UNetConfig
    guidance_train: TrainConfig
    guidance: GuidanceConfig
    diffusion_eval: DiffusionEvalConfig
    fid: FIDConfig


def guided_against_unguided(
    kind: str,
    scale: float,
    first_fid: float,
    draw: Callable[[float, int], Tensor],
    evaluator: FIDEvaluator,
    seed: int,
    fid_cfg: FIDConfig,
) -> dict[str, float]:
    """Test FID of the chosen scale over `fid_cfg.headline_draws` sample sets (seeds seed + 2 + 100 k; the first
    is `first_fid`) and of scale 0 (no guidance) with the same seeds, so each pair shares its initial noise;
    the chosen scale's mean and 95 % interval, and the paired t-interval of the difference (chosen minus
    unguided): `{kind}_beats_unguided` is 1 when that interval lies below 0, 0 when it contains 0 (not
    significant) or lies above it. With one draw there is no interval and the flag is 0."""
    seeds = [seed + 2 + 100 * k for k in range(fid_cfg.headline_draws)]
    guided = [first_fid] + [evaluator.fid(draw(scale, s)).fid for s in seeds[1:]]
    unguided = guided if scale == 0.0 else [evaluator.fid(draw(0.0, s)).fid for s in seeds]
    difference = draw_spread([g - u for g, u in zip(guided, unguided)], prefix="diff")
    return {
        **draw_spread(guided, prefix=f"{kind}_selected_test_fid"),
        **draw_spread(unguided, prefix=f"{kind}_unguided_test_fid"),
        f"{kind}_minus_unguided_test_fid_mean": difference["diff_mean"],
        f"{kind}_minus_unguided_test_fid_ci_low": difference["diff_ci_low"],
        f"{kind}_minus_unguided_test_fid_ci_high": difference["diff_ci_high"],
        f"{kind}_beats_unguided": float(difference["diff_ci_high"] < 0),
    }


@task(name="guidance", cache_policy=NO_CACHE)
def guidance_task(ctx: StageContext, inputs: GuidanceInputs) -> dict[str, float]:
    root, run, seed, device_name = ctx.root, ctx.run, ctx.seed, ctx.device
    ddpm_cfg, classifier_cfg, train_cfg = inputs.ddpm, inputs.guidance_classifier, inputs.guidance_train
    cfg, eval_cfg, fid_cfg = inputs.guidance, inputs.diffusion_eval, inputs.fid
    device = resolve_device(device_name)
    process = GaussianDiffusion(ddpm_cfg)
    model = load_generator(root, "ddpm", device)
    check_fid_net(root)  # before training: the samples are scored with it
    space = pixel_space(root)
    out = root / GUIDANCE_DIR
    classifier, classifier_metrics = fit_noisy_classifier(
        process, classifier_cfg, train_cfg, space, seed=seed, device=device, checkpoint=out / "checkpoint.pt", run=run
    )
    save_model(out / "classifier.pt", "encoder_classifier", classifier_cfg, classifier, meta=image_meta(root))
    for p in classifier.parameters():
        p.requires_grad_(False)

    val_evaluator = FIDEvaluator.load(root, fid_cfg, device, split="val")
    test_evaluator = FIDEvaluator.load(root, fid_cfg, device, split="test")
    num_classes = test_evaluator.classifier.cfg.num_classes
    labels = balanced_labels(fid_cfg.samples, num_classes)
    guidances: dict[str, tuple[list[float], Callable[[float], Callable[[Tensor], Guidance]]]] = {
        "classifier_free": (cfg.cfg_scales, lambda s: lambda y: ClassifierFreeGuidance(y=y, scale=s)),
        "classifier": (cfg.classifier_scales, lambda s: lambda y: ClassifierGuidance(classifier, y=y, scale=s)),
    }

    drawn: dict[tuple, tuple[Tensor, int, float]] = {}

    def sample(kind: str, scale: float, sample_seed: int) -> tuple[Tensor, int, float]:
        """Samples, network evaluations per image and the seconds they took. Scale 0 of either kind is the
        unguided model from the same noise, so one sample set per seed serves both sweeps and both unguided
        baselines (it was drawn twice before, to the same FID)."""
        key = ("unguided", sample_seed) if scale == 0.0 else (kind, scale, sample_seed)
        if key not in drawn:
            start = time.perf_counter()
            images, nfe = sample_images(
                process,
                model,
                space,
                labels,
                sampler=cfg.sampler,
                steps=cfg.steps,
                guidance=guidances[kind][1](scale),
                seed=sample_seed,
                batch_size=fid_cfg.batch_size,
            )
            drawn[key] = images, nfe, time.perf_counter() - start
        return drawn[key]

    rows, grids = [], {}
    for kind, (scales, _) in guidances.items():
        for scale in scales:
            images, nfe, seconds = sample(kind, scale, seed + 1)
            report = val_evaluator.report(images, labels)
            rows.append(
                {
                    "guidance": kind,
                    "scale": scale,
                    "val_fid": report["fid"],
                    "val_class_accuracy": report["class_accuracy"],
                    "nfe": nfe,
                    "sample_seconds": seconds,
                }
            )
            print(
                f"guidance: {kind} scale {scale:g}: val FID {report['fid']:.3f}, class accuracy "
                f"{report['class_accuracy']:.3f}"
            )
            grids[(kind, scale)] = images
    metrics: dict[str, Any] = {
        **classifier_metrics,
        "val_fid_floor": val_evaluator.floor,
        "val_fid_ceiling": val_evaluator.ceiling,
        "val_fid_reference_images": float(val_evaluator.reference.n),
        "test_fid_floor": test_evaluator.floor,
        "test_fid_ceiling": test_evaluator.ceiling,
        "test_fid_reference_images": float(test_evaluator.reference.n),
        "fid_samples": float(len(labels)),
    }
    selected: dict[str, float] = {}
    for kind in guidances:
        part = [r for r in rows if r["guidance"] == kind]
        chosen = select_on_validation(part)
        selected[kind] = chosen["scale"]
        # Test, for the chosen scale only, with fresh samples (seed + 2): the samples that won on val would
        # carry their luck over to test.
        images, _, _ = sample(kind, chosen["scale"], seed + 2)
        test = test_evaluator.report(images, labels)
        metrics[f"{kind}_selected_scale"] = chosen["scale"]
        metrics[f"{kind}_selected_val_fid"] = chosen["val_fid"]
        metrics[f"{kind}_selected_val_class_accuracy"] = chosen["val_class_accuracy"]
        metrics[f"{kind}_selected_test_fid"] = test["fid"]
        metrics[f"{kind}_selected_test_class_accuracy"] = test["class_accuracy"]
        metrics |= guided_against_unguided(
            kind,
            chosen["scale"],
            test["fid"],
            lambda scale, k: sample(kind, scale, k)[0],
            test_evaluator,
            seed,
            fid_cfg,
        )
        print(
            f"guidance: {kind} selected on val: scale {chosen['scale']:g}; test FID {test['fid']:.3f}, "
            f"class accuracy {test['class_accuracy']:.3f}"
        )
        strongest = max(part, key=lambda r: r["scale"])
        grid = class_grid_of(grids[(kind, strongest["scale"])], labels, eval_cfg.grid_per_class, num_classes)
        run.log_artifact(write_png(grid, out / f"{kind}_samples.png", upscale=2), "samples")
        # Scales are floats; MLflow steps are ints, so the series is indexed by position in the sweep.
        run.log_metric_series(f"{kind}_val_fid", {i: r["val_fid"] for i, r in enumerate(part)})
        run.log_metric_series(f"{kind}_val_class_accuracy", {i: r["val_class_accuracy"] for i, r in enumerate(part)})
    rows = [{**r, "selected": r["scale"] == selected[r["guidance"]]} for r in rows]
    with atomic_path(root / PLOTS_DIR / "guidance.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    metrics["sweep"] = rows
    write_json(root / METRICS_DIR / "guidance.json", metrics)
    flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    run.log_metrics(flat)
    run.log_figure(tradeoff_figure(rows, val_evaluator.floor, selected), "plots/guidance_tradeoff.png")
    return flat


SPEC = StageSpec(
    name="guidance",
    family="generative",
    task=guidance_task,
    inputs=GuidanceInputs,
    derive=lambda root, item: derived_image_fields("guidance_classifier")(root),
    placeholders={"guidance_classifier": {"in_channels": 1, "image_size": 16, "num_classes": 10}},
)
