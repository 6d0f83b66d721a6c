"""The one atomic writer: every stage output is written to a temporary path and renamed.

A stage that fails (or is killed) mid-write leaves no half-written file or folder where DVC would
cache it: the temporary sits beside the target (same file system, so the rename is atomic) under a
dot-name that is removed on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.errors import InputError
from tasks.phases import in_phase


class OutputNotWritable(InputError):
    """The stage's output folder cannot be written (a read-only data/, a full disk, a file in the way)."""


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: Path | str, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces `target` (a file, or a folder if `directory`)."""
    target = Path(target)
    prefix = f".{target.name}.tmp-"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; outputs are ordinary folders
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as err:  # nothing written yet: the environment's fault, reported as one line
        raise OutputNotWritable(f"{target.parent}: cannot write {target.name} here ({err.strerror or err})") from err
    try:
        yield tmp
        if directory:
            if target.exists():
                # A folder cannot be renamed over a non-empty one: move the old one aside first.
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / target.name)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        else:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs are ordinary files
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


@in_phase("io")
def write_text(target: Path | str, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: Path | str, data: Any) -> Path:
    return write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")
