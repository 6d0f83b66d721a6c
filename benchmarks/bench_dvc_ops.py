"""What DVC's bookkeeping costs around each stage, with ruamel.yaml's C parser (libyaml) and without it.

`kiln run` pays, per stage that runs, a DVC status of the stage (which also finds the stage whose outputs
it removes; until bbaad80 a second opening collected it from dvc.yaml again, `collect_s`) and a commit that
rewrites dvc.lock: `commit_s` is Kiln's, which reads dvc.lock with the C parser (flows/dvc_graph.py:
`lock_file_read_in_c`), `dvc_commit_s` DVC's own, through the round-trip parser. A user pays the status in
`dvc status` and `kiln status`. All of it parses dvc.yaml, the params files and dvc.lock (127 kB on the
default profile) with ruamel.yaml, whose safe loader runs in C only when its compiled parser is installed.
Each operation runs `--repeats` times in the repository itself (the default pipeline built, `dvc status`
clean; the commits rewrite dvc.lock with the same bytes, checked), in a fresh process per parser:

- `libyaml`: the environment as installed (ruamel.yaml.clib);
- `pure`: the same with the compiled parser hidden (a `_ruamel_yaml` module that fails to import, first on
  PYTHONPATH), which is what an install without ruamel.yaml.clib runs (ruamel.yaml 0.19 no longer pulls it in).

    .venv/bin/python benchmarks/bench_dvc_ops.py --out benchmarks/results/dvc_ops.json
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

STAGE = "lm@mamba"
PARSERS = ("pure", "libyaml")


def inner(stage: str, repeats: int) -> None:
    """In this process: the DVC steps `kiln run` takes for one stage (flows/pipeline.py), timed."""
    import ruamel.yaml.main

    from flows.dvc_graph import _open_repo, stale_reasons
    from flows.pipeline import _commit

    def collect() -> None:
        with _open_repo(ROOT) as repo:
            repo.stage.collect(stage)

    def dvc_commit() -> None:
        with _open_repo(ROOT) as repo:
            repo.commit(stage, force=True)

    steps = {"stale_reasons_s": lambda: stale_reasons(ROOT, stage), "collect_s": collect}
    steps["commit_s"] = lambda: _commit(ROOT, stage)
    steps["dvc_commit_s"] = dvc_commit
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    print(json.dumps({"c_parser": ruamel.yaml.main.CParser is not None, **times}))


# `dvc` and `kiln` of this interpreter's environment, as `kiln run` finds them.
ENV = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done


def measure(parser: str, repeats: int, hidden: Path) -> dict:
    env = dict(ENV)
    if parser == "pure":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hidden), env.get("PYTHONPATH", "")]))
    steps = json.loads(
        run([sys.executable, __file__, "--inner", "--repeats", str(repeats)], env).stdout.splitlines()[-1]
    )
    if steps.pop("c_parser") != (parser == "libyaml"):
        raise SystemExit(f"{parser}: ruamel.yaml's C parser is {'missing' if parser == 'libyaml' else 'not hidden'}")
    cli: dict[str, list[float]] = {"dvc_status_s": [], "kiln_status_s": []}
    for _ in range(repeats):
        for name, command in (("dvc_status_s", ["dvc", "status"]), ("kiln_status_s", ["kiln", "status"])):
            start = time.perf_counter()
            run(command, env)
            cli[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(values), 3) for name, values in {**steps, **cli}.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/dvc_ops.json")
    args = parser.parse_args()
    if args.inner:
        return inner(STAGE, args.repeats)

    lock = (ROOT / "dvc.lock").read_bytes()
    if json.loads(run(["dvc", "status", "--json"], ENV).stdout or "{}"):
        raise SystemExit("dvc status is not clean: build the default pipeline first (kiln run)")
    with tempfile.TemporaryDirectory() as hidden:
        Path(hidden, "_ruamel_yaml.py").write_text('raise ImportError("hidden by bench_dvc_ops: pure ruamel.yaml")\n')
        medians = {name: measure(name, args.repeats, Path(hidden)) for name in PARSERS}
    if (ROOT / "dvc.lock").read_bytes() != lock:
        raise SystemExit("dvc commit changed dvc.lock: the parsers disagree")
    pure, fast = medians["pure"], medians["libyaml"]
    result = {
        "command": "python benchmarks/bench_dvc_ops.py " + " ".join(sys.argv[1:]),
        "what": f"median seconds of DVC's per-stage steps in `kiln run` (stage {STAGE}) and of `dvc status` and "
        "`kiln status` on the default pipeline, with ruamel.yaml's pure-Python and its C (libyaml) parser",
        "dvc_lock_bytes": len(lock),
        "median_s": medians,
        "kiln_run_per_stage_s": {
            name: round(sum(m[k] for k in ("stale_reasons_s", "commit_s")), 3) for name, m in medians.items()
        },
        "kiln_run_per_stage_s_until_bbaad80": {
            name: round(sum(m[k] for k in ("stale_reasons_s", "collect_s", "dvc_commit_s")), 3)
            for name, m in medians.items()
        },
        "speedup": {k: round(pure[k] / fast[k], 2) for k in pure},
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
