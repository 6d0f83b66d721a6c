"""Is it faster to run two stages at once, one thread each, than one at a time with every thread?

`runtime.max_parallel` decides how many independent stages `kiln run` runs side by side, and tasks/threads.py
gives each an equal share of the cores. On 2 cores that is one stage with 2 threads (max_parallel 1) against
two stages with 1 thread each (max_parallel 2). Small CPU models scale poorly to a second thread, so the
second way may finish the same work sooner; this measures it on default-profile training steps.

For each pair of workloads (A, B), in fresh processes after `--warmup` steps, over at least `--seconds`:
- `alone`: A, then B, each alone with all the cores' threads (what a serial run gives each stage);
- `together`: A and B at once, each with half the threads.

A stage's work is a fixed number of steps, so the pair's speed-up from running side by side is the work done
per second together, counted in seconds of serial running: rate_A,together / rate_A,alone +
rate_B,together / rate_B,alone. Above 1, two at once finish the pair sooner.

    .venv/bin/python benchmarks/bench_parallel.py --out benchmarks/results/parallel.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import write_json  # noqa: E402  (after the path insert that makes it importable)

# The default run's LM stages, pairwise as a two-wide scheduler meets them, and each beside itself.
PAIRS = (
    ("lstm", "transformer"),
    ("s4d", "mamba"),
    ("transformer", "mamba"),
    ("transformer", "transformer"),
)


def measure(name: str, seconds: float, warmup: int, vocab_size: int, start_at: float) -> dict:
    """One workload in this process: steps per second from `start_at` (a shared wall-clock instant, so two
    processes time the same stretch) for at least `seconds`."""
    import torch

    from benchmarks.bench_lm import lm_training_step

    step, tokens, _ = lm_training_step(name, vocab_size)
    for _ in range(warmup):
        step()
    while time.time() < start_at:  # the other process may still be warming up
        step()
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - start
    return {"model": name, "tokens_per_s": steps * tokens / elapsed, "steps": steps, "threads": torch.get_num_threads()}


def run(names: tuple[str, ...], threads: int, args: argparse.Namespace) -> list[dict]:
    """`names` at once, each in its own process with `threads` torch threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start_at = time.time() + args.start_delay
    cmd = [sys.executable, __file__, "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    cmd += ["--vocab-size", str(args.vocab_size), "--start-at", str(start_at), "--cell"]
    procs = [subprocess.Popen([*cmd, n], env=env, stdout=subprocess.PIPE, text=True) for n in names]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"bench_parallel: the {names} cell exited {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per cell (at least 3 steps)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--start-delay", type=float, default=25.0, help="seconds for both processes to warm up")
    parser.add_argument("--vocab-size", type=int, default=2335, help="the built-in corpus's vocabulary size")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/parallel.json")
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(measure(args.cell, args.seconds, args.warmup, args.vocab_size, args.start_at)))
        return
    cores = len(os.sched_getaffinity(0))
    alone: dict[str, dict] = {}
    for name in sorted({n for pair in PAIRS for n in pair}):
        alone[name] = run((name,), cores, args)[0]
        print(json.dumps({"alone": alone[name]}), flush=True)
    pairs = []
    for a, b in PAIRS:
        together = run((a, b), max(1, cores // 2), args)
        speedup = sum(t["tokens_per_s"] / alone[t["model"]]["tokens_per_s"] for t in together)
        row = {"pair": [a, b], "together": together, "speedup_side_by_side": speedup}
        pairs.append(row)
        print(json.dumps(row), flush=True)
    out = {
        "command": "python benchmarks/bench_parallel.py " + " ".join(sys.argv[1:]),
        "what": "LM training side by side (half the threads each) against alone (all threads): the pair's work "
        "per second together, in seconds of serial running (> 1: max_parallel 2 finishes sooner)",
        "alone": alone,
        "pairs": pairs,
        "machine": {"cores": cores, "python": platform.python_version()},
    }
    write_json(args.out, out)


if __name__ == "__main__":
    main()
