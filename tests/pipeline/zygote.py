"""The tests' commands fork from one pre-imported process per test worker: flows/forkserver.py, the server a
parallel `kiln run` forks its stages from, here for every `kiln` and `dvc` command a test runs.

A `kiln` process spends most of a smoke command importing (about 10 s of CPU on 2 cores), and the pipeline
tests run such a command for almost every step they check. The server imports it all once per worker; `run`
`capture` collects a forked command's output and exit status as `subprocess.run(capture_output=True)` would.

What a fork cannot give is a fresh interpreter: anything read once at import comes from the server's start.
`sh` in tests/pipeline/helpers.py therefore forks only commands run with the tests' common environment (no
variables of their own: a `PYTHONPATH` to a project's code, another Prefect API, ...); those, and every test
that signals or kills a process, start a real one. The commands it forks find a `kiln` shim first on their
PATH (`flows/forkserver.py: forward`), so the `kiln stage` commands that DVC runs for them are forked here too.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from flows import forkserver
from flows.forkserver import COMMANDS, ForkServer

__all__ = ["COMMANDS", "Zygote"]


class Zygote(ForkServer):
    """The server (started with `env`, which forked commands must share; the console scripts' `sys.path`, so
    a project copy's commands run the installed code as a `kiln` process would) and its `kiln` shim."""

    def __init__(self, env: Mapping[str, str]):
        super().__init__(env, Path(sys.executable).parent)
        if not self.ready():
            raise RuntimeError("the test zygote did not start")
        atexit.register(self.close)  # with the test worker: the server, and its folder (socket, shim)
        # The shim: the `kiln` that forked commands run (DVC's stage commands), itself forwarded here.
        self.bin = os.path.join(self.home, "bin")
        os.mkdir(self.bin)
        shim = os.path.join(self.bin, "kiln")
        with open(shim, "w") as out:
            out.write(
                f"#!{sys.executable} -S\n"  # no site-packages: the forwarding needs only the standard library
                "import sys\n"
                f"sys.path.insert(0, {os.path.dirname(os.path.abspath(forkserver.__file__))!r})\n"
                "import forkserver\n"
                f"forkserver.forward({self.path!r}, {os.path.join(os.path.dirname(sys.executable), 'kiln')!r})\n"
            )
        os.chmod(shim, 0o755)

    def capture(
        self, argv: Sequence[str], cwd: Path, env: Mapping[str, str], stdin: str | None, timeout: float
    ) -> subprocess.CompletedProcess:
        """`argv` in a forked child, as subprocess.run(argv, capture_output=True, text=True) would run it."""
        with (
            tempfile.TemporaryFile("w+") as inp,
            tempfile.TemporaryFile("w+") as out,
            tempfile.TemporaryFile("w+") as err,
        ):
            inp.write(stdin or "")
            inp.flush()
            inp.seek(0)
            path = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"  # the stages it runs go through the shim
            conn, pid = self.submit(argv, cwd, {**env, "PATH": path}, [inp.fileno(), out.fileno(), err.fileno()])
            conn.settimeout(timeout)
            start = time.monotonic()
            try:
                code = self.wait(conn)
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(list(argv), time.monotonic() - start) from None
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(list(argv), code, out.read(), err.read())
