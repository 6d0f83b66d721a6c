"""FID in the project feature space: the `fid_net` stage (a digit classifier whose penultimate layer is the
feature space), the extractor (it or user InceptionV3 weights) and the evaluator every generator uses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import Tensor, nn

from models.generative.fid import (
    FeatureStats,
    FIDResult,
    InceptionV3Pool3,
    feature_statistics,
    frechet_distance_from_stats,
)
from models.generative.fid_net import FeatureExtractor, FIDNet, FIDNetConfig
from models.seeds import seed_summary
from tasks.generative.images import ImageSet, images_digest, read_images, to_model_range
from tasks.io import write_json
from tasks.layout import FID_NET_DIR, METRICS_DIR, SPLITS
from tasks.phases import in_phase
from tasks.spec import StageContext, StageSpec
from tasks.tracking import StageRun
from tasks.training import (
    TrainConfig,
    load_model_with_meta,
    read_model_meta,
    require_meta,
    resolve_device,
    save_model,
    train,
)


@dataclass(frozen=True)
class FIDConfig:
    """`params/images.yaml: fid`: how generated samples are scored."""

    samples: int  # generated images per FID; well above the feature dimension
    batch_size: int  # images per sampling / feature batch
    inception_weights: str  # empty: the fid_net features; else a local InceptionV3 state_dict (2048-d pool3)
    bound_draws: int  # random draws of `samples` train (floor) and noise (ceiling) images the bounds average
    headline_draws: int  # independent sample sets a generator's headline FID is reported over (mean, 95 % CI)

    def __post_init__(self) -> None:
        if self.samples < 2 or self.batch_size < 1:
            raise ValueError(f"samples must be >= 2 and batch_size >= 1, got {self.samples}, {self.batch_size}")
        if self.bound_draws < 2:
            raise ValueError(f"bound_draws must be >= 2 (the bounds report a spread), got {self.bound_draws}")
        if self.headline_draws < 1:
            raise ValueError(f"headline_draws must be >= 1, got {self.headline_draws}")


# ------------------------------------------------------------------------- FID network stage


def derived_image_fields(section: str, fields: tuple[str, ...] = ("in_channels", "image_size", "num_classes")):
    """What `open_stage` fills into an image model's config from the data: channels, size, classes."""

    def derive(root: Path) -> dict[str, dict[str, Any]]:
        meta = json.loads((root / METRICS_DIR / "images.json").read_text())
        known = {
            "in_channels": int(meta["channels"]),
            "image_size": int(meta["height"]),
            "num_classes": int(meta["classes"]),
        }
        return {section: {name: known[name] for name in fields}}

    return derive


def classification_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    return correct / max(1, len(x))


def build_fid_net(name: str, config: dict[str, Any]) -> FIDNet:
    return FIDNet(FIDNetConfig(**config))


def fit_fid_net(
    cfg: FIDNetConfig,
    train_cfg: TrainConfig,
    splits: dict[str, ImageSet],
    *,
    seed: int,
    device: torch.device,
    checkpoint: Path | None,
    run: StageRun | None,
) -> tuple[FIDNet, dict]:
    torch.manual_seed(seed)
    model = FIDNet(cfg)
    data = {s: (to_model_range(p.pixels).to(device), torch.as_tensor(p.labels).to(device)) for s, p in splits.items()}
    x_train, y_train = data["train"]

    def next_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(x_train), (train_cfg.batch_size,), generator=generator)
        return x_train[idx], y_train[idx]

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"val_accuracy": accuracy(m, *data["val"])}

    fingerprint = {
        "config": cfg.__dict__,
        "train": train_cfg.__dict__,
        "seed": seed,
        "train_checksum": int(splits["train"].pixels.sum(dtype=np.int64)),
        "n": len(x_train),
    }
    result = train(
        model,
        train_cfg,
        next_batch=next_batch,
        loss_fn=classification_loss,
        evaluate=evaluate,
        items_per_batch=train_cfg.batch_size,
        seed=seed,
        device=device,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        run=run,
        item_name="images",
        desc="fid_net",
    )
    model.eval()
    return model, {
        "test_accuracy": accuracy(model, *data["test"]),
        "val_accuracy": accuracy(model, *data["val"]),
        "train_seconds": result.train_seconds,
        "feature_dim": float(cfg.feature_dim),
    }


def image_meta(root: Path) -> dict[str, str]:
    """What an image model records it was trained on (`save_model(meta=...)`): the images stage's digest."""
    return {"images_digest": images_digest(root)}


@in_phase("loading")
def load_fid_net(root: Path, device: torch.device | str = "cpu") -> FIDNet:
    """The `fid_net` stage's network, refused (`StaleArtefact`) unless trained on the current images."""
    path = root / FID_NET_DIR / "model.pt"
    _, net, meta = load_model_with_meta(path, build_fid_net, device)
    require_meta(root, path, meta, image_meta(root), "fid_net")
    return net


def check_fid_net(root: Path) -> None:
    """`load_fid_net`'s check alone, without building the network: a stage that scores with FID after training
    calls it first, so a stale fid_net is refused before the training, not after it."""
    path = root / FID_NET_DIR / "model.pt"
    require_meta(root, path, read_model_meta(path), image_meta(root), "fid_net")


def fid_extractor(root: Path, fid_cfg: FIDConfig, device: torch.device) -> nn.Module:
    """The FID feature network: the dataset's fid_net, or InceptionV3 pool3 from a local weights file."""
    if fid_cfg.inception_weights:
        path = root / fid_cfg.inception_weights
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (fid.inception_weights)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return InceptionV3Pool3.from_state_dict(state, normalize_input=False).to(device).eval()
    return FeatureExtractor(load_fid_net(root, device)).eval()


@torch.no_grad()
def features_of(extractor: nn.Module, x: Tensor, batch_size: int) -> np.ndarray:
    device = next(extractor.parameters()).device
    return torch.cat(
        [extractor(x[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(x), batch_size)]
    ).numpy()


@dataclass(frozen=True)
class FIDBounds:
    """The FID scale of a reference split at the generators' sample size: mean and std over draws."""

    floor: float  # FID(n random train images, reference): what a perfect generator scores with n samples
    floor_std: float
    ceiling: float  # FID(n uniform-noise images, reference)
    ceiling_std: float
    samples: int  # n
    draws: int

    def metrics(self, prefix: str = "fid_") -> dict[str, float]:
        return {
            f"{prefix}floor": self.floor,
            f"{prefix}floor_std": self.floor_std,
            f"{prefix}ceiling": self.ceiling,
            f"{prefix}ceiling_std": self.ceiling_std,
            f"{prefix}bound_samples": float(self.samples),
            f"{prefix}bound_draws": float(self.draws),
        }


def stratified_rows(train_labels: np.ndarray, per_class: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """Rows of train images, `per_class[c]` of class c drawn without replacement, class by class."""
    rows = []
    for c, k in enumerate(per_class):
        members = np.flatnonzero(train_labels == c)
        if k > len(members):
            raise ValueError(f"the floor needs {k} train images of class {c}, the train split has {len(members)}")
        rows.append(members[torch.randperm(len(members), generator=generator)[:k].numpy()])
    return np.concatenate(rows)


@in_phase("scoring")
def fid_bounds(
    extractor: nn.Module,
    train: Tensor,
    train_labels: np.ndarray,
    num_classes: int,
    reference: FeatureStats,
    fid_cfg: FIDConfig,
    seed: int,
) -> FIDBounds:
    """Floor and ceiling at n = `fid_cfg.samples` images, the size generators are scored at. FID is biased
    upward at small n (the covariance estimate's error adds to the distance; Chong & Forsyth 2020, "Effectively
    Unbiased FID"), so a floor from all the train images sits below what a perfect generator scores with n
    samples. Each draw takes n train images without replacement (train shares no image with the reference
    split) with the class counts the generators sample (`balanced_labels`): a plain random subset's class
    shares wander from the reference's and add their own distance, which put the floor above the generators'
    FIDs. The ceiling takes n fresh uniform-noise images; the bounds are the mean and sample std over the draws."""
    n = min(fid_cfg.samples, len(train))
    per_class = np.bincount(balanced_labels(n, num_classes).numpy(), minlength=num_classes)
    train_f = features_of(extractor, train, fid_cfg.batch_size)  # (N, d), once for every draw
    generator = torch.Generator().manual_seed(seed)
    floors, ceilings = [], []
    for _ in range(fid_cfg.bound_draws):
        rows = stratified_rows(np.asarray(train_labels), per_class, generator)
        floors.append(frechet_distance_from_stats(feature_statistics(train_f[rows]), reference).fid)
        noise = torch.rand((n, *train.shape[1:]), generator=generator) * 2 - 1
        noise_f = features_of(extractor, noise, fid_cfg.batch_size)
        ceilings.append(frechet_distance_from_stats(feature_statistics(noise_f), reference).fid)
    return FIDBounds(
        float(np.mean(floors)),
        float(np.std(floors, ddof=1)),
        float(np.mean(ceilings)),
        float(np.std(ceilings, ddof=1)),
        n,
        fid_cfg.bound_draws,
    )


def draw_spread(fids: list[float], prefix: str = "fid") -> dict[str, float]:
    """Mean, sample std and the 95 % Student-t interval of the mean of FIDs of independent sample sets
    (`{prefix}_draws`, `_mean`, `_std`, `_ci_low`, `_ci_high`): models/seeds.py's summary, as metrics. One draw
    has no spread: std and the interval are NaN, so a reader never takes a single draw for a measured interval."""
    summary = seed_summary(fids)
    return {
        f"{prefix}_draws": float(summary.n),
        f"{prefix}_mean": summary.mean,
        f"{prefix}_std": summary.std,
        f"{prefix}_ci_low": summary.low,
        f"{prefix}_ci_high": summary.high,
    }


@dataclass
class FIDEvaluator:
    """FID of images (model range, [-1, 1]) against one split's reference statistics (test unless told:
    the guidance stage selects its scale against val), and the class accuracy of samples."""

    extractor: nn.Module
    classifier: FIDNet
    reference: FeatureStats  # the reference split's features
    batch_size: int
    bounds: FIDBounds  # floor and ceiling against the reference split, at the generators' sample size
    split: str = "test"  # the reference split

    @property
    def floor(self) -> float:
        return self.bounds.floor

    @property
    def ceiling(self) -> float:
        return self.bounds.ceiling

    @classmethod
    @in_phase("scoring")
    def load(cls, root: Path, fid_cfg: FIDConfig, device: torch.device, split: str = "test") -> FIDEvaluator:
        """The evaluator against `split` ("test" or "val"). The test bounds are the fid_net stage's; for val
        they are computed here the same way (`fid_bounds`, seed 0)."""
        if split not in ("test", "val"):
            raise ValueError(f"FID reference split must be 'test' or 'val', got {split!r}")
        extractor = fid_extractor(root, fid_cfg, device)
        classifier = load_fid_net(root, device)
        images = read_images(root, split).pixels
        reference = feature_statistics(features_of(extractor, to_model_range(images), fid_cfg.batch_size))
        if split == "test":
            saved = json.loads((root / METRICS_DIR / "fid_net.json").read_text())
            bounds = FIDBounds(
                saved["fid_floor"],
                saved["fid_floor_std"],
                saved["fid_ceiling"],
                saved["fid_ceiling_std"],
                int(saved["fid_bound_samples"]),
                int(saved["fid_bound_draws"]),
            )
        else:
            train = read_images(root, "train")
            pixels = to_model_range(train.pixels)
            bounds = fid_bounds(extractor, pixels, train.labels, len(train.classes), reference, fid_cfg, seed=0)
        return cls(extractor, classifier, reference, fid_cfg.batch_size, bounds, split)

    @in_phase("scoring")
    def fid(self, x: Tensor) -> FIDResult:
        return frechet_distance_from_stats(
            feature_statistics(features_of(self.extractor, x, self.batch_size)), self.reference
        )

    @in_phase("scoring")
    def class_accuracy(self, x: Tensor, y: Tensor) -> float:
        device = next(self.classifier.parameters()).device
        return accuracy(self.classifier, x.to(device), y.to(device), self.batch_size)

    @in_phase("scoring")
    def report(self, x: Tensor, y: Tensor | None = None) -> dict[str, float]:
        """fid, its reference floor and noise ceiling, the sample counts, and class accuracy when labelled."""
        result = self.fid(x)
        out = {
            "fid": result.fid,
            **self.bounds.metrics(),
            "fid_samples": float(result.n_a),
            "fid_reference_images": float(result.n_b),
            "fid_feature_dim": float(result.feature_dim),
            "fid_imaginary_residue": result.imaginary_residue,
        }
        if y is not None:
            out["class_accuracy"] = self.class_accuracy(x, y)
        return out


def balanced_labels(n: int, num_classes: int) -> Tensor:
    """n labels cycling through the classes: the test split's stratified class balance."""
    return torch.arange(n) % num_classes


@dataclass(frozen=True)
class FIDNetInputs:
    fid_net: FIDNetConfig
    fid_net_train: TrainConfig
    fid: FIDConfig


@task(name="fid_net", cache_policy=NO_CACHE)
def fid_net_task(ctx: StageContext, inputs: FIDNetInputs) -> dict[str, float]:
    root, run, seed, device_name = ctx.root, ctx.run, ctx.seed, ctx.device
    cfg, train_cfg, fid_cfg = inputs.fid_net, inputs.fid_net_train, inputs.fid
    device = resolve_device(device_name)
    splits = {s: read_images(root, s) for s in SPLITS}
    out = root / FID_NET_DIR
    model, metrics = fit_fid_net(
        cfg, train_cfg, splits, seed=seed, device=device, checkpoint=out / "checkpoint.pt", run=run
    )
    save_model(out / "model.pt", "fid_net", cfg, model, meta=image_meta(root))
    # The FID scale of this dataset at the generators' sample size: a perfect generator scores about the floor
    # (real train images vs test), noise scores the ceiling. Both use the extractor the generators are scored with.
    extractor = fid_extractor(root, fid_cfg, device)
    test_stats = feature_statistics(features_of(extractor, to_model_range(splits["test"].pixels), fid_cfg.batch_size))
    train = to_model_range(splits["train"].pixels)
    bounds = fid_bounds(
        extractor, train, splits["train"].labels, len(splits["train"].classes), test_stats, fid_cfg, seed
    )
    # The old floor, every train image against test: kept to show the small-sample bias it hid.
    every_train = frechet_distance_from_stats(
        feature_statistics(features_of(extractor, train, fid_cfg.batch_size)), test_stats
    )
    metrics.update(
        {
            **bounds.metrics(),
            "fid_floor_all_train": every_train.fid,
            "fid_floor_all_train_images": float(every_train.n_a),
            "fid_reference_images": float(every_train.n_b),
            "fid_feature_dim": float(every_train.feature_dim),
        }
    )
    write_json(root / METRICS_DIR / "fid_net.json", metrics)
    run.log_metrics(metrics)
    print(
        f"fid_net: test accuracy {metrics['test_accuracy']:.4f}; at n = {bounds.samples}: FID floor (train vs test) "
        f"{bounds.floor:.3f} ± {bounds.floor_std:.3f}, ceiling (noise vs test) {bounds.ceiling:.1f} ± "
        f"{bounds.ceiling_std:.1f} over {bounds.draws} draws (every train image: {every_train.fid:.3f}); "
        f"{every_train.feature_dim}-d features, {every_train.n_b} test images"
    )
    return metrics


SPEC = StageSpec(
    name="fid_net",
    family="generative",
    task=fid_net_task,
    inputs=FIDNetInputs,
    derive=lambda root, item: derived_image_fields("fid_net")(root),
    placeholders={"fid_net": {"in_channels": 1, "image_size": 16, "num_classes": 10}},
)
