"""`kiln run` over a built project: what a scheduled run costs when nothing is stale, and after one small edit.

In a clone of this repo at `--rev` (default HEAD) whose DVC cache is this repo's, checked out, so every stage
is up to date (this repo must be built: `make run`, or a default `kiln run`), each repeat times:

- `nothing stale`: `kiln run`, which finds all stages up to date;
- `one edit`: `kiln run` after setting `image_audit.max_near_share` (params/images.yaml), which makes the
  cheap `image_audit` stage stale; it reruns, and `report`, which reads its metrics file, is asked again
  and found up to date (the file has the same bytes); the repeat then sets the value back;
- for reference, `dvc status` and `dvc repro` with nothing stale.

`kiln run` runs as `python -m flows.cli run` in the clone, so the clone's own code orchestrates (the venv's
`kiln` script would import this repo's). `--before REV` measures a second clone at REV the same way,
alternating the two in each repeat, so a change's before and after come from one run on one machine.

    .venv/bin/python benchmarks/bench_rerun.py --before a3d9bbd --out benchmarks/results/rerun.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import write_json  # noqa: E402  (after the path insert that makes it importable)
from tests.pipeline.helpers import ENV, set_params, sh, summary  # noqa: E402

EDIT = ("images.yaml", "image_audit", "max_near_share")
EDITED_STAGES = {"image_audit"}  # what the edit makes run


def clone(rev: str, dest: Path) -> Path:
    """This repo at `rev`, its outputs checked out from this repo's DVC cache."""
    sh(ROOT, "git", "clone", "-q", str(ROOT), str(dest))
    sh(dest, "git", "checkout", "-q", rev)
    sh(dest, "dvc", "cache", "dir", "--local", str(ROOT / ".dvc" / "cache"))
    sh(dest, "dvc", "checkout", "-q")
    return dest


def timed(project: Path, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds and the result of one command in `project` (tests/pipeline/helpers.py: `sh`)."""
    start = time.perf_counter()
    done = sh(project, *args)
    return time.perf_counter() - start, done


def kiln_run(project: Path) -> tuple[float, dict[str, str]]:
    seconds, done = timed(project, sys.executable, "-m", "flows.cli", "run")
    return seconds, summary(done.stdout)


def one_repeat(project: Path, value: float, original: float) -> dict[str, float]:
    """The four timings; leaves the project as it found it, every stage up to date."""
    times: dict[str, float] = {}
    times["nothing_stale"], statuses = kiln_run(project)
    if set(statuses.values()) != {"up to date"}:
        raise AssertionError(f"{project}: stages ran in a run with nothing stale: {statuses}")
    times["dvc_status"] = timed(project, "dvc", "status")[0]
    times["dvc_repro"] = timed(project, "dvc", "repro")[0]
    file, section, key = EDIT
    set_params(project, file, section, **{key: value})
    times["one_edit"], statuses = kiln_run(project)
    ran = {s for s, status in statuses.items() if status == "ran"}
    if ran != EDITED_STAGES:
        raise AssertionError(f"{project}: the edit ran {sorted(ran)}, not {sorted(EDITED_STAGES)}")
    set_params(project, file, section, **{key: original})
    kiln_run(project)  # back to the committed params: all up to date again
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="the code to measure (a git revision of this repo)")
    parser.add_argument("--before", help="a second revision, measured the same way in the same run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/rerun.json")
    args = parser.parse_args()

    from ruamel.yaml import YAML

    ENV.pop("PREFECT_API_URL", None)  # each kiln run starts its own Prefect server, as a user's does
    revs = {"after": args.rev, **({"before": args.before} if args.before else {})}
    samples: dict[str, dict[str, list[float]]] = {label: {} for label in revs}
    with tempfile.TemporaryDirectory(prefix="bench-rerun-") as tmp:
        projects = {label: clone(rev, Path(tmp) / label) for label, rev in revs.items()}
        file, section, key = EDIT
        original = float(YAML(typ="safe").load((ROOT / "params" / file).read_text())[section][key])
        for project in projects.values():  # a first run each, untimed: MLflow's store is created
            kiln_run(project)
        for _ in range(args.repeats):
            for label, project in projects.items():
                for name, seconds in one_repeat(project, round(original + 0.01, 4), original).items():
                    samples[label].setdefault(name, []).append(round(seconds, 2))
        commits = {
            label: sh(project, "git", "rev-parse", "--short", "HEAD").stdout.strip()
            for label, project in projects.items()
        }

    result = {
        "command": "python benchmarks/bench_rerun.py " + " ".join(sys.argv[1:]),
        "what": __doc__.strip().splitlines()[0],
        "edit": f"params/{file}: {section}.{key}, which makes {sorted(EDITED_STAGES)} stale",
        "repeats": args.repeats,
        "measured": {
            label: {
                "commit": commits[label],
                "median_s": {name: round(statistics.median(xs), 2) for name, xs in samples[label].items()},
                "samples_s": samples[label],
            }
            for label in revs
        },
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg()[0],
        },
    }
    if args.before:
        after, before = (result["measured"][k]["median_s"] for k in ("after", "before"))
        result["saved_s"] = {name: round(before[name] - after[name], 2) for name in ("nothing_stale", "one_edit")}
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
