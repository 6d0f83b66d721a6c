"""A pre-imported process that forks one child per `kiln` or `dvc` command the tests run.

A `kiln` process spends most of a smoke command importing (Prefect, MLflow, DVC, torch and the stage
modules: about 10 s of CPU on 2 cores), and the pipeline tests run such a command for almost every step
they check. This server imports all of that once per test worker, then forks a child for each command:
the child takes the command's working directory, environment and standard streams, runs `flows.cli.main`
or `dvc.cli.main` with its arguments, and exits as a `kiln` process would (non-daemon threads joined, the
atexit handlers run, so Prefect's log and event workers drain; only the teardown of every module is
skipped), so the test sees the same output and exit status.

What a fork cannot give is a fresh interpreter: anything read once at import comes from the server's start.
`sh` in tests/pipeline/helpers.py therefore forks only commands run with the tests' common environment (no
variables of their own: a `PYTHONPATH` to a project's code, another Prefect API, ...); those, and every
test that signals or kills a process, start a real one. The commands it forks find a `kiln` shim first on
their PATH (`forward`), so the `kiln stage` commands that DVC runs for them are forked here too. The server
refuses to start with a Python thread besides its main one, as a fork would copy a lock held by it.

    python tests/pipeline/zygote.py SOCKET   # prints "ready" on stdout once imported and listening
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

COMMANDS = ("kiln", "dvc")
MAX_MESSAGE = 1 << 20  # one request: argv, cwd and environment as JSON


def _preload() -> None:
    """What a `kiln` command imports, and every stage module (a run's typed params check imports them all)."""
    import importlib

    import dvc.cli  # noqa: F401
    import prefect.logging.configuration  # noqa: F401

    import flows.check  # noqa: F401
    import flows.cli  # noqa: F401
    import flows.pipeline  # noqa: F401
    import flows.prefect_api  # noqa: F401
    from flows.registry import spec_modules

    for module in sorted(set(spec_modules().values())):
        importlib.import_module(module)


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the command, then exit with its status (never returns)."""
    for target, fd in enumerate(fds):  # stdin, stdout, stderr
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    sys.argv = [str(Path(sys.executable).parent / argv[0]), *argv[1:]]
    try:
        if argv[0] == "kiln":
            from flows.cli import main
        else:
            from dvc.cli import main
        code = main(argv[1:])
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
        sys.exit(f"zygote: {threading.active_count()} Python threads after the imports; a fork would copy their locks")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(8)
    # Each request gets a session process of its own (a fork of this one) that forks the command and waits
    # for it, so a command may itself ask for one (`dvc repro` running `kiln stage` through the shim).
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
    """The `kiln` shim that forked commands find first on PATH: this process's arguments, directory,
    environment and streams go to the zygote, its signals to the command, and it exits as the command
    did. Without the zygote (gone with its test worker), it becomes the real `kiln`."""
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


class Zygote:
    """The client: start the server (with `env`, which forked commands must share) and run commands in it."""

    def __init__(self, env: Mapping[str, str]):
        self.env = dict(env)
        self.home = tempfile.mkdtemp(prefix="kiln-zygote-")
        self.path = os.path.join(self.home, "socket")
        from flows.prefect_api import die_with_parent  # not at the top: the shim imports this module bare

        self.process = subprocess.Popen(
            [sys.executable, __file__, self.path],
            cwd=self.home,
            env=self.env,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent,  # the server ends with the test worker that started it
        )
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.process.kill()
            raise RuntimeError(f"the test zygote did not start (exit {self.process.wait()})")
        # The shim: the `kiln` that forked commands run (DVC's stage commands), itself forwarded here.
        self.bin = os.path.join(self.home, "bin")
        os.mkdir(self.bin)
        shim = os.path.join(self.bin, "kiln")
        with open(shim, "w") as out:
            out.write(
                f"#!{sys.executable} -S\n"  # no site-packages: the forwarding needs only the standard library
                "import sys\n"
                f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                "import zygote\n"
                f"zygote.forward({self.path!r}, {os.path.join(os.path.dirname(sys.executable), 'kiln')!r})\n"
            )
        os.chmod(shim, 0o755)

    def alive(self) -> bool:
        return self.process.poll() is None

    def run(
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
            request = {"argv": list(argv), "cwd": str(cwd), "env": {**env, "PATH": path}}
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
                conn.connect(self.path)
                socket.send_fds(conn, [json.dumps(request).encode()], [inp.fileno(), out.fileno(), err.fileno()])
                pid = int(conn.recv(64))
                conn.settimeout(timeout)
                start = time.monotonic()
                try:
                    code = int(conn.recv(64))
                except TimeoutError:
                    os.kill(pid, signal.SIGKILL)
                    conn.settimeout(None)
                    conn.recv(64)
                    raise subprocess.TimeoutExpired(list(argv), time.monotonic() - start) from None
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(list(argv), code, out.read(), err.read())


if __name__ == "__main__":
    sys.path[0] = str(Path(sys.executable).parent)  # as in the `kiln` and `dvc` console scripts
    serve(sys.argv[1])
