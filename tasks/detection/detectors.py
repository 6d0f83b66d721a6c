"""Detection tasks: `detector@{thundernet,one_stage}` (train, predict the test split); the stages after it,
`map` (COCO evaluation of both, tasks/detection/map.py) and `onnx` (export with NMS inside, onnxruntime parity,
int8, latency, registry: onnx_export.py), have modules of their own and import from this one.

Predictions travel between stages as COCO result records (image_id, category_id, bbox xywh, score), so any
stage can be inspected or replaced by another tool; predictions_test.json holds them under `predictions`,
beside `meta`, what the detector was trained on (`labels_digest`, `input_size`), which `map` checks as `onnx`
checks the model's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from models.detection.boxes import Detections
from models.detection.coco_eval import CocoEvalResult, evaluate_coco
from models.detection.detectors import DETECTORS, build_detector, to_model_input
from tasks.detection.scenes import labels_digest, load_split
from tasks.io import atomic_path, write_json, write_text
from tasks.layout import DETECTOR_DIR, METRICS_DIR, PLOTS_DIR, SCENES_DIR
from tasks.phases import in_phase
from tasks.spec import StageContext, StageSpec, replicated
from tasks.tracking import StageRun
from tasks.training import (
    TrainConfig,
    TrainResult,
    load_model_with_meta,
    require_meta,
    resolve_device,
    save_model,
    train,
)

DETECTOR_NAMES = tuple(DETECTORS)


@dataclass(frozen=True)
class DetectionEvalConfig:
    """`params/detection.yaml: detection_eval`: how detectors are evaluated during and after training."""

    batch_size: int  # images per inference batch

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Split:
    images: np.ndarray  # (N, H, W) uint8
    targets: list[dict[str, np.ndarray]]  # per image: boxes (n, 4) xyxy pixels, labels (n,) 0..C-1
    coco: dict[str, Any]

    @property
    def image_ids(self) -> list[int]:
        return [int(image["id"]) for image in sorted(self.coco["images"], key=lambda im: im["id"])]

    @property
    def category_ids(self) -> list[int]:
        return [int(c["id"]) for c in sorted(self.coco["categories"], key=lambda c: c["id"])]


@in_phase("scoring")
def coco_map(gt: dict[str, Any], detections: list[dict[str, Any]]) -> CocoEvalResult:
    """COCO bbox evaluation (models/detection/coco_eval.py), counted as the stage profile's scoring phase."""
    return evaluate_coco(gt, detections)


@in_phase("loading")
def read_split(root: Path, split: str) -> Split:
    directory = root / SCENES_DIR / split
    if not (directory / "annotations.json").is_file():
        raise FileNotFoundError(f"{directory / 'annotations.json'}: missing; run the scenes stage first")
    images, targets, coco = load_split(directory)
    return Split(images, targets, coco)


def derived_detector_fields(name: str):
    """What `open_stage` fills into a detector's config from the data: classes and input size, and for the
    one-stage detector the largest training box side, which decides the FPN levels it builds (models/detection/
    fcos.py: a level no box can reach would never get a positive)."""

    def derive(root: Path) -> dict[str, dict[str, Any]]:
        coco = json.loads((root / SCENES_DIR / "train" / "annotations.json").read_text())
        sizes = {(im["height"], im["width"]) for im in coco["images"]}
        if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
            raise ValueError(
                f"{root / SCENES_DIR}: the detectors need square images of one size, found {sorted(sizes)}"
            )
        size = next(iter(sizes))[0]
        fields: dict[str, Any] = {"num_classes": len(coco["categories"]), "input_size": size}
        if name == "one_stage":
            fields["max_box_size"] = float(max((max(a["bbox"][2:]) for a in coco["annotations"]), default=math.inf))
        return {name: fields}

    return derive


# ----------------------------------------------------------------------------------- compute


def pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) float in [0, 1]."""
    return torch.as_tensor(images, dtype=torch.float32)[:, None] / 255.0


@in_phase("evaluation")
@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int, device: torch.device) -> list[dict[str, Any]]:
    """COCO result records of the model's detections on every image of the split."""
    model.eval()
    ids, cats = split.image_ids, split.category_ids
    records: list[dict[str, Any]] = []
    for lo in range(0, len(split.images), batch_size):
        dets: Detections = model(to_model_input(pixels(split.images[lo : lo + batch_size]).to(device)))
        records += detections_to_coco(dets, ids[lo : lo + batch_size], cats)
    return records


def detections_to_coco(dets: Detections | tuple, image_ids: list[int], category_ids: list[int]) -> list[dict]:
    boxes, scores, labels, image_index = (np.asarray(t.cpu() if torch.is_tensor(t) else t) for t in dets)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    return [
        {
            "image_id": image_ids[int(i)],
            "category_id": category_ids[int(c)],
            "bbox": [round(float(v), 4) for v in box],
            "score": round(float(s), 6),
        }
        for box, s, c, i in zip(xywh, scores, labels, image_index)
    ]


def detection_loss(model: nn.Module, batch) -> torch.Tensor:
    x, targets = batch
    return sum(model(x, targets).values())


@dataclass
class DetectorFit:
    model: nn.Module
    train: TrainResult
    test_predictions: list[dict[str, Any]]
    val_ap50: float
    parameters: int

    def results(self) -> dict[str, float]:
        return {"val_ap50_final": self.val_ap50, "parameters": float(self.parameters)}

    def metrics(self) -> dict[str, float]:
        return {
            **self.results(),
            "train_seconds": self.train.train_seconds,
            "train_images_per_s": self.train.items_per_second,
            "resumed_from_step": float(self.train.resumed_from),
        }


def fit_detector(
    name: str,
    model_cfg: Any,
    train_cfg: TrainConfig,
    eval_cfg: DetectionEvalConfig,
    splits: dict[str, Split],
    *,
    seed: int,
    device: torch.device,
    checkpoint: Path | None,
    run: StageRun | None,
) -> DetectorFit:
    torch.manual_seed(seed)
    model = build_detector(name, model_cfg)
    train_split, val_split = splits["train"], splits["val"]
    train_x = pixels(train_split.images)
    train_targets = [{k: torch.as_tensor(v) for k, v in t.items()} for t in train_split.targets]

    def next_batch(generator: torch.Generator):
        idx = torch.randint(0, len(train_x), (train_cfg.batch_size,), generator=generator)
        x = to_model_input(train_x[idx]).to(device)
        return x, [{k: v.to(device) for k, v in train_targets[int(i)].items()} for i in idx]

    def evaluate(m: nn.Module) -> dict[str, float]:
        records = predict(m, val_split, eval_cfg.batch_size, device)
        result = coco_map(val_split.coco, records)
        m.train()
        return {"val_ap": float(result.stats[0]), "val_ap50": float(result.stats[1])}

    fingerprint = {
        "model": name,
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": dataclasses.asdict(train_cfg),
        "seed": seed,
        "train_images": len(train_x),
        "train_checksum": int(train_split.images.sum(dtype=np.int64)),
    }
    result = train(
        model,
        train_cfg,
        next_batch=next_batch,
        loss_fn=detection_loss,
        evaluate=evaluate,
        items_per_batch=train_cfg.batch_size,
        seed=seed,
        device=device,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        run=run,
        item_name="images",
        desc=f"detector@{name}",
    )
    records = predict(model, splits["test"], eval_cfg.batch_size, device)
    val_ap50 = result.history[-1]["val_ap50"] if result.history else float("nan")
    return DetectorFit(model, result, records, val_ap50, sum(p.numel() for p in model.parameters()))


def detector_meta(split: Split) -> dict[str, str]:
    """What a detector records it was trained on, and what a stage using one expects: the split's labels digest
    and its (square) image size."""
    return {"labels_digest": labels_digest(split.coco), "input_size": str(split.images.shape[1])}


def load_detector(path: Path, device: torch.device | str = "cpu") -> tuple[str, nn.Module]:
    """`(name, model)`, unchecked; `load_checked_detector` refuses one trained on other scenes."""
    name, model, _ = load_model_with_meta(path, build_detector, device)
    return name, model


def load_checked_detector(root: Path, name: str, split: Split, device: torch.device | str = "cpu") -> nn.Module:
    """`detector@name`'s model, refused (`StaleArtefact`) unless trained on `split`'s labels and image size."""
    path = root / DETECTOR_DIR / name / "model.pt"
    _, model, meta = load_model_with_meta(path, build_detector, device)
    require_meta(root, path, meta, detector_meta(split), f"detector@{name}")
    return model


@in_phase("io")
def write_predictions(path: Path, records: list[dict[str, Any]], meta: dict[str, str]) -> None:
    write_text(path, json.dumps({"meta": meta, "predictions": records}))


def read_predictions(path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The COCO result records and the meta they were predicted under ({} for a bare record list)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run its detector stage first")
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return data, {}
    return data["predictions"], dict(data.get("meta") or {})


def read_checked_predictions(root: Path, name: str, split: Split) -> list[dict[str, Any]]:
    """`detector@name`'s test predictions, refused (`StaleArtefact`) unless made on `split`'s labels and size."""
    path = root / DETECTOR_DIR / name / "predictions_test.json"
    records, meta = read_predictions(path)
    require_meta(root, path, meta, detector_meta(split), f"detector@{name}")
    return records


# -------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class DetectorInputs:
    model: Any  # the item's section (thundernet, one_stage), typed by DETECTORS
    detector_train: TrainConfig
    detection_eval: DetectionEvalConfig


@task(name="detector", cache_policy=NO_CACHE)
def detector_task(ctx: StageContext, inputs: DetectorInputs) -> dict[str, float]:
    root, name, run, seed, device_name = ctx.root, ctx.item, ctx.run, ctx.seed, ctx.device
    model_cfg, train_cfg, eval_cfg = inputs.model, inputs.detector_train, inputs.detection_eval
    splits = {split: read_split(root, split) for split in ("train", "val", "test")}
    for split in ("train", "test"):
        table = pd.DataFrame(splits[split].coco["annotations"])[["image_id", "category_id", "area"]]
        run.log_input(
            table, source=str(root / SCENES_DIR / split / "annotations.json"), name=f"scenes-{split}", context=split
        )
    instance = ctx.instance  # where the outputs go: `thundernet`, or `thundernet-2` for a replicate
    out_dir = root / DETECTOR_DIR / instance
    fit = fit_detector(
        name,
        model_cfg,
        train_cfg,
        eval_cfg,
        splits,
        seed=seed,
        device=resolve_device(device_name),
        checkpoint=out_dir / "checkpoint.pt",
        run=run,
    )
    meta = detector_meta(splits["train"])
    save_model(out_dir / "model.pt", name, model_cfg, fit.model, meta=meta)
    write_predictions(out_dir / "predictions_test.json", fit.test_predictions, meta)
    write_json(root / METRICS_DIR / "detector" / f"{instance}.json", fit.results())
    with atomic_path(root / PLOTS_DIR / "detector" / f"{instance}.csv") as tmp:
        pd.DataFrame(fit.train.history).to_csv(tmp, index=False)
    metrics = fit.metrics()
    run.log_metrics(metrics)
    run.log_artifact(root / PLOTS_DIR / "detector" / f"{instance}.csv", "plots")
    print(
        f"{instance} (seed {seed}): val AP50 {fit.val_ap50:.3f} ({fit.parameters:,} parameters, "
        f"{fit.train.items_per_second:.1f} images/s)"
    )
    return metrics


SPEC = StageSpec(
    name="detector",
    family="detection",
    task=detector_task,
    inputs=DetectorInputs,
    items=DETECTOR_NAMES,
    sections=lambda item: {"model": (item, DETECTORS[item][0])},
    derive=lambda root, item: derived_detector_fields(item)(root),
    placeholders={
        name: {"num_classes": 1, "input_size": 32} | ({"max_box_size": 32.0} if name == "one_stage" else {})
        for name in DETECTORS
    },
)
# The same training with seeds runtime.seed + r, r from `replicates.detector`: `detector_replicate@thundernet-1`.
REPLICATE_SPEC = replicated(SPEC, name="detector_replicate", replicates="detector")
SPECS = [SPEC, REPLICATE_SPEC]
