"""What one small stage costs under `dvc repro` against the same stage inside `kiln run`.

In a copy of the repo on the smoke profile, `corpus` (about a second of work) is rerun `--repeats` times:

- `kiln run --force --target corpus`: the stage's task time from the run's summary table (DVC status,
  output removal, the Prefect subflow, the MLflow run, `dvc commit`), not the run's own start-up;
- `dvc repro -f -s corpus`, wall time of the whole command, as a user sees it, with the project's shared
  Prefect server (flows/prefect_api.py) reused from the previous call (`warm`; the keeper's default
  idle time of 60 s: the tests' 5 s would let it stop between two calls);
- the same with `KILN_PREFECT_IDLE_S=0`, so that every call starts a server of its own, as every
  `kiln stage` did before the shared server (`cold`).

    .venv/bin/python benchmarks/bench_repro.py --out benchmarks/results/repro.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import write_json  # noqa: E402  (after the path insert that makes it importable)
from tests.pipeline import helpers  # noqa: E402
from tests.pipeline.helpers import copy_project, sh, summary, summary_seconds  # noqa: E402

STAGE = "corpus"


def timed(project: Path, *args: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = sh(project, *args, env=env)
    return time.perf_counter() - start, done.stdout


def stage_seconds(stdout: str) -> float:
    return summary_seconds(stdout)[STAGE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/repro.json")
    args = parser.parse_args()
    # A user's `kiln run` and `dvc repro` without a configured server: each starts (or shares) its own.
    helpers.ENV.pop("PREFECT_API_URL", None)

    with tempfile.TemporaryDirectory() as tmp:
        project = copy_project(ROOT, Path(tmp) / "repo")
        sh(project, "kiln", "profile", "smoke")
        sh(project, "kiln", "run", "--target", STAGE)
        in_run, warm, cold = [], [], []
        for _ in range(args.repeats):
            _, out = timed(project, "kiln", "run", "--force", "--target", STAGE)
            assert summary(out) == {STAGE: "ran"}, out
            in_run.append(stage_seconds(out))
        user_idle = {"KILN_PREFECT_IDLE_S": "60"}  # the default a user gets
        timed(project, "dvc", "repro", "-f", "-s", STAGE, env=user_idle)  # starts the shared server
        for _ in range(args.repeats):
            warm.append(timed(project, "dvc", "repro", "-f", "-s", STAGE, env=user_idle)[0])
        time.sleep(62)  # the warm server stops
        for _ in range(args.repeats):
            cold.append(timed(project, "dvc", "repro", "-f", "-s", STAGE, env={"KILN_PREFECT_IDLE_S": "0"})[0])
            time.sleep(2)  # the keeper notices it is idle and stops its server

    def stats(values: list[float]) -> dict[str, float]:
        return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}

    result = {
        "command": "python benchmarks/bench_repro.py " + " ".join(sys.argv[1:]),
        "what": f"`{STAGE}` on the smoke profile: its task time inside `kiln run` against `dvc repro -f -s {STAGE}`",
        "kiln_run_stage": stats(in_run),
        "dvc_repro_shared_server": stats(warm),
        "dvc_repro_server_per_stage": stats(cold),
        "dvc_repro_minus_kiln_run_s": statistics.median(warm) - statistics.median(in_run),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
