"""benchmarks/bench_stages.py's arithmetic on runs and calibration files made here: the phase split of a stage,
the fallback for a run from before the phase clock, and the machine-speed ratio."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from benchmarks import bench_stages


def fake_run(name: str, start_ms: int, seconds: float, metrics: dict[str, float]) -> SimpleNamespace:
    info = SimpleNamespace(run_name=name, start_time=start_ms, end_time=start_ms + int(seconds * 1000))
    return SimpleNamespace(info=info, data=SimpleNamespace(metrics=metrics))


def test_a_stage_splits_by_its_phase_clock_and_the_rest_is_other(monkeypatch):
    clocked = {f"phase_{p}_seconds": 0.0 for p in bench_stages.PHASES}
    clocked |= {"phase_training_seconds": 60.0, "phase_sampling_seconds": 25.0, "phase_io_seconds": 5.0}
    runs = [
        fake_run("b", 2000, 101.0, {"stage_seconds": 100.0, "train_seconds": 70.0, **clocked}),
        fake_run("a", 1000, 12.0, {"stage_seconds": 10.0, "train_seconds": 6.0, "sample_seconds": 3.0}),
    ]
    monkeypatch.setattr(bench_stages, "children_of", lambda client, parent: runs)
    a, b = bench_stages.stage_rows(None, None)  # in start order
    # the clock's exclusive phases, not the stage's own train_seconds (which include its evaluations)
    assert b == {
        "stage": "b",
        "seconds": 100.0,
        "wall_seconds": 101.0,
        "training_seconds": 60.0,
        "sampling_seconds": 25.0,
        "io_seconds": 5.0,
        "other_seconds": 10.0,
    }
    # a run from before the clock: the timings it logged
    assert (a["training_seconds"], a["sampling_seconds"], a["other_seconds"]) == (6.0, 3.0, 1.0)


def test_machine_speed_is_the_geometric_mean_of_the_ratios_to_the_committed_benchmark(tmp_path):
    reference = json.loads((bench_stages.ROOT / "benchmarks/results/lm.json").read_text())["results"]
    factors = [0.5, 2.0] + [1.0] * (len(reference) - 2)  # geometric mean 1 over any number of models
    today = {"results": [{**r, "tokens_per_s": r["tokens_per_s"] * f} for r, f in zip(reference, factors)]}
    slow = {"results": [{**r, "tokens_per_s": r["tokens_per_s"] / 4} for r in reference]}
    (tmp_path / "a.json").write_text(json.dumps(today))
    (tmp_path / "b.json").write_text(json.dumps(slow))
    speed = bench_stages.machine_speed([tmp_path / "a.json", tmp_path / "b.json"])
    assert [s["geomean_ratio"] for s in speed["samples"]] == [1.0, 0.25]
    assert speed["samples"][0]["ratio_to_reference"][reference[0]["model"]] == 0.5
    assert speed["geomean_ratio"] == pytest.approx(0.625)
    (tmp_path / "c.json").write_text(json.dumps({"results": [{"model": "gpt", "tokens_per_s": 1.0}]}))
    with pytest.raises(SystemExit, match="c.json: no model"):
        bench_stages.machine_speed([tmp_path / "c.json"])


def test_dispatch_is_each_stage_task_time_less_its_run_and_skips_what_did_not_run():
    summary = "\n".join(
        [
            "| stage | status | seconds | detail |",
            "|---|---|---:|---|",
            "| corpus | ran | 15.80 |  |",
            "| ngram | up to date | 0.90 |  |",
            "| lm@lstm | ran | 147.20 |  |",
            "| lm@s4d | failed | 3.00 | RuntimeError: x \\| y |",
        ]
    )
    rows = [{"stage": "corpus", "wall_seconds": 0.7}, {"stage": "lm@lstm", "wall_seconds": 117.3}]
    assert bench_stages.dispatch(summary, rows) == {"stages": 2, "total_seconds": 45.0, "median_seconds": 22.5}
    assert rows[1] == {"stage": "lm@lstm", "wall_seconds": 117.3, "task_seconds": 147.2, "dispatch_seconds": 29.9}
    assert bench_stages.dispatch(summary, [{"stage": "other", "wall_seconds": 1.0}]) == {}


def test_the_replayed_scheduler_starts_ready_stages_in_list_order_and_critical_path_order_wins():
    from flows.dvc_graph import critical_path_order

    # two 5 s stages listed first, and a chain L1 (1 s) -> L2 (10 s); two slots
    order, upstream = ["s1", "s2", "L1", "L2"], {"s1": [], "s2": [], "L1": [], "L2": ["L1"]}
    seconds = {"s1": 5.0, "s2": 5.0, "L1": 1.0, "L2": 10.0}
    # s1 and s2 at 0, L1 at 5, L2 from 6 to 16
    assert bench_stages.makespan(order, upstream, seconds, 2) == 16.0
    ranked = critical_path_order(order, upstream, seconds)
    # L1 and s1 at 0, L2 from 1 to 11 beside s1 then s2 (5 to 10)
    assert ranked == ["L1", "L2", "s1", "s2"] and bench_stages.makespan(ranked, upstream, seconds, 2) == 11.0
    assert bench_stages.makespan(order, upstream, seconds, 1) == 21.0  # one slot: the sum, in any order
