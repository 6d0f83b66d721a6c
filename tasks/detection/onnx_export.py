"""`onnx`: the detectors exported to ONNX (fp32 and static int8), parity with torch and latency in onnxruntime."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from models.detection.boxes import Detections
from models.detection.detectors import GrayscaleDetector
from tasks.detection.detectors import (
    DETECTOR_NAMES,
    Split,
    coco_map,
    detections_to_coco,
    load_checked_detector,
    pixels,
    read_split,
)
from tasks.io import atomic_path, write_json
from tasks.layout import METRICS_DIR, ONNX_DIR
from tasks.phases import in_phase
from tasks.spec import StageContext, StageSpec
from tasks.tracking import StageRun, pinned_requirements

# ----------------------------------------------------------------------------------------- ONNX


@in_phase("io")
def export_onnx(model: nn.Module, input_size: int, path: Path) -> bool:
    """GrayscaleDetector(model) to ONNX: (batch, 1, S, S) pixels in [0, 1] -> boxes, scores, labels,
    image_index, with box decoding and NMS in the graph. Returns whether the batch dimension came out
    dynamic; where the exporter had to specialise it, the model is re-exported for batch 1."""
    from models.detection.boxes import ONNX_TRANSLATION_TABLE

    wrapper = GrayscaleDetector(model).eval()
    names = {"input_names": ["pixels"], "output_names": ["boxes", "scores", "labels", "image_index"]}
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        wrapper,
        (torch.rand(2, 1, input_size, input_size),),
        dynamo=True,
        custom_translation_table=ONNX_TRANSLATION_TABLE,
        dynamic_shapes={"gray": {0: batch}},
        verbose=False,
        **names,
    )
    dynamic = bool(program.model_proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param)
    if not dynamic:
        program = torch.onnx.export(
            wrapper,
            (torch.rand(1, 1, input_size, input_size),),
            dynamo=True,
            custom_translation_table=ONNX_TRANSLATION_TABLE,
            verbose=False,
            **names,
        )
    with atomic_path(path) as tmp:
        program.save(str(tmp))
    return dynamic


def onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@in_phase("evaluation")
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


@in_phase("io")
def quantize_int8(fp32: Path, int8: Path, calibration: np.ndarray) -> None:
    """Static QDQ int8 quantisation (per-channel weights) calibrated on train images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
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
            quantize_static(
                str(prepared),
                str(tmp),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            )
        finally:
            prepared.unlink(missing_ok=True)


@in_phase("evaluation")
def latency_ms(fn, example, warmup: int, runs: int) -> dict[str, float]:
    for _ in range(warmup):
        fn(example)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(example)
        times.append(1000 * (time.perf_counter() - start))
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}


def compare_outputs(torch_dets: list[Detections], onnx_out: list[tuple]) -> dict[str, float]:
    """Kept boxes must agree: same count and labels per batch, boxes and scores within tolerance."""
    count_mismatch, max_box, max_score = 0, 0.0, 0.0
    for ours, theirs in zip(torch_dets, onnx_out):
        boxes, scores, labels, image_index = theirs
        if (
            len(boxes) != len(ours.boxes)
            or not np.array_equal(labels, ours.labels.numpy())
            or not np.array_equal(image_index, ours.image_index.numpy())
        ):
            count_mismatch += 1
            continue
        if len(boxes):
            max_box = max(max_box, float(np.abs(boxes - ours.boxes.numpy()).max()))
            max_score = max(max_score, float(np.abs(scores - ours.scores.numpy()).max()))
    return {"batches_mismatched": float(count_mismatch), "max_box_diff": max_box, "max_score_diff": max_score}


@dataclass(frozen=True)
class OnnxConfig:
    """`params/detection.yaml: onnx`: export, parity, int8 and latency of the detectors."""

    batch_size: int  # images per onnxruntime call in the parity run (the batch dimension is dynamic)
    quantize_int8: bool  # also write <name>.int8.onnx (static QDQ quantisation) and measure it
    calibration_images: int  # train images that calibrate the int8 activations
    latency_warmup: int
    latency_runs: int  # batch-1 calls timed for p50/p95
    registered_model_prefix: str  # MLflow registry name = prefix + detector name

    def __post_init__(self) -> None:
        for name in ("batch_size", "calibration_images", "latency_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.latency_warmup < 0:
            raise ValueError(f"latency_warmup must be >= 0, got {self.latency_warmup}")


@dataclass(frozen=True)
class OnnxInputs:
    onnx: OnnxConfig


@task(name="onnx", cache_policy=NO_CACHE)
def onnx_task(ctx: StageContext, inputs: OnnxInputs) -> dict[str, Any]:
    root, cfg, run = ctx.root, inputs.onnx, ctx.run
    test, train_split = read_split(root, "test"), read_split(root, "train")
    out_dir = root / ONNX_DIR
    report: dict[str, Any] = {}
    # Every detector checked against the scenes before any export: a stale one stops the stage at once.
    models = {name: load_checked_detector(root, name, test) for name in DETECTOR_NAMES}
    for name, model in models.items():
        size = model.config.input_size
        fp32, int8 = out_dir / f"{name}.onnx", out_dir / f"{name}.int8.onnx"
        dynamic = export_onnx(model, size, fp32)
        batch = cfg.batch_size if dynamic else 1
        session = onnx_session(fp32)
        onnx_records, onnx_raw = run_onnx(session, test, batch)
        with torch.no_grad():
            torch_dets = [
                GrayscaleDetector(model)(pixels(test.images[lo : lo + batch]))
                for lo in range(0, len(test.images), batch)
            ]
        torch_records = [
            r
            for lo, d in zip(range(0, len(test.images), batch), torch_dets)
            for r in detections_to_coco(d, test.image_ids[lo : lo + batch], test.category_ids)
        ]
        parity = compare_outputs(torch_dets, onnx_raw)
        if parity["batches_mismatched"]:
            print(
                f"warning: {name}: kept boxes differ between PyTorch and onnxruntime in "
                f"{parity['batches_mismatched']:.0f} batch(es) (near-tied scores break differently in NMS)"
            )
        ap_torch = coco_map(test.coco, torch_records).stats
        ap_onnx = coco_map(test.coco, onnx_records).stats
        entry: dict[str, Any] = {
            **parity,
            "dynamic_batch": float(dynamic),
            "map_torch": float(ap_torch[0]),
            "map_onnx": float(ap_onnx[0]),
            "ap50_torch": float(ap_torch[1]),
            "ap50_onnx": float(ap_onnx[1]),
            "map_abs_diff": float(abs(ap_torch[0] - ap_onnx[0])),
        }
        one = pixels(test.images[:1])
        wrapper = GrayscaleDetector(model).eval()
        with torch.no_grad():
            entry["latency_torch"] = latency_ms(wrapper, one, cfg.latency_warmup, cfg.latency_runs)
        feed = {session.get_inputs()[0].name: one.numpy()}
        entry["latency_onnx_fp32"] = latency_ms(
            lambda f: session.run(None, f), feed, cfg.latency_warmup, cfg.latency_runs
        )
        if cfg.quantize_int8:
            quantize_int8(fp32, int8, train_split.images[: cfg.calibration_images])
            session8 = onnx_session(int8)
            int8_records, _ = run_onnx(session8, test, batch)
            ap_int8 = coco_map(test.coco, int8_records).stats
            entry.update({"map_onnx_int8": float(ap_int8[0]), "ap50_onnx_int8": float(ap_int8[1])})
            entry["latency_onnx_int8"] = latency_ms(
                lambda f: session8.run(None, f), feed, cfg.latency_warmup, cfg.latency_runs
            )
        report[name] = entry
        print(
            f"{name}: mAP torch {entry['map_torch']:.4f} onnx {entry['map_onnx']:.4f}; "
            f"p50 torch {entry['latency_torch']['p50_ms']:.1f} ms, onnx {entry['latency_onnx_fp32']['p50_ms']:.1f} ms"
            + (
                f", int8 {entry['latency_onnx_int8']['p50_ms']:.1f} ms (mAP {entry['map_onnx_int8']:.4f})"
                if cfg.quantize_int8
                else ""
            )
        )
    write_json(root / METRICS_DIR / "onnx.json", report)
    flat = {f"{name}_{k}": v for name, e in report.items() for k, v in e.items() if isinstance(v, float)}
    flat.update(
        {
            f"{name}_{k}_{q}": v
            for name, e in report.items()
            for k, d in e.items()
            if isinstance(d, dict)
            for q, v in d.items()
        }
    )
    run.log_metrics(flat)
    # Registered once every figure is measured, so the registry's tags are the metrics above and no
    # registry write runs between two latency measurements.
    example = pixels(test.images[:1]).numpy()
    for name, entry in report.items():
        fp32, int8 = out_dir / f"{name}.onnx", out_dir / f"{name}.int8.onnx"
        register_onnx(run, name, fp32, cfg.registered_model_prefix, entry, example, "fp32")
        if cfg.quantize_int8:
            register_onnx(run, name, int8, cfg.registered_model_prefix, entry, example, "int8")
    return flat


OUTPUTS_DESCRIPTION = (
    "boxes float32 (N, 4): x1, y1, x2, y2 in input pixels; scores float32 (N,); labels int64 (N,): class index "
    "0..num_classes-1 (the scenes' categories in id order); image_index int64 (N,): which image of the batch. "
    "Box decoding and non-maximum suppression are in the graph: these are the kept detections of the whole batch."
)


def onnx_model_description(name: str, precision: str, input_size: int) -> str:
    """What a registry user needs before calling the model: the input tensor, its pixel scale, the outputs."""
    how = "fp32" if precision == "fp32" else "static QDQ int8 (per-channel weights, calibrated on train scenes)"
    return (
        f"Kiln detector `{name}` exported to ONNX, {how}, by the `onnx` stage (tasks/detection/onnx_export.py). "
        f"Input `pixels` float32 (batch, 1, {input_size}, {input_size}): grayscale scenes scaled to [0, 1] "
        f"(uint8 / 255); the batch dimension is dynamic. Outputs: {OUTPUTS_DESCRIPTION} "
        "Alias `newest` follows the last registered version."
    )


def registry_figures(entry: dict[str, Any], precision: str) -> dict[str, float]:
    """The figures a version earned, from the stage's own report entry: test mAP and AP50 in onnxruntime,
    batch-1 latency percentiles."""
    suffix = "" if precision == "fp32" else "_int8"
    latency = entry[f"latency_onnx_{precision}"]
    return {
        "test_map": entry[f"map_onnx{suffix}"],
        "test_ap50": entry[f"ap50_onnx{suffix}"],
        "latency_p50_ms": latency["p50_ms"],
        "latency_p95_ms": latency["p95_ms"],
    }


def register_onnx(
    run: StageRun,
    name: str,
    path: Path,
    prefix: str,
    entry: dict[str, Any],
    example: np.ndarray,
    precision: str = "fp32",
) -> None:
    """Log one exported detector to the stage's run as an MLflow ONNX model, with a signature inferred from
    a real input (`example`, a (1, 1, S, S) float32 test scene in [0, 1]) and the model's own outputs on it,
    and register it as `<prefix><name>` (fp32) or `<prefix><name>-int8`, alias `newest`, with descriptions
    and tags (stage, commit, profile, what it scored)."""
    import mlflow.onnx
    import onnx
    from mlflow.models import infer_signature

    registered = f"{prefix}{name}" + ("" if precision == "fp32" else f"-{precision}")
    session = onnx_session(path)
    feed = {session.get_inputs()[0].name: example}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    run_tags = run.client.get_run(run.run_id).data.tags
    figures = registry_figures(entry, precision)
    tags = {
        "kiln.stage": run_tags.get("kiln.stage", "onnx"),
        "kiln.detector": name,
        "kiln.precision": precision,
        "kiln.profile": run_tags.get("kiln.profile", ""),
        "mlflow.source.git.commit": run_tags.get("mlflow.source.git.commit", ""),
        **{f"kiln.{k}": f"{v:.6g}" for k, v in figures.items()},
    }
    description = onnx_model_description(name, precision, int(example.shape[-1]))
    info = run.log_model(
        mlflow.onnx,
        f"{name}-{precision}",
        tags=tags,
        registered_model_name=registered,
        onnx_model=onnx.load(str(path)),
        signature=infer_signature(feed, outputs),
        input_example=feed,
        # Explicit (what MLflow would infer for an ONNX model), so MLflow does not load the model in a
        # subprocess to infer them: registering the four models took 16.5 s with inference, 4.2 s without.
        pip_requirements=pinned_requirements("mlflow", "numpy", "onnx", "onnxruntime"),
        metadata={"description": description},
    )
    version = str(info.registered_model_version)
    client = run.client
    client.update_registered_model(registered, description=description)
    scored = ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
    client.update_model_version(
        registered,
        version,
        description=f"{description}\n\nFrom run {run.run_id} (stage `onnx`, profile {tags['kiln.profile']}, "
        f"commit {tags['mlflow.source.git.commit']}): {scored}.",
    )
    for key, value in tags.items():
        client.set_model_version_tag(registered, version, key, value)
    client.set_registered_model_tag(registered, "kiln.detector", name)
    client.set_registered_model_tag(registered, "kiln.precision", precision)
    client.set_registered_model_alias(registered, "newest", version)
    key = name if precision == "fp32" else f"{name}-{precision}"
    run.set_tags({f"registered_model.{key}": f"{registered}@newest (version {version})"})


SPEC = StageSpec(name="onnx", family="detection", task=onnx_task, inputs=OnnxInputs, seeded=False)
