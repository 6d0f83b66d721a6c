"""Detector throughput and latency at the committed (default-profile) configuration.

For ThunderNet and the one-stage baseline, on scenes of the default canvas with random weights (speed
does not depend on training): training images/s (forward + losses + backward + AdamW, batch from
params), and batch-1 inference latency p50/p95 for PyTorch eager and onnxruntime (fp32) on the exported
graph with NMS inside. The trained models' latency, int8 included, is measured by the `onnx` stage
(data/metrics/onnx.json).

    .venv/bin/python benchmarks/bench_detection.py --out benchmarks/results/detection.json

`--before FILE` (this benchmark's output at an earlier commit, run on the same idle machine just before)
adds that run's figures and the ratios, so a change to the detectors is justified by its own before/after row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import write_json  # noqa: E402  (after the path insert that makes it importable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/detection.json")
    parser.add_argument("--before", type=Path, help="this benchmark's output at an earlier commit")
    args = parser.parse_args()

    import numpy as np
    import torch

    from flows.registry import section_config
    from models.detection.detectors import DETECTORS, GrayscaleDetector, build_detector, to_model_input
    from tasks.detection.detectors import detection_loss
    from tasks.detection.onnx_export import export_onnx, latency_ms, onnx_session
    from tasks.detection.scenes import build_split, digit_pools, load_digit_images
    from tasks.training import make_optimizer, place_model

    params = ROOT / "params"
    scenes_cfg = section_config(params, "scenes")
    train_cfg = section_config(params, "detector_train")
    digits, labels = load_digit_images()
    scenes = build_split(scenes_cfg, "train", digits, labels, digit_pools(labels, scenes_cfg)["train"])[:64]
    images = torch.as_tensor(np.stack([s.image for s in scenes]), dtype=torch.float32)[:, None] / 255
    targets = [
        {
            "boxes": torch.as_tensor(
                np.concatenate([s.boxes[:, :2], s.boxes[:, :2] + s.boxes[:, 2:]], 1), dtype=torch.float32
            ),
            "labels": torch.as_tensor(s.labels),
        }
        for s in scenes
    ]
    results = []
    for name in DETECTORS:
        torch.manual_seed(0)
        cfg = section_config(params, name, num_classes=10, input_size=scenes_cfg.canvas)
        # As the training loop places it (channels-last weights where detector_train says so).
        model = place_model(build_detector(name, cfg), train_cfg, torch.device("cpu"))
        optimizer = make_optimizer(model, train_cfg)
        b = train_cfg.batch_size
        batch = (to_model_input(images[:b]), targets[:b])
        for _ in range(2):
            detection_loss(model, batch).backward()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = detection_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        train_ips = args.steps * b / (time.perf_counter() - start)
        model.eval()
        one = images[:1]
        with torch.no_grad():
            eager = latency_ms(GrayscaleDetector(model), one, 5, args.runs)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.onnx"
            dynamic = export_onnx(model, scenes_cfg.canvas, path)
            session = onnx_session(path)
            feed = {session.get_inputs()[0].name: one.numpy()}
            onnx_fp32 = latency_ms(lambda f: session.run(None, f), feed, 5, args.runs)
        results.append(
            {
                "detector": name,
                "input": scenes_cfg.canvas,
                "backbone": cfg.backbone,
                "parameters": sum(p.numel() for p in model.parameters()),
                "train_batch": b,
                "train_channels_last": train_cfg.channels_last,
                "train_images_per_s": train_ips,
                "latency_torch_ms": eager,
                "latency_onnx_fp32_ms": onnx_fp32,
                "onnx_dynamic_batch": dynamic,
            }
        )
        print(json.dumps(results[-1]))
    out = {
        "command": f"python benchmarks/bench_detection.py --steps {args.steps} --runs {args.runs}",
        "commit": commit(),
        "results": results,
        "torch_threads": torch.get_num_threads(),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
    }
    if args.before:
        out["before"] = compare(json.loads(args.before.read_text()), results)
    write_json(args.out, out)


def commit() -> str:
    """HEAD, marked `+changes` when the work tree differs from it (a before/after pair names both sides)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--", ".") else "")


def compare(before: dict, after: list[dict]) -> dict:
    """Per detector: the earlier run's training images/s and latencies beside this run's, and the ratios."""
    old = {r["detector"]: r for r in before["results"]}
    rows = []
    for r in after:
        b = old.get(r["detector"])
        if b is None:
            continue
        rows.append(
            {
                "detector": r["detector"],
                "train_images_per_s_before": b["train_images_per_s"],
                "train_images_per_s_after": r["train_images_per_s"],
                "train_speedup": r["train_images_per_s"] / b["train_images_per_s"],
                "train_channels_last_before": b.get("train_channels_last", False),
                "train_channels_last_after": r.get("train_channels_last", False),
                "latency_torch_p50_ms_before": b["latency_torch_ms"]["p50_ms"],
                "latency_torch_p50_ms_after": r["latency_torch_ms"]["p50_ms"],
                "latency_onnx_fp32_p50_ms_before": b["latency_onnx_fp32_ms"]["p50_ms"],
                "latency_onnx_fp32_p50_ms_after": r["latency_onnx_fp32_ms"]["p50_ms"],
            }
        )
    return {"commit": before.get("commit", "unknown"), "command": before.get("command"), "detectors": rows}


if __name__ == "__main__":
    main()
