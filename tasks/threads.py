"""How many threads a stage's torch may use: the cores this process is allowed (CPU affinity and the
cgroup's CPU quota), shared among the stages `kiln run` runs at once at the start, less the cores that other
work (the other stages included, once they run) keeps busy. Two cores shared by a two-thread torch and one
busy process make every OpenMP barrier wait for a descheduled thread, and training slows to a fraction of
what one thread reaches (benchmarks/bench_threads.py). So the count is looked at again while training
(`ThreadGovernor.tick`).
OpenMP's passive wait policy was measured as well and left out: it cost a third or more of idle throughput.

`runtime.threads` > 0 fixes the count and turns all of this off; OMP_NUM_THREADS, when set, is a ceiling.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# `kiln run` tells each `kiln stage` subprocess how many stages share the cores with it.
PARALLEL_ENV = "KILN_PARALLEL_STAGES"
CGROUP = Path("/sys/fs/cgroup")


def cgroup_quota(root: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), None
    when unlimited or not readable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def allowed_cores(cpus: list[int] | None = None, quota: float | None = None) -> int:
    """CPUs in this process's affinity mask, capped by the cgroup quota (rounded up: 1.5 cores of quota run
    two threads at three quarters each)."""
    n = len(cpus if cpus is not None else allowed_cpus())
    return max(1, min(n, math.ceil(quota)) if quota is not None else n)


def _cpu_busy_ticks(cpus: list[int], stat: Path = Path("/proc/stat")) -> tuple[int, int]:
    """(busy, total) clock ticks summed over `cpus` from /proc/stat (idle and iowait count as not busy)."""
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = 0
    for line in stat.read_text().splitlines():
        cols = line.split()
        if cols and cols[0] in wanted:
            ticks = [int(v) for v in cols[1:9]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def _own_ticks(stat: Path = Path("/proc/self/stat")) -> int:
    """utime + stime of this process, all its threads, in clock ticks."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted after the name


@dataclass
class LoadSample:
    """A point to measure the cores other processes kept busy since (on the allowed CPUs)."""

    cpus: list[int]
    busy: int = 0
    total: int = 0
    own: int = 0

    @classmethod
    def now(cls, cpus: list[int]) -> LoadSample:
        busy, total = _cpu_busy_ticks(cpus)
        return cls(cpus, busy, total, _own_ticks())

    def others_busy(self, later: LoadSample) -> float:
        """Cores that processes other than this one kept busy between `self` and `later`."""
        elapsed = later.total - self.total  # ticks over all the CPUs: len(cpus) per tick of wall time
        if elapsed <= 0:
            return 0.0
        others = (later.busy - self.busy) - (later.own - self.own)
        return max(0.0, others / elapsed * len(self.cpus))


def threads_for(cores: int, parallel: int, others_busy: float) -> int:
    """This stage's share of `cores` among `parallel` stages, less the cores other work keeps busy beyond
    the other stages' shares, rounded to the nearest whole thread; never below one."""
    share = max(1, cores // max(1, parallel))
    expected_others = cores - share  # the other stages of the same run, at their share
    free = cores - max(others_busy, expected_others)
    return max(1, min(share, math.floor(free + 0.5)))


def env_cap() -> int | None:
    """OMP_NUM_THREADS when the user set it: a ceiling this module respects."""
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def parallel_stages() -> int:
    try:
        return max(1, int(os.environ.get(PARALLEL_ENV, "1")))
    except ValueError:
        return 1


@dataclass
class ThreadGovernor:
    """Sets torch's intra-op threads at the start and again every `interval_s` while a stage works."""

    fixed: int = 0  # runtime.threads; > 0: that many, never changed
    interval_s: float = 10.0
    window_s: float = 0.25  # how long the first look measures the load before any work starts
    cpus: list[int] = field(default_factory=allowed_cpus)
    threads: int = 0
    _last: LoadSample | None = None
    _checked: float = 0.0

    def start(self) -> int:
        if self.fixed:
            return self._set(self.fixed)
        first = LoadSample.now(self.cpus)
        time.sleep(self.window_s)
        # The stages a run starts together are still importing during this first look, so their load is
        # not seen yet: the share among `max_parallel` stages is the cap.
        return self._look(first, parallel_stages())

    def tick(self) -> None:
        """Cheap when not due; call it once per training step."""
        if self.fixed or self._last is None or time.monotonic() - self._checked < self.interval_s:
            return
        # From then on the other stages' load is measured like any other work's, so a stage left running
        # alone (the end of a branch, the pipeline's tail) takes the cores the finished stages gave back.
        self._look(self._last, 1)

    def _look(self, since: LoadSample, parallel: int) -> int:
        now = LoadSample.now(self.cpus)
        cores = allowed_cores(self.cpus, cgroup_quota())
        cores = min(cores, env_cap() or cores)
        self._last, self._checked = now, time.monotonic()
        return self._set(threads_for(cores, parallel, since.others_busy(now)))

    def _set(self, n: int) -> int:
        # A stage that never imports torch (the n-gram model) is not made to load it.
        torch = sys.modules.get("torch")
        if torch is not None and torch.get_num_threads() != n:
            torch.set_num_threads(n)
        self.threads = n
        return n


_current: ThreadGovernor | None = None


def govern(fixed: int = 0) -> int:
    """Size this process's torch threads for the stage starting now (`fixed`: runtime.threads)."""
    global _current
    _current = ThreadGovernor(fixed=fixed)
    return _current.start()


def current() -> int:
    """Threads the running stage may use, as `govern` sized them (1 outside a stage): for numpy or Arrow
    work split across threads (the n-gram count), which torch's setting does not reach."""
    return _current.threads if _current is not None else 1


def tick() -> None:
    """Once per training step: look at the load again when due."""
    if _current is not None:
        _current.tick()
