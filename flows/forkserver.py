"""A pre-imported process that forks one child per `kiln` (or `dvc`) command: a parallel `kiln run`'s stages.

A `kiln stage` process spends about 10 s of CPU importing before its flow starts (Prefect, MLflow, DVC, torch
and the stage modules, on 2 cores), and a parallel `kiln run` (`runtime.max_parallel` > 1, the thread task
runner) starts one per stage, next to the other slot's training. This server imports all of that once per run,
then forks a child for each stage: the child takes the command's working directory, environment and standard
streams, runs `flows.cli.main` with its arguments, and exits as a `kiln` process would (non-daemon threads
joined, the atexit handlers run, so Prefect's log and event workers drain; only the teardown of every module is
skipped), so `kiln run` sees the same output and exit status. The tests fork their own commands the same way
(tests/pipeline/zygote.py).

What a fork cannot give is a fresh interpreter: whatever a library reads once at import (Prefect's settings,
the OpenMP variables) comes from the server's start, so the server starts with the environment its children
get (`kiln run` gives every stage of a run the same one). It refuses to start with a Python thread besides its
main one, as a fork would copy a lock held by it, or with CUDA initialised (a child could not use it), and
never touches torch's thread pools, RNGs or devices, which each child sets up as a fresh process would. Each
child dies with the server, the server with the process that started it (SIGTERM, which a stage answers by
ending its MLflow run FAILED).

`KILN_FORKSERVER=0` starts every stage as a process of its own, as before.

    python flows/forkserver.py SOCKET PATH0   # prints "ready" on stdout once imported and listening

PATH0 is the server's `sys.path[0]`: the project root for `kiln run`'s stages (which ran as `python -m
flows.cli stage NAME` in the root, i.e. the root's code), the environment's bin folder for the tests (as in the
`kiln` console script).

This file is also run bare (`python -S`, by the tests' `kiln` shim, for `forward`): no imports of the project
at module level.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

COMMANDS = ("kiln", "dvc")
MAX_MESSAGE = 1 << 20  # one request: argv, cwd and environment as JSON
DISABLE_ENV = "KILN_FORKSERVER"  # "0": no server, a process per stage


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


def _die_with_parent() -> None:
    from flows.prefect_api import die_with_parent

    die_with_parent()


PRELOADED = ("prefect.logging.configuration", "flows.check", "flows.pipeline", "flows.prefect_api")
_MAINS: dict = {}  # command -> its console script's function, loaded by `_preload`


def _preload() -> None:
    """What a `kiln` command imports (its console script's module, found by name like the stage modules:
    this server runs commands, it does not know them), and every stage module (any may be the next stage)."""
    import importlib
    from importlib.metadata import entry_points

    for name in COMMANDS:
        (script,) = entry_points(group="console_scripts", name=name)
        _MAINS[name] = script.load()
    for module in PRELOADED:
        importlib.import_module(module)
    from flows.registry import spec_modules

    for module in sorted(set(spec_modules().values())):
        importlib.import_module(module)


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the command, then exit with its status (never returns)."""
    _die_with_parent()  # the session that waits for it
    for target, fd in enumerate(fds):  # stdin, stdout, stderr
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    sys.argv = [str(Path(sys.executable).parent / argv[0]), *argv[1:]]
    try:
        code = _MAINS[argv[0]](argv[1:])
    except SystemExit as done:
        code = done.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if not isinstance(code, int):  # sys.exit(None) and sys.exit("message"), as the interpreter treats them
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    # The interpreter's own exit, less its teardown of every module (seconds in a process this large):
    # non-daemon threads joined, then the atexit handlers (Prefect's log and event workers drain there).
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(path: str) -> None:
    _preload()
    if threading.active_count() != 1:
        sys.exit(
            f"forkserver: {threading.active_count()} Python threads after the imports; a fork would copy their locks"
        )
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a forked child cannot use a parent's CUDA context
        sys.exit("forkserver: CUDA was initialised at import; the stages start as processes")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(8)
    # Each request gets a session process of its own (a fork of this one) that forks the command and waits
    # for it, so a command may itself ask for one (`dvc repro` running `kiln stage` through the tests' shim).
    # Sessions are reaped by the kernel; a session sets SIGCHLD back, as its command's own children need it.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        message, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _session(conn, json.loads(message), fds)
        conn.close()
        for fd in fds:
            os.close(fd)


def _session(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Fork the command, send its PID, wait for it, send its exit status; never returns."""
    try:
        _die_with_parent()  # the server
        pid = os.fork()
        if pid == 0:
            conn.close()
            _run_child(request, fds)
        for fd in fds:
            os.close(fd)
        conn.sendall(f"{pid}".encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}".encode())
    finally:
        os._exit(0)


def forward(path: str, real: str) -> None:
    """A `kiln` shim (the tests put one first on their forked commands' PATH): this process's arguments,
    directory, environment and streams go to the server, its signals to the command, and it exits as the
    command did. Without the server, it becomes the real `kiln`."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(path)
    except OSError:
        os.execv(real, [real, *sys.argv[1:]])
    request = {"argv": ["kiln", *sys.argv[1:]], "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    pid = int(conn.recv(64))
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: os.kill(pid, signum))
    code = int(conn.recv(64))
    if code < 0:  # killed by a signal: so is this process
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


class ForkServer:
    """The client. The server starts (with `env`, which every forked command must share) at the first
    `ready`, which waits for its imports: a run whose stages are all up to date never starts one."""

    def __init__(self, env: Mapping[str, str], path0: str | Path):
        self.env, self.path0 = dict(env), str(path0)
        self.home = tempfile.mkdtemp(prefix="kiln-forkserver-")
        self.path = os.path.join(self.home, "socket")
        self.process: subprocess.Popen | None = None
        self._ready: bool | None = None
        self._lock = threading.Lock()

    def ready(self) -> bool:
        """Whether the server imported and listens (started and waited for the first time). False: it failed
        to start, and said why on stderr."""
        with self._lock:  # the stages of the first slots ask at once; one starts it
            if self._ready is None:
                self.process = subprocess.Popen(
                    [sys.executable, __file__, self.path, self.path0],
                    cwd=self.home,
                    env=self.env,
                    stdout=subprocess.PIPE,
                    text=True,
                    preexec_fn=_die_with_parent,  # the server ends with the process that started it
                )
                self._ready = self.process.stdout.readline().strip() == "ready"
                if not self._ready:
                    self.close()
        return self._ready and self.process.poll() is None

    def submit(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str], fds: Sequence[int]):
        """Fork `argv` with `fds` as its stdin, stdout and stderr; returns (connection, pid). The exit status
        follows on the connection (`wait`)."""
        if argv[0] not in COMMANDS:
            raise ValueError(f"the fork server runs {' and '.join(COMMANDS)} commands, not {argv[0]!r}")
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.connect(self.path)
            request = {"argv": list(argv), "cwd": str(cwd), "env": dict(env)}
            socket.send_fds(conn, [json.dumps(request).encode()], list(fds))
            return conn, int(conn.recv(64))
        except BaseException:
            conn.close()
            raise

    @staticmethod
    def wait(conn: socket.socket) -> int:
        """The exit status of a submitted command (negative: the signal that killed it), as subprocess's."""
        with conn:
            status = conn.recv(64)
        if not status:  # the session died before its command ended: the server was stopped
            raise RuntimeError("the fork server stopped before the command ended")
        return int(status)

    def run(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str], fds: Sequence[int] = (0, 1, 2)) -> int:
        """`argv` in a forked child with this process's streams (or `fds`); its exit status."""
        conn, _ = self.submit(argv, cwd, env, fds)
        return self.wait(conn)

    def close(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                self.process.wait()
            self.process.stdout.close()
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.path[0] = sys.argv[2]
    serve(sys.argv[1])
