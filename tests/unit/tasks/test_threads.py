"""tasks/threads.py: the thread count a stage's torch gets from the allowed cores, the stages sharing them
and the load other processes put on them."""

from __future__ import annotations

import pytest

from tasks import threads
from tasks.threads import LoadSample, ThreadGovernor, allowed_cores, cgroup_quota, threads_for


@pytest.mark.parametrize(
    "cores,parallel,others,expected",
    [
        (2, 1, 0.0, 2),  # idle: every core
        (2, 1, 0.3, 2),  # a little background work does not cost a thread
        (2, 1, 0.7, 1),  # a busy process beside the stage (measured while torch ran on both)
        (2, 1, 1.0, 1),
        (2, 1, 2.0, 1),  # never below one
        (2, 2, 1.0, 1),  # two stages of one run: one core each, the other stage is expected
        (8, 2, 4.0, 4),
        (8, 2, 6.0, 2),  # beyond the other stage's share: two more cores busy
        (16, 3, 0.0, 5),
        (1, 1, 0.0, 1),
    ],
)
def test_threads_for(cores, parallel, others, expected):
    assert threads_for(cores, parallel, others) == expected


def test_allowed_cores_caps_affinity_by_quota():
    assert allowed_cores([0, 1, 2, 3], None) == 4
    assert allowed_cores([0, 1, 2, 3], 1.5) == 2  # rounded up
    assert allowed_cores([0, 1], 8.0) == 2
    assert allowed_cores([0, 1], 0.2) == 1


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(v1) is None
    assert cgroup_quota(tmp_path / "absent") is None


def test_others_busy_subtracts_this_process():
    # 2 CPUs over 100 ticks of wall time each (200 in all): 180 busy ticks, 120 of them this process's.
    before = LoadSample([0, 1], busy=1000, total=5000, own=300)
    after = LoadSample([0, 1], busy=1180, total=5200, own=420)
    assert before.others_busy(after) == pytest.approx(0.6)
    assert before.others_busy(before) == 0.0


def test_busy_ticks_read_only_the_allowed_cpus(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  30 0 30 300 0 0 0 0 0 0\n"
        "cpu0 10 0 10 100 5 0 0 0 0 0\n"
        "cpu1 20 0 20 100 0 0 0 0 0 0\n"
        "cpu2 99 0 99 0 0 0 0 0 0 0\n"
        "intr 1\n"
    )
    assert threads._cpu_busy_ticks([0, 1], stat) == (60, 265)


def test_fixed_threads_are_set_and_never_changed(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        governor = ThreadGovernor(fixed=1, interval_s=0.0)
        assert governor.start() == 1 and torch.get_num_threads() == 1
        governor.tick()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_omp_num_threads_is_a_ceiling(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "allowed_cores", lambda cpus, quota: 64)
    try:
        assert ThreadGovernor(window_s=0.01).start() == 1
    finally:
        torch.set_num_threads(before)


def test_parallel_share_caps_the_first_look_only(monkeypatch):
    """Started as one of two stages: one of two cores. Later, with no other work measured, both."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv(threads.PARALLEL_ENV, "2")
    monkeypatch.setattr(threads, "allowed_cores", lambda cpus, quota: 2)
    monkeypatch.setattr(LoadSample, "others_busy", lambda self, later: 0.0)
    try:
        governor = ThreadGovernor(window_s=0.0, interval_s=0.0)
        assert governor.start() == 1 and torch.get_num_threads() == 1
        governor.tick()
        assert governor.threads == 2 and torch.get_num_threads() == 2
        monkeypatch.setattr(LoadSample, "others_busy", lambda self, later: 1.0)  # the other stage, one thread
        governor.tick()
        assert governor.threads == 1
    finally:
        torch.set_num_threads(before)


def test_current_is_the_governed_count(monkeypatch):
    """numpy/Arrow work (the n-gram count) sizes its threads from what `govern` set: 1 before any stage."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_current", None)
    assert threads.current() == 1
    try:
        threads.govern(fixed=3)
        assert threads.current() == 3
    finally:
        torch.set_num_threads(before)
