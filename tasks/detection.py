"""Detection tasks: `detector@{thundernet,one_stage}` (train, predict the test split), `map` (COCO
evaluation of both), `onnx` (export with NMS inside, onnxruntime parity, int8, latency, registry).

Predictions travel between stages as COCO result JSON (image_id, category_id, bbox xywh, score), so any
stage can be inspected or replaced by another tool.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from models.boxes import Detections
from models.coco_eval import STAT_NAMES, CocoEvalResult, evaluate_coco
from models.detector import DETECTORS, GrayscaleDetector, build_detector, to_model_input
from tasks.config import DetectionEvalConfig, OnnxConfig
from tasks.io import atomic_path, write_json, write_text
from tasks.layout import DETECTOR_DIR, METRICS_DIR, ONNX_DIR, PLOTS_DIR, SCENES_DIR
from tasks.scenes import load_split
from tasks.tracking import StageRun
from tasks.training import TrainConfig, TrainResult, load_model, resolve_device, save_model, train

DETECTOR_NAMES = tuple(DETECTORS)


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


def read_split(root: Path, split: str) -> Split:
    directory = root / SCENES_DIR / split
    if not (directory / "annotations.json").is_file():
        raise FileNotFoundError(f"{directory / 'annotations.json'}: missing; run the scenes stage first")
    images, targets, coco = load_split(directory)
    return Split(images, targets, coco)


def derived_detector_fields(name: str):
    """What `open_stage` fills into a detector's config from the data: classes and input size."""

    def derive(root: Path) -> dict[str, dict[str, Any]]:
        coco = json.loads((root / SCENES_DIR / "train" / "annotations.json").read_text())
        sizes = {(im["height"], im["width"]) for im in coco["images"]}
        if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
            raise ValueError(f"{root / SCENES_DIR}: the detectors need square images of one size, found {sorted(sizes)}")
        return {name: {"num_classes": len(coco["categories"]), "input_size": next(iter(sizes))[0]}}

    return derive


# ----------------------------------------------------------------------------------- compute


def pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) float in [0, 1]."""
    return torch.as_tensor(images, dtype=torch.float32)[:, None] / 255.0


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
    return [{"image_id": image_ids[int(i)], "category_id": category_ids[int(c)],
             "bbox": [round(float(v), 4) for v in box], "score": round(float(s), 6)}
            for box, s, c, i in zip(xywh, scores, labels, image_index)]


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
        return {**self.results(), "train_seconds": self.train.train_seconds,
                "train_images_per_s": self.train.items_per_second, "resumed_from_step": float(self.train.resumed_from)}


def fit_detector(name: str, model_cfg: Any, train_cfg: TrainConfig, eval_cfg: DetectionEvalConfig,
                 splits: dict[str, Split], *, seed: int, device: torch.device, checkpoint: Path | None,
                 run: StageRun | None) -> DetectorFit:
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
        result = evaluate_coco(val_split.coco, records)
        m.train()
        return {"val_ap": float(result.stats[0]), "val_ap50": float(result.stats[1])}

    fingerprint = {"model": name, "model_config": dataclasses.asdict(model_cfg),
                   "train_config": dataclasses.asdict(train_cfg), "seed": seed,
                   "train_images": len(train_x), "train_checksum": int(train_split.images.sum(dtype=np.int64))}
    result = train(model, train_cfg, next_batch=next_batch, loss_fn=detection_loss, evaluate=evaluate,
                   items_per_batch=train_cfg.batch_size, seed=seed, device=device, checkpoint=checkpoint,
                   fingerprint=fingerprint, run=run, item_name="images", desc=f"detector@{name}")
    records = predict(model, splits["test"], eval_cfg.batch_size, device)
    val_ap50 = result.history[-1]["val_ap50"] if result.history else float("nan")
    return DetectorFit(model, result, records, val_ap50, sum(p.numel() for p in model.parameters()))


def load_detector(path: Path, device: torch.device | str = "cpu") -> tuple[str, nn.Module]:
    return load_model(path, build_detector, device)


def read_predictions(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run its detector stage first")
    return json.loads(path.read_text())


def coco_summary(result: CocoEvalResult) -> dict[str, Any]:
    return {**{name: float(v) for name, v in zip(STAT_NAMES, result.stats)},
            "per_class_ap": {str(c): float(v) for c, v in zip(result.cat_ids, result.per_class_ap)}}


# ----------------------------------------------------------------------------------------- ONNX


def export_onnx(model: nn.Module, input_size: int, path: Path) -> bool:
    """GrayscaleDetector(model) to ONNX: (batch, 1, S, S) pixels in [0, 1] -> boxes, scores, labels,
    image_index, with box decoding and NMS in the graph. Returns whether the batch dimension came out
    dynamic; where the exporter had to specialise it, the model is re-exported for batch 1."""
    from models.boxes import ONNX_TRANSLATION_TABLE

    wrapper = GrayscaleDetector(model).eval()
    names = {"input_names": ["pixels"], "output_names": ["boxes", "scores", "labels", "image_index"]}
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(wrapper, (torch.rand(2, 1, input_size, input_size),), dynamo=True,
                                custom_translation_table=ONNX_TRANSLATION_TABLE, dynamic_shapes={"gray": {0: batch}},
                                verbose=False, **names)
    dynamic = bool(program.model_proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param)
    if not dynamic:
        program = torch.onnx.export(wrapper, (torch.rand(1, 1, input_size, input_size),), dynamo=True,
                                    custom_translation_table=ONNX_TRANSLATION_TABLE, verbose=False, **names)
    with atomic_path(path) as tmp:
        program.save(str(tmp))
    return dynamic


def onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, split: Split, batch_size: int) -> tuple[list[dict[str, Any]], list[tuple]]:
    """COCO records and the raw per-batch outputs of an onnxruntime session on a split."""
    name = session.get_inputs()[0].name
    records, raw = [], []
    for lo in range(0, len(split.images), batch_size):
        x = pixels(split.images[lo : lo + batch_size]).numpy()
        out = session.run(None, {name: x})
        raw.append(tuple(out))
        records += detections_to_coco(out, split.image_ids[lo : lo + batch_size], split.category_ids)
    return records, raw


def quantize_int8(fp32: Path, int8: Path, calibration: np.ndarray) -> None:
    """Static QDQ int8 quantisation (per-channel weights) calibrated on train images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixels": pixels(calibration[i : i + 1]).numpy()} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    with atomic_path(int8) as tmp:
        prepared = tmp.with_name(tmp.name + ".pre.onnx")
        try:
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"])
        finally:
            prepared.unlink(missing_ok=True)


def latency_ms(fn, example, warmup: int, runs: int) -> dict[str, float]:
    for _ in range(warmup):
        fn(example)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(example)
        times.append(1000 * (time.perf_counter() - start))
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}


# -------------------------------------------------------------------------------------- tasks


@task(name="detector", cache_policy=NO_CACHE)
def detector_task(root: Path, name: str, model_cfg: Any, train_cfg: TrainConfig, eval_cfg: DetectionEvalConfig,
                  seed: int, device_name: str, run: StageRun) -> dict[str, float]:
    splits = {split: read_split(root, split) for split in ("train", "val", "test")}
    for split in ("train", "test"):
        table = pd.DataFrame(splits[split].coco["annotations"])[["image_id", "category_id", "area"]]
        run.log_input(table, source=str(root / SCENES_DIR / split / "annotations.json"), name=f"scenes-{split}",
                      context=split)
    out_dir = root / DETECTOR_DIR / name
    fit = fit_detector(name, model_cfg, train_cfg, eval_cfg, splits, seed=seed, device=resolve_device(device_name),
                       checkpoint=out_dir / "checkpoint.pt", run=run)
    save_model(out_dir / "model.pt", name, model_cfg, fit.model)
    write_text(out_dir / "predictions_test.json", json.dumps(fit.test_predictions))
    write_json(root / METRICS_DIR / "detector" / f"{name}.json", fit.results())
    with atomic_path(root / PLOTS_DIR / "detector" / f"{name}.csv") as tmp:
        pd.DataFrame(fit.train.history).to_csv(tmp, index=False)
    metrics = fit.metrics()
    run.log_metrics(metrics)
    run.log_artifact(root / PLOTS_DIR / "detector" / f"{name}.csv", "plots")
    print(f"detector@{name}: val AP50 {fit.val_ap50:.3f} ({fit.parameters:,} parameters, "
          f"{fit.train.items_per_second:.1f} images/s)")
    return metrics


def pr_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=120)
    for name, (recall, precision) in curves.items():
        ax.plot(recall, precision, label=name)
    ax.set(xlabel="recall", ylabel="precision", title="Test precision-recall at IoU 0.5", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@task(name="map", cache_policy=NO_CACHE)
def map_task(root: Path, run: StageRun) -> dict[str, float]:
    test = read_split(root, "test")
    summaries, curves, rows = {}, {}, []
    for name in DETECTOR_NAMES:
        result = evaluate_coco(test.coco, read_predictions(root / DETECTOR_DIR / name / "predictions_test.json"))
        summaries[name] = coco_summary(result)
        recall, precision = result.pr_curve(iou=0.5)
        curves[name] = (recall, precision)
        rows += [{"detector": name, "recall": float(r), "precision": float(p)} for r, p in zip(recall, precision)]
    write_json(root / METRICS_DIR / "map.json", summaries)
    with atomic_path(root / PLOTS_DIR / "pr_curve.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    metrics = {f"{name}_{stat}": summaries[name][stat] for name in DETECTOR_NAMES for stat in STAT_NAMES}
    run.log_metrics(metrics)
    run.log_figure(pr_figure(curves), "plots/pr_curve.png")
    run.log_text(json.dumps(summaries, indent=2) + "\n", "map.json")
    for name in DETECTOR_NAMES:
        print(f"{name}: AP {summaries[name]['AP']:.3f}  AP50 {summaries[name]['AP50']:.3f}  "
              f"AP75 {summaries[name]['AP75']:.3f}  AR100 {summaries[name]['AR100']:.3f}")
    return metrics


def compare_outputs(torch_dets: list[Detections], onnx_out: list[tuple]) -> dict[str, float]:
    """Kept boxes must agree: same count and labels per batch, boxes and scores within tolerance."""
    count_mismatch, max_box, max_score = 0, 0.0, 0.0
    for ours, theirs in zip(torch_dets, onnx_out):
        boxes, scores, labels, image_index = theirs
        if len(boxes) != len(ours.boxes) or not np.array_equal(labels, ours.labels.numpy()) \
                or not np.array_equal(image_index, ours.image_index.numpy()):
            count_mismatch += 1
            continue
        if len(boxes):
            max_box = max(max_box, float(np.abs(boxes - ours.boxes.numpy()).max()))
            max_score = max(max_score, float(np.abs(scores - ours.scores.numpy()).max()))
    return {"batches_mismatched": float(count_mismatch), "max_box_diff": max_box, "max_score_diff": max_score}


@task(name="onnx", cache_policy=NO_CACHE)
def onnx_task(root: Path, cfg: OnnxConfig, run: StageRun) -> dict[str, Any]:
    import onnx

    test, train_split = read_split(root, "test"), read_split(root, "train")
    out_dir = root / ONNX_DIR
    report: dict[str, Any] = {}
    for name in DETECTOR_NAMES:
        _, model = load_detector(root / DETECTOR_DIR / name / "model.pt")
        size = model.config.input_size
        fp32, int8 = out_dir / f"{name}.onnx", out_dir / f"{name}.int8.onnx"
        dynamic = export_onnx(model, size, fp32)
        batch = cfg.batch_size if dynamic else 1
        session = onnx_session(fp32)
        onnx_records, onnx_raw = run_onnx(session, test, batch)
        with torch.no_grad():
            torch_dets = [GrayscaleDetector(model)(pixels(test.images[lo : lo + batch]))
                          for lo in range(0, len(test.images), batch)]
        torch_records = [r for lo, d in zip(range(0, len(test.images), batch), torch_dets)
                         for r in detections_to_coco(d, test.image_ids[lo : lo + batch], test.category_ids)]
        parity = compare_outputs(torch_dets, onnx_raw)
        if parity["batches_mismatched"]:
            print(f"warning: {name}: kept boxes differ between PyTorch and onnxruntime in "
                  f"{parity['batches_mismatched']:.0f} batch(es) (near-tied scores break differently in NMS)")
        ap_torch = evaluate_coco(test.coco, torch_records).stats
        ap_onnx = evaluate_coco(test.coco, onnx_records).stats
        entry: dict[str, Any] = {
            **parity, "dynamic_batch": float(dynamic), "map_torch": float(ap_torch[0]), "map_onnx": float(ap_onnx[0]),
            "ap50_torch": float(ap_torch[1]), "ap50_onnx": float(ap_onnx[1]),
            "map_abs_diff": float(abs(ap_torch[0] - ap_onnx[0])),
        }
        one = pixels(test.images[:1])
        wrapper = GrayscaleDetector(model).eval()
        with torch.no_grad():
            entry["latency_torch"] = latency_ms(wrapper, one, cfg.latency_warmup, cfg.latency_runs)
        feed = {session.get_inputs()[0].name: one.numpy()}
        entry["latency_onnx_fp32"] = latency_ms(lambda f: session.run(None, f), feed, cfg.latency_warmup, cfg.latency_runs)
        if cfg.quantize_int8:
            quantize_int8(fp32, int8, train_split.images[: cfg.calibration_images])
            session8 = onnx_session(int8)
            int8_records, _ = run_onnx(session8, test, batch)
            ap_int8 = evaluate_coco(test.coco, int8_records).stats
            entry.update({"map_onnx_int8": float(ap_int8[0]), "ap50_onnx_int8": float(ap_int8[1])})
            entry["latency_onnx_int8"] = latency_ms(lambda f: session8.run(None, f), feed, cfg.latency_warmup,
                                                    cfg.latency_runs)
        report[name] = entry
        register_onnx(run, name, onnx.load(str(fp32)), cfg.registered_model_prefix)
        print(f"{name}: mAP torch {entry['map_torch']:.4f} onnx {entry['map_onnx']:.4f}; "
              f"p50 torch {entry['latency_torch']['p50_ms']:.1f} ms, onnx {entry['latency_onnx_fp32']['p50_ms']:.1f} ms"
              + (f", int8 {entry['latency_onnx_int8']['p50_ms']:.1f} ms (mAP {entry['map_onnx_int8']:.4f})"
                 if cfg.quantize_int8 else ""))
    write_json(root / METRICS_DIR / "onnx.json", report)
    flat = {f"{name}_{k}": v for name, e in report.items() for k, v in e.items() if isinstance(v, float)}
    flat.update({f"{name}_{k}_{q}": v for name, e in report.items() for k, d in e.items() if isinstance(d, dict)
                 for q, v in d.items()})
    run.log_metrics(flat)
    return flat


def register_onnx(run: StageRun, name: str, model_proto, prefix: str) -> None:
    """Log the ONNX model to the stage's run and register it; the alias `newest` follows the last one."""
    import mlflow
    import mlflow.onnx

    registered = f"{prefix}{name}"
    with mlflow.start_run(run_id=run.run_id, nested=True):
        info = mlflow.onnx.log_model(model_proto, name=name, registered_model_name=registered)
    version = info.registered_model_version
    run.client.set_registered_model_alias(registered, "newest", str(version))
    run.set_tags({f"registered_model.{name}": f"{registered}@newest (version {version})"})
