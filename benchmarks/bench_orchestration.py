"""Per-stage orchestration overhead of `kiln run`: what a stage costs beyond its own work.

For each stage run by `kiln run`, overhead = the wall time of its pipeline task (DVC status, output
removal, the Prefect subflow and task runs, params loading, the MLflow run, `dvc commit`) minus the
stage's own work (`stage_seconds`, logged by every stage to MLflow). Measured in a copy of the repo on
the smoke profile, rerunning every stage `--repeats` times. Also reported: the one-time start of the
run's local Prefect API, and `kiln run` wall time.

    .venv/bin/python benchmarks/bench_orchestration.py --out benchmarks/results/orchestration.json

The stages are the `--target`s and their upstream (default: the text branch up to `ngram`, `corpus` and
`ngram`, whose own work is a second or two, so the overhead is most of their time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import write_json  # noqa: E402  (after the path insert that makes it importable)
from tests.pipeline.helpers import copy_project, set_params, sh, summary, summary_seconds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", action="append", help="stage to run with its upstream (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/orchestration.json")
    args = parser.parse_args()
    targets = args.target or ["ngram"]

    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        project = copy_project(ROOT, Path(tmp) / "repo")
        sh(project, "kiln", "profile", "smoke")
        # One stage at a time, in-process, as measured before (smoke itself runs 2 at once as subprocesses).
        set_params(project, "runtime.yaml", "runtime", max_parallel=1)
        samples: dict[str, list[float]] = {}
        walls, startups = [], []
        for _ in range(args.repeats):
            shutil.rmtree(project / "data", ignore_errors=True)
            (project / "dvc.lock").unlink(missing_ok=True)
            start = time.perf_counter()
            done = sh(project, "kiln", "run", *(f"--target={t}" for t in targets))
            walls.append(time.perf_counter() - start)
            table = summary_seconds(done.stdout)
            assert set(summary(done.stdout).values()) == {"ran"}, done.stdout
            client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
            experiments = [e.experiment_id for e in client.search_experiments()]
            for stage, seconds in table.items():
                (run,) = client.search_runs(
                    experiments,
                    f"attributes.run_name = '{stage}'",
                    order_by=["start_time DESC"],
                    max_results=1,
                )
                samples.setdefault(stage, []).append(seconds - run.data.metrics["stage_seconds"])
            log = done.stdout + done.stderr
            startups.append(_startup_seconds(log))
        overheads = [x for xs in samples.values() for x in xs]
        result = {
            "command": f"python benchmarks/bench_orchestration.py --repeats {args.repeats}"
            + "".join(f" --target {t}" for t in targets),
            "definition": __doc__.strip().splitlines()[2:6],
            "per_stage_overhead_s": {stage: statistics.median(xs) for stage, xs in samples.items()},
            "overhead_median_s": statistics.median(overheads),
            "overhead_max_s": max(overheads),
            "samples": len(overheads),
            "target_median_s": 2.0,
            "meets_target": statistics.median(overheads) < 2.0,
            "prefect_api_start_s_median": statistics.median([s for s in startups if s is not None] or [float("nan")]),
            "kiln_run_wall_s_median": statistics.median(walls),
            "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
        }
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


def _startup_seconds(log: str) -> float | None:
    """Seconds from 'Starting temporary server' to the pipeline flow's first log line."""
    import re

    stamps = re.findall(r"^(\d\d):(\d\d):(\d\d\.\d+) \| \w+\s+\| (.*)$", log, flags=re.M)
    start = next((t for t in stamps if "Starting temporary server" in t[3]), None)
    begin = next((t for t in stamps if "Beginning flow run" in t[3]), None)
    if not (start and begin):
        return None
    seconds = lambda t: int(t[0]) * 3600 + int(t[1]) * 60 + float(t[2])  # noqa: E731
    return seconds(begin) - seconds(start)


if __name__ == "__main__":
    main()
