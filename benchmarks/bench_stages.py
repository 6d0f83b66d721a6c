"""Where a whole `kiln run` spends its time, stage by stage, from what the stages logged to MLflow.

Reads the newest finished `kiln run` parent run over every stage (`targets: all`) of a profile from the
project's tracking store, and its stage runs: each stage's `stage_seconds` (its own work, without
orchestration) split into the phases its run logs from the stage's phase clock (tasks/phases.py:
`phase_loading_seconds`, training, evaluation, sampling, scoring (FID, mAP, class accuracy) and io (MLflow,
checkpoints, outputs)). The phases are exclusive, so they add up to at most the stage's seconds; the rest is
"other" (set-up and what no helper marks). A run from before the clock existed is split by the timings its
stage logged (`train_seconds`, `sample_seconds`, ...) and the rest is "other". Writes the table, the phase
totals and the five largest costs, and with `--compare OLD.json` (an earlier output of this script) the wall
time and each stage's seconds beside that run's.

Beside the stages' own seconds, `dispatch` is what `kiln run` spent around each of them: the stage's task time
in the run's summary table (`summary.md` on the parent run) less its MLflow run's wall time, i.e. DVC's status,
output removal and commit, and the `kiln stage` process's start-up and imports. `schedule` replays those
task times on the DAG with `runtime.max_parallel` slots: the wall time in dvc.yaml's dependency order (what
`kiln run` did before it ranked stages) and in critical-path order (what it does now, flows/dvc_graph.py),
beside the bound no order beats (the longest chain, or the task seconds spread over the slots).

`--calibration FILE` (repeatable) embeds outputs of `benchmarks/bench_lm.py --steps 30 --warmup 5` taken beside
the run: that fixed benchmark's tokens/s against the committed `benchmarks/results/lm.json`. Machines of one kind,
and one machine across days, ran it 2-3x apart, which swamps what a code change does to a whole run; two runs'
wall times compare only beside their calibration ratios (`--compare` reports both).

`--partial` reads the newest finished `kiln run` whatever it ran (a run after a change reruns only the stages
the change made stale): its stages' seconds beside OLD.json's for the same stages. Its wall time is not that
of a whole run, so no wall-time change is computed.

    .venv/bin/kiln run --force && .venv/bin/python benchmarks/bench_stages.py   # measure, then read
    make bench-stages   # the same, with a calibration before and after the run
    .venv/bin/kiln run && .venv/bin/python benchmarks/bench_stages.py --partial \
        --compare benchmarks/results/stages.json --out benchmarks/results/stages_partial.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import write_json  # noqa: E402  (after the path insert that makes it importable)
from tasks.phases import PHASES  # noqa: E402  (after the path: the script runs from anywhere)

# A run from before the phase clock: the timings its stage logged, grouped; the rest is "other".
LEGACY_PHASES = {
    "training": ("train_seconds",),
    "sampling": ("sample_seconds", "train_sample_seconds", "heldout_sample_seconds"),
    "likelihood": ("likelihood_seconds",),
    "encoding": ("encode_seconds",),
}


def children_of(client, parent) -> list:
    from tasks.tracking import kiln_experiment_ids

    return client.search_runs(
        kiln_experiment_ids(client), f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000
    )


def newest_full_run(client, profile: str, stages: int):
    """The newest finished `kiln run` of `profile` in which at least `stages` stages ran (an up to date stage
    logs no run): every stage for a whole run, 1 for `--partial`."""
    pipeline = client.get_experiment_by_name("pipeline")
    if pipeline is None:
        raise SystemExit("no `pipeline` experiment in the store: run `kiln run --force` first")
    runs = client.search_runs(
        [pipeline.experiment_id],
        f"attributes.status = 'FINISHED' and tags.`kiln.profile` = '{profile}' and params.targets = 'all'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        if len({c.info.run_name for c in children_of(client, run)}) >= stages:
            return run
    raise SystemExit(f"no finished `kiln run` on profile {profile!r} ran all {stages} stages: `kiln run --force`")


def stage_rows(client, parent) -> list[dict]:
    rows = []
    for run in sorted(children_of(client, parent), key=lambda r: r.info.start_time):
        metrics = run.data.metrics
        total = metrics.get("stage_seconds", (run.info.end_time - run.info.start_time) / 1000)
        if any(k.startswith("phase_") for k in metrics):
            phases = {name: metrics.get(f"phase_{name}_seconds", 0.0) for name in PHASES}
        else:
            phases = {name: sum(metrics.get(k, 0.0) for k in keys) for name, keys in LEGACY_PHASES.items()}
        phases = {k: round(v, 1) for k, v in phases.items() if v > 0}
        rows.append(
            {
                "stage": run.info.run_name,
                "seconds": round(total, 1),
                "wall_seconds": round((run.info.end_time - run.info.start_time) / 1000, 1),
                **{f"{k}_seconds": v for k, v in phases.items()},
                "other_seconds": round(max(total - sum(phases.values()), 0.0), 1),
            }
        )
    return rows


def dispatch(summary_md: str, rows: list[dict]) -> dict:
    """Per stage, its task seconds in `kiln run`'s summary table less its run's wall seconds; their total and
    median. Each row gains `task_seconds` and `dispatch_seconds`."""
    tasks = {}
    for line in summary_md.splitlines()[2:]:  # past the header and its rule
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1] == "ran":
            tasks[cells[0]] = float(cells[2])
    spent = []
    for row in rows:
        if row["stage"] in tasks:
            row["task_seconds"] = round(tasks[row["stage"]], 1)
            row["dispatch_seconds"] = round(tasks[row["stage"]] - row["wall_seconds"], 1)
            spent.append(row["dispatch_seconds"])
    if not spent:
        return {}
    return {
        "stages": len(spent),
        "total_seconds": round(sum(spent), 1),
        "median_seconds": round(statistics.median(spent), 1),
    }


def makespan(order: list[str], upstream: dict[str, list[str]], seconds: dict[str, float], slots: int) -> float:
    """The wall seconds of `kiln run`'s scheduler (flows/pipeline.py) on stages that take `seconds`: whenever a
    slot is free, it starts the first stage of `order` whose upstream stages have all finished."""
    finished: dict[str, float] = {}
    running: list[tuple[float, str]] = []  # (end, stage), a heap
    waiting, now = list(order), 0.0
    while waiting or running:
        for name in [n for n in waiting if all(finished.get(u, math.inf) <= now for u in upstream[n])]:
            if len(running) == slots:
                break
            waiting.remove(name)
            heapq.heappush(running, (now + seconds.get(name, 0.0), name))
        now, name = heapq.heappop(running)
        finished[name] = now
    return now


def schedule(rows: list[dict], slots: int) -> dict:
    """`makespan` of the rows' task seconds in dependency order and in critical-path order, in minutes."""
    from flows.dvc_graph import critical_path_order, critical_paths, stage_order

    order, upstream = stage_order(ROOT)
    seconds = {r["stage"]: r["task_seconds"] for r in rows if "task_seconds" in r}
    if set(seconds) != set(order):
        return {}
    bound = max(max(critical_paths(order, upstream, seconds).values()), sum(seconds.values()) / slots)
    return {
        "slots": slots,
        "dependency_order_minutes": round(makespan(order, upstream, seconds, slots) / 60, 1),
        "critical_path_minutes": round(
            makespan(critical_path_order(order, upstream, seconds), upstream, seconds, slots) / 60, 1
        ),
        "lower_bound_minutes": round(bound / 60, 1),
    }


def summary_of(parent, tracking_uri: str) -> str:
    import mlflow

    path = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="summary.md", tracking_uri=tracking_uri
    )
    return Path(path).read_text(encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stages.json")
    parser.add_argument("--compare", type=Path, help="an earlier output of this script: the run to compare with")
    parser.add_argument("--partial", action="store_true", help="the newest run, even if it ran only some stages")
    parser.add_argument("--slots", type=int, help="stages at once in `schedule` (default: runtime.max_parallel)")
    parser.add_argument(
        "--calibration", type=Path, action="append", default=[], help="a bench_lm.py output taken beside the run"
    )
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    from flows.dvc_graph import dvc_stage_names

    parent = newest_full_run(client, args.profile, 1 if args.partial else len(dvc_stage_names(ROOT)))
    rows = stage_rows(client, parent)
    costs = sorted(
        (
            (row["stage"], key.removesuffix("_seconds"), value)
            for row in rows
            for key, value in row.items()
            if key.endswith("_seconds") and key != "wall_seconds"
        ),
        key=lambda c: -c[2],
    )
    phase_totals: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.endswith("_seconds") and key != "wall_seconds":
                phase_totals[key.removesuffix("_seconds")] = round(
                    phase_totals.get(key.removesuffix("_seconds"), 0) + value, 1
                )
    dispatched = dispatch(summary_of(parent, args.tracking_uri), rows)  # after the phase sums: not a phase
    from tasks.runtime import load_runtime

    slots = args.slots or load_runtime(ROOT / "params").max_parallel
    result = {
        "command": "python benchmarks/bench_stages.py " + " ".join(sys.argv[1:]),
        "what": "per stage of the newest finished `kiln run` "
        + ("of the stages it ran: " if args.partial else "over every stage: ")
        + "its own seconds, split by the phases its stage clock logs (tasks/phases.py: loading, training, "
        "evaluation, sampling, scoring = FID, mAP and class accuracy, io = MLflow, checkpoints and outputs; "
        "exclusive, so they add up); `other` is what no phase covers (set-up, unmarked work)",
        "kiln_run": {
            "run_id": parent.info.run_id,
            "profile": args.profile,
            "commit": parent.data.tags.get("mlflow.source.git.commit", ""),
            "started": datetime.fromtimestamp(parent.info.start_time / 1000, UTC).isoformat(),
            "wall_minutes": round((parent.info.end_time - parent.info.start_time) / 60000, 1),
        },
        "stages_seconds": round(sum(r["seconds"] for r in rows), 1),
        "phase_totals_seconds": phase_totals,
        "largest_costs": [{"stage": s, "phase": p, "seconds": v} for s, p, v in costs[:5]],
        "dispatch": dispatched,
        "schedule": {} if args.partial else schedule(rows, slots),
        "stages": rows,
    }
    if args.calibration:
        result["machine_speed"] = machine_speed(args.calibration)
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "kiln_run",
                    "stages_seconds",
                    "phase_totals_seconds",
                    "largest_costs",
                    "dispatch",
                    "schedule",
                    "machine_speed",
                )
                if k in result
            },
            indent=2,
        )
    )
    if args.compare:
        result["compared_with"] = comparison(json.loads(args.compare.read_text()), result, args.compare, args.partial)
        print(json.dumps({k: v for k, v in result["compared_with"].items() if k != "stages"}, indent=2))
    write_json(args.out, result)


def machine_speed(paths: list[Path]) -> dict:
    """The fixed LM benchmark's tokens/s in each of `paths` (bench_lm.py outputs) against the committed
    benchmarks/results/lm.json, per model, and their geometric mean: how fast this machine ran on the day."""
    reference = json.loads((ROOT / "benchmarks/results/lm.json").read_text())
    ref = {r["model"]: r["tokens_per_s"] for r in reference["results"]}
    samples = []
    for path in paths:
        speeds = {r["model"]: r["tokens_per_s"] for r in json.loads(path.read_text())["results"] if r["model"] in ref}
        if not speeds:
            raise SystemExit(f"{path}: no model of benchmarks/results/lm.json in it; is it a bench_lm.py output?")
        ratios = {m: v / ref[m] for m, v in speeds.items()}
        samples.append(
            {
                "file": str(path),
                "tokens_per_s": {m: round(v) for m, v in speeds.items()},
                "ratio_to_reference": {m: round(r, 3) for m, r in ratios.items()},
                "geomean_ratio": round(math.exp(sum(map(math.log, ratios.values())) / len(ratios)), 3),
            }
        )
    return {
        "reference": "benchmarks/results/lm.json",
        "benchmark": reference["command"],
        "samples": samples,
        "geomean_ratio": round(sum(s["geomean_ratio"] for s in samples) / len(samples), 3),
    }


def comparison(before: dict, after: dict, path: Path, partial: bool = False) -> dict:
    """Wall time and each stage's own seconds of two outputs of this script, and the change in percent; for a
    partial run, only the stages it ran, and no wall time. A stage that trained before but now resumed from its
    finished checkpoint (a persisted DVC output whose fingerprint still matches: no training seconds) did less
    work, so it gets no change figure and stays out of the sums."""
    old = {r["stage"]: r for r in before["stages"]}
    new = {r["stage"]: r for r in after["stages"]}
    names = list(new) if partial else list(dict.fromkeys([*old, *new]))
    rows = []
    for s in names:
        b, a = old.get(s), new.get(s)
        row: dict = {"stage": s, "seconds_before": b and b["seconds"], "seconds_after": a and a["seconds"]}
        if b and a and b.get("training_seconds", 0) >= 1 and a.get("training_seconds", 0) < 1:
            row["training_resumed"] = True
        elif b and a and b["seconds"]:
            row["change_percent"] = round(100 * (a["seconds"] - b["seconds"]) / b["seconds"], 1)
        rows.append(row)
    common = [r for r in rows if "change_percent" in r]
    result = {
        "file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
        "kiln_run": before["kiln_run"],
        "stages_seconds_before": round(sum(r["seconds_before"] for r in common), 1)
        if partial
        else before["stages_seconds"],
        "stages_seconds_after": round(sum(r["seconds_after"] for r in common), 1)
        if partial
        else after["stages_seconds"],
        "stages": rows,
    }
    if not partial:
        wall_before, wall_after = before["kiln_run"]["wall_minutes"], after["kiln_run"]["wall_minutes"]
        result |= {
            "wall_minutes_before": wall_before,
            "wall_minutes_after": wall_after,
            "wall_change_percent": round(100 * (wall_after - wall_before) / wall_before, 1),
        }
    if before.get("dispatch") and after.get("dispatch"):
        result["dispatch_median_seconds_before"] = before["dispatch"]["median_seconds"]
        result["dispatch_median_seconds_after"] = after["dispatch"]["median_seconds"]
    if "machine_speed" in before or "machine_speed" in after:
        # Beside the wall times, not folded into them: how far a whole run scales with this ratio is not measured.
        result["machine_speed_before"] = before.get("machine_speed", {}).get("geomean_ratio")
        result["machine_speed_after"] = after.get("machine_speed", {}).get("geomean_ratio")
    return result


if __name__ == "__main__":
    main()
