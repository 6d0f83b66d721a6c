"""One `kiln run` per repo: a second one refuses at once and names the holder."""

import os
import subprocess
import sys

import pytest

from flows.run_lock import RunInProgress, exclusive_run


def test_second_run_refuses_while_the_first_holds_the_repo(tmp_path):
    with exclusive_run(tmp_path) as path:
        assert path.read_text() == f"pid {os.getpid()}"
        with pytest.raises(RunInProgress, match=rf"another kiln run \(pid {os.getpid()}\) is running"):
            with exclusive_run(tmp_path):
                pass
    with exclusive_run(tmp_path):  # released: the next run goes ahead
        pass


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from flows.run_lock import exclusive_run\n"
            f"with exclusive_run(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunInProgress, match=f"pid {holder.pid}"):
        with exclusive_run(tmp_path):
            pass
    holder.kill()
    holder.wait()
    with exclusive_run(tmp_path):
        pass
