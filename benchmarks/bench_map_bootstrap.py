"""The `map` stage's bootstrap of AP and AP50 over the test images: each resample built as a COCO dataset and
evaluated whole (`resampled_ap_ref`, what the stage did before) against `ResampledAP` (each image's matches
found once, a resample only re-merged), on the project's own test split and both detectors' test predictions.

    .venv/bin/kiln run map   # the predictions it reads (any profile; the default's are the figures to quote)
    .venv/bin/python benchmarks/bench_map_bootstrap.py [--resamples 50] [--out benchmarks/results/map_bootstrap.json]

Both paths see the same draws (`resample_indices`, seed 0); their (AP, AP50) must be equal, bit for bit, on
every draw before any figure is written. Reported: milliseconds per resample (both detectors), best of 3
passes over the draws, and what the stage's `map.resamples` draws cost with each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import write_json  # noqa: E402  (after the path insert that makes it importable)
from benchmarks.timing import seconds  # noqa: E402  (after the path insert that makes it importable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resamples", type=int, default=50, help="draws timed with each path")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/map_bootstrap.json")
    args = parser.parse_args()

    from models.bootstrap import resample_indices
    from models.detection.coco_bootstrap import ResampledAP, detection_columns, image_ids, resampled_ap_ref
    from tasks.detection.detectors import DETECTOR_NAMES, read_checked_predictions, read_split
    from tasks.params import load_section, section_index
    from tasks.runtime import stage_env

    test = read_split(ROOT, "test")
    gt = test.coco
    columns = {name: detection_columns(read_checked_predictions(ROOT, name, test)) for name in DETECTOR_NAMES}
    draws = resample_indices(len(image_ids(gt)), args.resamples, 0)

    def ref() -> list:
        return [resampled_ap_ref(gt, cols, d) for d in draws for cols in columns.values()]

    def fast() -> list:  # the per-detector set-up (matching once) is timed too
        resampled = {name: ResampledAP(gt, cols) for name, cols in columns.items()}
        return [resampled[name](d) for d in draws for name in columns]

    assert ref() == fast(), "ResampledAP differs from evaluating the built resample"
    ref_s, fast_s = seconds(ref, 3), seconds(fast, 3)
    env = stage_env()
    from tasks.detection.map import BootstrapConfig

    stage_resamples = load_section(
        env.params_dir, "map", BootstrapConfig, None, section_index(env.params_dir)
    ).resamples
    result = {
        "command": "python benchmarks/bench_map_bootstrap.py " + " ".join(sys.argv[1:]),
        "data": {
            "test_images": len(image_ids(gt)),
            "annotations": len(gt["annotations"]),
            "detections": {name: len(c["score"]) for name, c in columns.items()},
            "profile": env.runtime.profile,
        },
        "draws": args.resamples,
        "equal_on_every_draw": True,
        "ms_per_resample_both_detectors": {
            "ref": 1000 * ref_s / args.resamples,
            "fast": 1000 * fast_s / args.resamples,
        },
        "speedup": ref_s / fast_s,
        "stage_resamples": stage_resamples,
        "stage_bootstrap_seconds": {
            "ref": ref_s / args.resamples * stage_resamples,
            "fast": fast_s / args.resamples * stage_resamples,
        },
        "machine": {"nproc": os.cpu_count(), "loadavg": os.getloadavg()},
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
