"""Training throughput of the four neural LMs idle and beside busy processes, per thread policy.

Each (model, policy, hogs) cell trains at the default-profile size (as benchmarks/bench_lm.py) in its own
process, started after `hogs` single-threaded busy loops (`while True: pass`), and measures tokens/s over
at least `--seconds` after `--warmup` steps. Policies:

- `torch`: torch's defaults (one thread per CPU, OpenMP's spinning wait), what Kiln did before;
- `one`: one thread whatever the load (OMP_NUM_THREADS=1);
- `kiln`: tasks/threads.py, as every stage runs: threads from the allowed cores less the cores other work
  keeps busy, looked at again during training;
- `kiln-passive`: the same with OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead of spinning).

Reports each cell and its share of the same model's idle throughput under the same policy.

    .venv/bin/python benchmarks/bench_threads.py --out benchmarks/results/threads.json
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

POLICIES = ("torch", "one", "kiln", "kiln-passive")
HOG = "while True: pass"


def measure(name: str, policy: str, seconds: float, warmup: int, vocab_size: int) -> dict:
    """One cell, in this process (the parent starts it with the policy's environment)."""
    import torch

    from benchmarks.bench_lm import lm_training_step
    from tasks.threads import ThreadGovernor

    governor = ThreadGovernor() if policy.startswith("kiln") else None
    if governor:
        governor.start()
    step, tokens, _ = lm_training_step(name, vocab_size, governor.tick if governor else None)

    for _ in range(warmup):
        step()
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - start
    return {
        "model": name,
        "policy": policy,
        "tokens_per_s": steps * tokens / elapsed,
        "steps": steps,
        "torch_threads": torch.get_num_threads(),
    }


def run_cell(name: str, policy: str, hogs: int, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    if policy == "kiln-passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if policy == "one":
        env["OMP_NUM_THREADS"] = "1"
    busy = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
    try:
        time.sleep(0.5)  # the hogs are running before the cell looks at the load
        cmd = [sys.executable, __file__, "--cell", name, policy, "--seconds", str(args.seconds)]
        cmd += ["--warmup", str(args.warmup), "--vocab-size", str(args.vocab_size)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "hogs": hogs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per cell (at least 3 steps)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2335, help="the built-in corpus's vocabulary size")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--hogs", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--cell", nargs=2, metavar=("MODEL", "POLICY"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/threads.json")
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(measure(*args.cell, args.seconds, args.warmup, args.vocab_size)))
        return
    from models.text.language_models import LANGUAGE_MODELS

    results = []
    for name in args.models or list(LANGUAGE_MODELS):
        for policy in args.policies:
            idle = None
            for hogs in args.hogs:
                cell = run_cell(name, policy, hogs, args)
                idle = cell["tokens_per_s"] if hogs == 0 else idle
                cell["share_of_idle"] = cell["tokens_per_s"] / idle if idle else None
                results.append(cell)
                print(json.dumps(cell), flush=True)
    out = {
        "command": "python benchmarks/bench_threads.py " + " ".join(sys.argv[1:]),
        "what": "LM training tokens/s idle and beside `hogs` single-threaded busy loops, per thread policy",
        "results": results,
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
    }
    write_json(args.out, out)


if __name__ == "__main__":
    main()
