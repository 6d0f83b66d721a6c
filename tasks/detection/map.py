"""`map`: COCO evaluation of both detectors' test predictions (models/detection/coco_eval.py), with paired
bootstrap intervals over the test images.

The point estimates are the COCO figures of the whole test split. For the intervals the test images are drawn
with replacement, `map.resamples` times; each resample is a COCO dataset of its own in which an image drawn
twice counts as two images (models/detection/coco_bootstrap.py), and both detectors are evaluated on the same
resamples (models/bootstrap.py). The stage reports each detector's percentile interval of AP and AP50 and the
interval of the paired difference between the detectors. Those intervals cover the choice of test images, not
training-seed variance: for that, each detector's replicates (`detector_replicate@<name>-<r>`, seeds
runtime.seed + r for r in `replicates.detector`) are evaluated too, and AP and AP50 are reported as the mean
over the seeds with a 95 % Student-t interval (models/seeds.py), `<stat>_seed_*`. The pairs' table says
whether the two detectors' seed intervals are apart (`seed_separated`); the report ranks them only if both
the paired bootstrap and the seeds agree.

This stage has its own module, apart from `detector@*` in detectors.py, so that a change to the evaluation
does not make the trained detectors stale.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.bootstrap import BootstrapConfig, interval, percentile_interval, resample_indices
from models.detection.coco_bootstrap import ResampledAP, detection_columns, image_ids
from models.detection.coco_eval import STAT_NAMES, CocoEvalResult
from models.seeds import SeedSummary, seed_summary, separated
from tasks.detection.detectors import DETECTOR_NAMES, coco_map, read_checked_predictions, read_split
from tasks.io import atomic_path, write_json
from tasks.layout import METRICS_DIR, PLOTS_DIR
from tasks.phases import in_phase
from tasks.spec import ReplicatesConfig, StageContext, StageSpec, replicate_name

INTERVAL_STATS = ("AP", "AP50")  # the figures the report compares: what ResampledAP returns, in its order


def coco_summary(result: CocoEvalResult) -> dict[str, Any]:
    return {
        **{name: float(v) for name, v in zip(STAT_NAMES, result.stats)},
        "per_class_ap": {str(c): float(result.per_class_ap[c]) for c in result.cat_ids},
        "per_class_ap50": {str(c): float(result.per_class_ap50[c]) for c in result.cat_ids},
    }


@in_phase("scoring")
def bootstrap_stats(
    gt: dict[str, Any], predictions: dict[str, list[dict[str, Any]]], cfg: BootstrapConfig, seed: int
) -> dict[str, np.ndarray]:
    """Detector -> (B, len(INTERVAL_STATS)): its AP and AP50 on each resample of the test images, the same
    resamples for every detector."""
    # Each detector's matches are found once; a resample only re-merges them (ResampledAP, equal to evaluating
    # the resample built as a COCO dataset, 7.7x faster on the default test set: benchmarks/bench_map_bootstrap.py).
    resampled = {name: ResampledAP(gt, detection_columns(records)) for name, records in predictions.items()}
    draws = resample_indices(len(image_ids(gt)), cfg.resamples, seed)  # (B, I)
    out = {name: np.zeros((cfg.resamples, len(INTERVAL_STATS))) for name in predictions}
    for b, draw in enumerate(draws):
        for name, ap in resampled.items():
            out[name][b] = ap(draw)
    return out


def add_intervals(
    summaries: dict[str, dict[str, Any]], samples: dict[str, np.ndarray], level: float
) -> tuple[dict[str, dict[str, Any]], pd.DataFrame]:
    """The summaries with `<stat>_ci_low/_ci_high` for INTERVAL_STATS, and the pairs' table: the first
    detector minus each other one, per stat, with its paired interval (0 inside it: not significant)."""
    out = {}
    for name, summary in summaries.items():
        low, high = percentile_interval(samples[name], level)
        out[name] = dict(summary)
        for k, stat in enumerate(INTERVAL_STATS):
            out[name][f"{stat}_ci_low"], out[name][f"{stat}_ci_high"] = float(low[k]), float(high[k])
    names = list(summaries)
    rows = []
    for other in names[1:]:
        a, b = names[0], other
        for k, stat in enumerate(INTERVAL_STATS):
            diff = interval(summaries[a][stat] - summaries[b][stat], samples[a][:, k] - samples[b][:, k], level)
            rows.append(
                {
                    "pair": f"{a} - {b}",
                    "a": a,
                    "b": b,
                    "stat": stat,
                    "difference": diff.point,
                    "ci_low": diff.low,
                    "ci_high": diff.high,
                    "significant": diff.significant,
                }
            )
    return out, pd.DataFrame(rows)


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


def seed_stats(per_seed: list[dict[str, Any]]) -> dict[str, SeedSummary]:
    """Stat -> its summary over one detector's seeds (COCO summaries, the main stage's first)."""
    return {stat: seed_summary([s[stat] for s in per_seed]) for stat in INTERVAL_STATS}


def add_seed_figures(summary: dict[str, Any], seeds: dict[str, SeedSummary], seed_list: list[int]) -> dict[str, Any]:
    """`summary` with `<stat>_seeds`, `_by_seed` and, from two seeds up, `_seed_mean/_std/_ci_low/_ci_high`
    (one seed has no spread: no NaN goes into a metrics file)."""
    out = dict(summary)
    for stat, s in seeds.items():
        out[f"{stat}_seeds"] = s.n
        out[f"{stat}_by_seed"] = {str(seed): v for seed, v in zip(seed_list, s.values)}
        if s.n > 1:
            out |= {f"{stat}_seed_mean": s.mean, f"{stat}_seed_std": s.std}
            out |= {f"{stat}_seed_ci_low": s.low, f"{stat}_seed_ci_high": s.high}
    return out


def seed_rows(seeds: dict[str, dict[str, SeedSummary]]) -> pd.DataFrame:
    """The seeds plot's table: one row per detector and stat, mean and interval over the seeds."""
    rows = [
        {
            "row": f"{name} {stat}",
            "detector": name,
            "stat": stat,
            "seeds": s.n,
            "seed_mean": s.mean,
            "seed_ci_low": s.low,
            "seed_ci_high": s.high,
        }
        for name, stats in seeds.items()
        for stat, s in stats.items()
    ]
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class MapInputs:
    map: BootstrapConfig
    replicates: ReplicatesConfig  # which detector_replicate@* predictions to evaluate beside the main ones


@task(name="map", cache_policy=NO_CACHE)
def map_task(ctx: StageContext, inputs: MapInputs) -> dict[str, float]:
    root, run, cfg = ctx.root, ctx.run, inputs.map
    test = read_split(root, "test")
    summaries, curves, rows = {}, {}, []
    predictions = {name: read_checked_predictions(root, name, test) for name in DETECTOR_NAMES}
    replicates = inputs.replicates.detector  # read first: a missing replicate fails before the bootstrap
    replicate_predictions = {
        name: [read_checked_predictions(root, replicate_name(name, r), test) for r in replicates]
        for name in DETECTOR_NAMES
    }
    for name in DETECTOR_NAMES:
        result = coco_map(test.coco, predictions[name])
        summaries[name] = coco_summary(result)
        recall, precision = result.pr_curve(iou=0.5)
        curves[name] = (recall, precision)
        rows += [{"detector": name, "recall": float(r), "precision": float(p)} for r, p in zip(recall, precision)]
    started = time.perf_counter()
    samples = bootstrap_stats(test.coco, predictions, cfg, ctx.seed)
    bootstrap_seconds = time.perf_counter() - started
    summaries, pairs = add_intervals(summaries, samples, cfg.level)
    # Training-seed variance: the replicates' test predictions, each scored on the whole test split.
    seeds, seed_list = {}, inputs.replicates.seeds("detector", ctx.seed)
    for name in DETECTOR_NAMES:
        per_seed = [summaries[name]] + [
            coco_summary(coco_map(test.coco, records)) for records in replicate_predictions[name]
        ]
        seeds[name] = seed_stats(per_seed)
        summaries[name] = add_seed_figures(summaries[name], seeds[name], seed_list)
    pairs["seed_separated"] = [separated(seeds[p.a][p.stat], seeds[p.b][p.stat]) for p in pairs.itertuples()]
    write_json(root / METRICS_DIR / "map.json", summaries)
    with atomic_path(root / PLOTS_DIR / "pr_curve.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    with atomic_path(root / PLOTS_DIR / "map_pairs.csv") as tmp:
        pairs.to_csv(tmp, index=False)
    with atomic_path(root / PLOTS_DIR / "detector_seeds.csv") as tmp:
        seed_rows(seeds).to_csv(tmp, index=False)
    stats = [*STAT_NAMES, *(f"{s}_ci_{end}" for s in INTERVAL_STATS for end in ("low", "high"))]
    if replicates:
        stats += [f"{s}_seed_{k}" for s in INTERVAL_STATS for k in ("mean", "std", "ci_low", "ci_high")]
    metrics = {f"{name}_{stat}": summaries[name][stat] for name in DETECTOR_NAMES for stat in stats}
    run.log_metrics({**metrics, "bootstrap_seconds": bootstrap_seconds})
    run.log_figure(pr_figure(curves), "plots/pr_curve.png")
    run.log_text(json.dumps(summaries, indent=2) + "\n", "map.json")
    run.log_artifact(root / PLOTS_DIR / "map_pairs.csv", "plots")
    run.log_artifact(root / PLOTS_DIR / "detector_seeds.csv", "plots")
    for name in DETECTOR_NAMES:
        s = summaries[name]
        print(
            f"{name}: AP {s['AP']:.3f} [{s['AP_ci_low']:.3f}, {s['AP_ci_high']:.3f}]  "
            f"AP50 {s['AP50']:.3f} [{s['AP50_ci_low']:.3f}, {s['AP50_ci_high']:.3f}]  "
            f"AP75 {s['AP75']:.3f}  AR100 {s['AR100']:.3f}"
        )
    for name in DETECTOR_NAMES:
        for stat, sd in seeds[name].items():
            if sd.n > 1:
                print(f"{name} {stat} over {sd.n} seeds: {sd.mean:.3f} [{sd.low:.3f}, {sd.high:.3f}] ({sd.values})")
    for p in pairs.itertuples():
        verdict = "significant" if p.significant else "not significant"
        over_seeds = {None: "", True: "; seed intervals apart", False: "; seed intervals overlap"}[p.seed_separated]
        print(f"{p.pair} {p.stat}: {p.difference:+.3f} [{p.ci_low:+.3f}, {p.ci_high:+.3f}] ({verdict}{over_seeds})")
    print(f"bootstrap: {cfg.resamples} resamples of {len(test.image_ids)} test images in {bootstrap_seconds:.1f} s")
    return metrics


SPEC = StageSpec(name="map", family="detection", task=map_task, inputs=MapInputs)
