"""COCO bbox evaluation: models/detection/coco_eval.py against pycocotools' COCOeval, same numbers, wall time.

    .venv/bin/python benchmarks/bench_coco_eval.py [--images 5000] [--dets 50] [--repeats 3]
        [--out benchmarks/results/coco_eval.json]

Synthetic data shaped like COCO val2017 (seeded): 80 categories, a Poisson(7.3) number of ground-truth
boxes per image (val2017 has 36,781 in 5,000 images), sizes log-uniform from 4 to 400 pixels so that all
three area ranges are populated, 1% crowd annotations, annotation `area` = 0.8 x box area (a mask's
area); `--dets` detections per image: 60% jittered copies of a ground truth (15% of those with a wrong
class), the rest random boxes, uniform scores.

Timed, from the same parsed inputs (the GT dict and a list of detection dicts):
- ours: `evaluate_coco(gt, dets)`, parsing of the dicts included; best and median of --repeats runs;
- pycocotools: `evaluate(); accumulate(); summarize()` (the headline figure), and separately the
  in-memory COCO index and `loadRes` it needs first (reported as pycocotools_load_s). Run once.
The 12 summary stats, the precision and recall arrays must agree to 1e-6 (asserted) before any figure
is written. Goal: speed-up (pycocotools evaluate+accumulate+summarize over our best) >= 5.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import write_json  # noqa: E402  (after the path insert that makes it importable)
from models.detection.coco_eval import STAT_NAMES, evaluate_coco  # noqa: E402

GOAL_SPEEDUP = 5.0


def synthetic_coco(n_images: int, dets_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    n_cats = 80
    images = [{"id": i + 1, "width": 640, "height": 480} for i in range(n_images)]
    categories = [{"id": c + 1, "name": f"c{c + 1}"} for c in range(n_cats)]
    anns, dets = [], []
    for im in range(1, n_images + 1):
        ng = rng.poisson(7.3)
        wh = np.exp(rng.uniform(np.log(4), np.log(400), (ng, 2)))
        xy = rng.uniform(0, 1, (ng, 2)) * np.maximum(np.array([640, 480]) - wh, 1)
        cats = rng.integers(1, n_cats + 1, ng)
        for j in range(ng):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": im,
                    "category_id": int(cats[j]),
                    "bbox": [float(xy[j, 0]), float(xy[j, 1]), float(wh[j, 0]), float(wh[j, 1])],
                    "area": float(0.8 * wh[j, 0] * wh[j, 1]),
                    "iscrowd": int(rng.random() < 0.01),
                }
            )
        for _ in range(dets_per_image):
            if ng and rng.random() < 0.6:
                j = rng.integers(ng)
                box = np.r_[xy[j], wh[j]] + rng.normal(0, 0.1, 4) * np.r_[wh[j], wh[j]]
                cat = int(cats[j]) if rng.random() < 0.85 else int(rng.integers(1, n_cats + 1))
            else:
                size = np.exp(rng.uniform(np.log(4), np.log(400), 2))
                box = np.r_[rng.uniform(0, 1, 2) * np.maximum(np.array([640, 480]) - size, 1), size]
                cat = int(rng.integers(1, n_cats + 1))
            box[2:] = np.maximum(box[2:], 1.0)
            dets.append(
                {"image_id": im, "category_id": cat, "bbox": [float(v) for v in box], "score": float(rng.random())}
            )
    return {"images": images, "annotations": anns, "categories": categories}, dets


def run_pycocotools(gt: dict, dets: list[dict]) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        t1 = time.perf_counter()
        E = COCOeval(coco_gt, coco_dt, "bbox")
        E.evaluate()
        t2 = time.perf_counter()
        E.accumulate()
        t3 = time.perf_counter()
        E.summarize()
        t4 = time.perf_counter()
    return {
        "E": E,
        "load_s": t1 - t0,
        "evaluate_s": t2 - t1,
        "accumulate_s": t3 - t2,
        "summarize_s": t4 - t3,
        "eval_s": t4 - t1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=50, help="detections per image")
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours (pycocotools runs once)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "coco_eval.json")
    args = parser.parse_args()
    load_before = os.getloadavg()

    t = time.perf_counter()
    gt, dets = synthetic_coco(args.images, args.dets)
    print(
        f"data: {len(gt['images'])} images, {len(gt['annotations'])} annotations, {len(dets)} detections "
        f"({time.perf_counter() - t:.1f} s, untimed)"
    )

    ours_times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        ours = evaluate_coco(gt, dets)
        ours_times.append(time.perf_counter() - t)
    print(f"ours: best {min(ours_times):.2f} s, median {statistics.median(ours_times):.2f} s")

    ref = run_pycocotools(gt, dets)
    E = ref.pop("E")
    print(
        f"pycocotools: evaluate {ref['evaluate_s']:.1f} s, accumulate {ref['accumulate_s']:.1f} s, "
        f"summarize {ref['summarize_s']:.2f} s (load {ref['load_s']:.1f} s)"
    )

    diffs = {
        "stats": float(np.abs(ours.stats - E.stats).max()),
        "precision": float(np.abs(ours.precision - E.eval["precision"]).max()),
        "recall": float(np.abs(ours.recall - E.eval["recall"]).max()),
    }
    assert all(v <= 1e-6 for v in diffs.values()), f"ours and pycocotools disagree: {diffs}"

    speedup = ref["eval_s"] / min(ours_times)
    result = {
        "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "machine": {
            "nproc": os.cpu_count(),
            "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "loadavg_at_start": [round(x, 2) for x in load_before],
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pycocotools": _version("pycocotools"),
            "platform": platform.platform(),
        },
        "data": {
            "images": len(gt["images"]),
            "categories": len(gt["categories"]),
            "annotations": len(gt["annotations"]),
            "crowd_annotations": sum(a["iscrowd"] for a in gt["annotations"]),
            "detections": len(dets),
            "detections_per_image": args.dets,
        },
        "ours": {"best_s": min(ours_times), "median_s": statistics.median(ours_times), "runs_s": ours_times},
        "pycocotools": {
            "evaluate_s": ref["evaluate_s"],
            "accumulate_s": ref["accumulate_s"],
            "summarize_s": ref["summarize_s"],
            "eval_s": ref["eval_s"],
            "load_s": ref["load_s"],
        },
        "speedup_eval_over_ours_best": speedup,
        "speedup_eval_plus_load_over_ours_best": (ref["eval_s"] + ref["load_s"]) / min(ours_times),
        "max_abs_diff": diffs,
        "stats": dict(zip(STAT_NAMES, map(float, ours.stats))),
        "goal": {"min_speedup": GOAL_SPEEDUP, "met": bool(speedup >= GOAL_SPEEDUP)},
    }
    print(f"speed-up {speedup:.1f}x (goal {GOAL_SPEEDUP:.0f}x); max |diff| {max(diffs.values()):.1e}")
    write_json(args.out, result)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
