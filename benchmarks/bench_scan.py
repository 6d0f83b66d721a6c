"""Mamba's chunked selective scan against the sequential reference, on CPU.

    .venv/bin/python benchmarks/bench_scan.py [--out benchmarks/results/scan.json] [--lengths 256 1024]
        [--batch 8] [--d-inner 128] [--d-state 16] [--chunk-size 16] [--repeats 7] [--threads 1]

Shapes are those of the default MambaConfig (d_model 128, expand 2 -> d_inner 256 would double every
figure; the brief's B=8, D=128, N=16 is used). Inputs: u ~ N(0, 1), dt = softplus(N(0, 1) - 4) (median
~0.02, inside Mamba's dt init range), A = -(n+1) (S4D-Real), B, C ~ N(0, 1), D = 1; gradients of
sum(y * g) for a fixed random g reach u, dt, A, B, C and D.

Each case (implementation x length x forward / forward+backward) runs in a fresh interpreter: one untimed
run whose peak is the case's memory, then --repeats timed runs, reported by their median wall time and
median CPU time (time.process_time: with one thread, it does not count time the process waited for a core
that other work held, so it is the steadier figure on a shared machine).
Memory is resource.getrusage(RUSAGE_SELF).ru_maxrss of that process (peak resident set), reported as the
peak and as the peak minus the RSS just before the first run (inputs already built); tracemalloc does not
see torch's allocations.

Threads: --threads 1 by default. On a shared 2-core machine, 2 intra-op threads make every large op wait
for the busier core (OpenMP barriers), which made timings swing by 5x between runs.

Target: parallel at least 5x faster than sequential at L = 1024, forward+backward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import write_json  # noqa: E402  (after the path insert that makes it importable)


def run_case(case: dict) -> dict:
    """Runs in a child process: build inputs, measure one run's peak RSS, then time the repeats."""
    import torch
    import torch.nn.functional as F

    from models.text.mamba import selective_scan_parallel, selective_scan_ref

    torch.set_num_threads(case["threads"])
    g = torch.Generator().manual_seed(0)
    Bsz, L, D, N = case["batch"], case["length"], case["d_inner"], case["d_state"]
    u = torch.randn(Bsz, L, D, generator=g)
    delta = F.softplus(torch.randn(Bsz, L, D, generator=g) - 4)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(D, 1)
    B = torch.randn(Bsz, L, N, generator=g)
    C = torch.randn(Bsz, L, N, generator=g)
    Dskip = torch.ones(D)
    gy = torch.randn(Bsz, L, D, generator=g)
    backward = case["mode"] == "forward+backward"
    if case["impl"] == "parallel":

        def scan(*xs):
            return selective_scan_parallel(*xs, chunk_size=case["chunk_size"])
    else:
        scan = selective_scan_ref

    def once() -> tuple[float, float]:
        xs = [t.detach().requires_grad_(backward) for t in (u, delta, A, B, C, Dskip)]
        t0, c0 = time.perf_counter(), time.process_time()
        if backward:
            (scan(*xs) * gy).sum().backward()
        else:
            with torch.no_grad():
                scan(*xs)
        return time.perf_counter() - t0, time.process_time() - c0

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    first, _ = once()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    runs = [once() for _ in range(case["repeats"])]
    return {
        **case,
        "median_s": statistics.median(w for w, _ in runs),
        "median_cpu_s": statistics.median(c for _, c in runs),
        "times_s": [w for w, _ in runs],
        "cpu_times_s": [c for _, c in runs],
        "first_run_s": first,
        "peak_rss_bytes": peak,
        "rss_before_bytes": rss_before,
        "peak_minus_before_bytes": peak - rss_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scan.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-inner", type=int, default=128)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: JSON of one case, run in a child
    args = parser.parse_args()

    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    import torch

    load_at_start = os.getloadavg()
    results = []
    for length in args.lengths:
        for mode in ("forward", "forward+backward"):
            for impl in ("sequential", "parallel"):
                case = {
                    "impl": impl,
                    "mode": mode,
                    "length": length,
                    "batch": args.batch,
                    "d_inner": args.d_inner,
                    "d_state": args.d_state,
                    "chunk_size": args.chunk_size,
                    "repeats": args.repeats,
                    "threads": args.threads,
                }
                proc = subprocess.run(
                    [sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True, check=True
                )
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(result)
                print(
                    f"{impl:>10} {mode:>16} L={length:>5}: median {result['median_s'] * 1e3:8.1f} ms "
                    f"(CPU {result['median_cpu_s'] * 1e3:8.1f} ms), "
                    f"peak RSS {result['peak_rss_bytes'] / 2**20:7.1f} MiB "
                    f"(+{result['peak_minus_before_bytes'] / 2**20:.1f} MiB over inputs)",
                    flush=True,
                )

    def find(impl: str, mode: str, length: int) -> dict:
        return next(r for r in results if (r["impl"], r["mode"], r["length"]) == (impl, mode, length))

    def speedups(measure: str) -> dict[str, float]:
        return {
            f"{mode} L={length}": find("sequential", mode, length)[measure] / find("parallel", mode, length)[measure]
            for length in args.lengths
            for mode in ("forward", "forward+backward")
        }

    wall, cpu = speedups("median_s"), speedups("median_cpu_s")
    for key in wall:
        print(f"speed-up {key}: {wall[key]:.2f}x wall, {cpu[key]:.2f}x CPU time")
    target_key = "forward+backward L=1024"
    report = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "machine": {
            "nproc": os.cpu_count(),
            "sched_affinity": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": args.threads,
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
        },
        "memory_measure": "ru_maxrss of a fresh process per case (peak RSS); peak_minus_before excludes the inputs",
        "results": results,
        "speedup_sequential_over_parallel": {"wall": wall, "cpu_time": cpu},
        "target": {
            "case": target_key,
            "min_speedup": 5.0,
            "met_wall": wall[target_key] >= 5.0 if target_key in wall else None,
            "met_cpu_time": cpu[target_key] >= 5.0 if target_key in cpu else None,
        },
    }
    write_json(args.out, report)


if __name__ == "__main__":
    main()
