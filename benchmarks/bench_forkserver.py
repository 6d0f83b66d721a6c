"""What a stage of a parallel `kiln run` costs beyond its own work: forked from the run's pre-imported process
(flows/forkserver.py) against a `kiln stage` process each (`KILN_FORKSERVER=0`, as before).

In a copy of the repo on the smoke profile with `runtime.max_parallel: 2`, `kiln run` builds TARGETS from
nothing (outputs, checkpoints and dvc.lock removed), `--repeats` times per mode, the modes alternating. Per
stage, overhead = its task seconds in the run's summary table (DVC's status, output removal and commit, the
stage process's start and imports, the flow) less the `stage_seconds` its MLflow run logged. The stages'
outputs must be the same bytes in both modes (dvc.lock's hashes of every output but the metrics files, which
hold timings).

    .venv/bin/python benchmarks/bench_forkserver.py --out benchmarks/results/forkserver.json

`--project DIR` measures in a built project instead (its own profile, e.g. the default one: a clone of this
repo whose DVC cache is the built repo's, `dvc cache dir --local ../main/.dvc/cache && dvc checkout`), where
`kiln run --force` rebuilds PROJECT_TARGETS and their upstream stages (a checkpoint a stage keeps is resumed,
as in any forced run); its outputs are compared with its own dvc.lock's from before.

    .venv/bin/python benchmarks/bench_forkserver.py --project /tmp/def --out benchmarks/results/forkserver_default.json
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

# Two branches of training stages and audits: text (corpus -> ngram, lm@lstm) and images (images -> fid_net,
# vae, image_audit), so two slots stay busy.
TARGETS = ("ngram", "lm@lstm", "fid_net", "vae", "image_audit")
# In a built default project: the cheap stages of both branches (corpus, ngram, scenes, images, fid_net, vae,
# the audits, latents), so stage start-up is a visible share.
PROJECT_TARGETS = ("ngram", "scene_audit", "image_audit", "latents")
MODES = {"forked": "1", "process": "0"}


def output_hashes(project: Path) -> dict[str, str]:
    """path -> md5 of every output in dvc.lock, the metrics files (timings) left out."""
    from ruamel.yaml import YAML

    lock = YAML(typ="safe").load((project / "dvc.lock").read_text())
    return {
        out["path"]: out.get("md5", "")
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if not out["path"].startswith("data/metrics/")
    }


def one_run(project: Path, mode: str, targets: tuple[str, ...], built: bool) -> tuple[float, dict, dict]:
    """One `kiln run` of `targets` from nothing (`built`: with --force over the project's outputs)."""
    from mlflow.tracking import MlflowClient

    if not built:
        shutil.rmtree(project / "data", ignore_errors=True)
        (project / "dvc.lock").unlink(missing_ok=True)
    start = time.perf_counter()
    args = [a for t in targets for a in ("--target", t)] + (["--force"] if built else [])
    done = sh(project, "kiln", "run", *args, env={"KILN_FORKSERVER": MODES[mode]})
    wall = time.perf_counter() - start
    assert set(summary(done.stdout).values()) == {"ran"}, done.stdout[-3000:]
    forked = "forked from the run's pre-imported process" in done.stdout + done.stderr
    assert forked == (mode == "forked"), f"{mode}: the stages did not start as asked"
    table = summary_seconds(done.stdout)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    overhead = {}
    for stage, seconds in table.items():
        (run,) = client.search_runs(
            experiments, f"attributes.run_name = '{stage}'", order_by=["start_time DESC"], max_results=1
        )
        overhead[stage] = seconds - run.data.metrics["stage_seconds"]
    return wall, overhead, output_hashes(project)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/forkserver.json")
    parser.add_argument("--project", type=Path, help="a built project to measure in, with its own profile")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.project:
            project, targets = args.project.resolve(), PROJECT_TARGETS
            hashes = {"before": output_hashes(project)}
        else:
            project, targets, hashes = copy_project(ROOT, Path(tmp) / "repo"), TARGETS, {}
            sh(project, "kiln", "profile", "smoke")
            set_params(project, "runtime.yaml", "runtime", max_parallel=2)
        walls: dict[str, list[float]] = {m: [] for m in MODES}
        overheads: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                wall, overhead, outputs = one_run(project, mode, targets, bool(args.project))
                walls[mode].append(wall)
                for stage, seconds in overhead.items():
                    overheads[mode].setdefault(stage, []).append(seconds)
                if hashes.setdefault(mode, outputs) != outputs:
                    raise AssertionError(f"{mode}: two runs wrote different outputs")
        for other in ("process", "before"):
            if other in hashes and hashes["forked"] != {p: hashes[other].get(p) for p in hashes["forked"]}:
                differ = sorted(p for p in hashes["forked"] if hashes["forked"][p] != hashes[other].get(p))
                raise AssertionError(f"the forked stages wrote other outputs than {other}: {differ}")

    def per_mode(mode: str) -> dict:
        every = [x for xs in overheads[mode].values() for x in xs]
        return {
            "kiln_run_wall_s_median": round(statistics.median(walls[mode]), 2),
            "kiln_run_wall_s": [round(w, 2) for w in walls[mode]],
            "overhead_s_median": round(statistics.median(every), 2),
            "overhead_s_sum_per_run": round(sum(every) / args.repeats, 2),
            "per_stage_overhead_s_median": {s: round(statistics.median(xs), 2) for s, xs in overheads[mode].items()},
        }

    from tasks.runtime import load_runtime

    runtime = load_runtime(project / "params")
    result = {
        "command": "python benchmarks/bench_forkserver.py " + " ".join(sys.argv[1:]),
        "definition": __doc__.strip().splitlines()[3:9],
        "project": "a built project, kiln run --force" if args.project else "a smoke copy of this repo",
        "profile": runtime.profile,
        "max_parallel": runtime.max_parallel,
        "targets": list(targets),
        "modes": {mode: per_mode(mode) for mode in MODES},
        "same_outputs": sorted(hashes["forked"]),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
    }
    forked, process = result["modes"]["forked"], result["modes"]["process"]
    result["overhead_s_saved_per_stage_median"] = round(process["overhead_s_median"] - forked["overhead_s_median"], 2)
    result["wall_ratio"] = round(forked["kiln_run_wall_s_median"] / process["kiln_run_wall_s_median"], 3)
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
