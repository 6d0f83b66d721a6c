"""One `kiln run` per repo at a time.

Stages that run in-process hold DVC's repo lock only while DVC reads or records them, not while they
compute, so a second end-to-end run could interleave with the first and leave `dvc.lock` describing
outputs it did not make. The run takes an exclusive `flock` on `.dvc/tmp/kiln-run.lock` for its whole
length; a second run refuses at once, naming the holder. The kernel drops the lock when the process
dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RunInProgress(RuntimeError):
    """Another `kiln run` holds this repo."""


@contextmanager
def exclusive_run(root: Path) -> Iterator[Path]:
    path = root / ".dvc" / "tmp" / "kiln-run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunInProgress(
                f"another kiln run ({holder}) is running in {root} and holds {path}; wait for it to finish, or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
