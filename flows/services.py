"""Background servers on loopback for operations: a Prefect server (schedules), PostgreSQL and an MLflow
tracking server on it. What `make prefect-server`, `make mlflow-server` and `make services-stop` run, and
what the operations tests start on free ports.

    python -m flows.services prefect  [--port 4200] [--dir .services]
    python -m flows.services postgres [--port 5433] [--dir .services]
    python -m flows.services mlflow   [--port 5001] [--pg-port 5433] [--dir .services] [--backend-store-uri URI]
    python -m flows.services stop     [--dir .services]

Each server runs detached, with `<dir>/<name>.pid` and `<dir>/<name>.log`; starting one that already
answers does nothing. PostgreSQL refuses to run as root, so as root its cluster belongs to the
`postgres` user of the Debian package (`runuser`); it listens on 127.0.0.1 only (no Unix socket) and
takes password logins of the user `kiln` (the password is generated into `<dir>/pg/password`, 0600).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

PG_USER = "kiln"
PG_DB = "mlflow"


class ServiceError(RuntimeError):
    """A server could not be started; the message says why and where its log is."""


def _write_private(path: Path, text: str) -> None:
    """Create `path` readable by its owner only from the first byte (a write-then-chmod leaves a window in
    which another local user can read a password); an existing file is replaced, not reused."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def wait_http(url: str, timeout_s: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"exited with {process.returncode} before {url} answered; log: {log}\n{_tail(log)}")
        try:
            if requests.get(url, timeout=2, proxies={"http": "", "https": ""}).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise ServiceError(f"{url} did not answer within {timeout_s:g} s; log: {log}\n{_tail(log)}")


def _tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=2, proxies={"http": "", "https": ""}).status_code < 500
    except requests.RequestException:
        return False


def _spawn(name: str, argv: list[str], folder: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `argv` detached (own session, so a Ctrl-C in the shell that started it does not stop it)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    (folder / f"{name}.pid").write_text(f"{process.pid}\n")
    return process


def _bin(name: str) -> str:
    """A console script of this environment (prefect, mlflow), whatever PATH says."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


# --- Prefect -------------------------------------------------------------------------------------------


def start_prefect(folder: Path, port: int = 4200, timeout_s: float = 90) -> str:
    """`prefect server start` on 127.0.0.1:PORT with its database under `<folder>/prefect`; returns the
    API URL to put in PREFECT_API_URL."""
    api = f"http://127.0.0.1:{port}/api"
    if _answers(f"{api}/health"):
        return api
    home = (folder / "prefect").resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    process = _spawn(
        "prefect", [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], folder, env
    )
    wait_http(f"{api}/health", timeout_s, process, folder / "prefect.log")
    return api


# --- PostgreSQL ----------------------------------------------------------------------------------------


def pg_bin(name: str) -> str:
    """A PostgreSQL server program: Debian keeps them in /usr/lib/postgresql/<version>/bin, off PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if found:
        return str(found[-1])
    if shutil.which(name):
        return shutil.which(name)
    raise ServiceError(
        f"PostgreSQL's {name} is not installed: `make services` (apt-get install postgresql) installs it"
    )


def _as_pg_owner(argv: list[str]) -> list[str]:
    """PostgreSQL refuses root: run its programs as the Debian package's `postgres` user then."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", os.environ.get("KILN_PG_OS_USER", "postgres"), "--", *argv]


def _give_to_pg_owner(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, os.environ.get("KILN_PG_OS_USER", "postgres"))


def start_postgres(folder: Path, port: int = 5433, timeout_s: float = 60) -> str:
    """initdb (once) into `<folder>/pg/data`, start it on 127.0.0.1:PORT, create the database `mlflow`;
    returns its SQLAlchemy URI (password included)."""
    pg = (folder / "pg").resolve()
    data, password_file = pg / "data", pg / "password"
    pg.mkdir(parents=True, exist_ok=True)
    if not password_file.exists():
        _write_private(password_file, secrets.token_urlsafe(18) + "\n")
    password = password_file.read_text().strip()
    if not (data / "PG_VERSION").exists():
        if os.geteuid() == 0 and subprocess.run(_as_pg_owner(["test", "-x", str(pg)])).returncode != 0:
            raise ServiceError(
                f"the `postgres` user cannot reach {pg} (PostgreSQL refuses to run as root, so "
                "the cluster belongs to it): give every folder above it o+x, or use another --dir"
            )
        data.mkdir(exist_ok=True)
        data.chmod(0o700)
        _give_to_pg_owner(data)
        # The password reaches initdb through a file its user can read, removed right after.
        pwfile = data.parent / ".initdb-pw"
        _write_private(pwfile, password + "\n")
        _give_to_pg_owner(pwfile)
        try:
            done = subprocess.run(
                _as_pg_owner(
                    [
                        pg_bin("initdb"),
                        "-D",
                        str(data),
                        "-U",
                        PG_USER,
                        f"--pwfile={pwfile}",
                        "--auth=scram-sha-256",
                        "--encoding=UTF8",
                        "--locale=C",
                    ]
                ),
                capture_output=True,
                text=True,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise ServiceError(f"initdb {data} failed:\n{done.stderr[-2000:]}")
    log = pg / "postgres.log"
    status = subprocess.run(_as_pg_owner([pg_bin("pg_ctl"), "status", "-D", str(data)]), capture_output=True)
    if status.returncode != 0:
        if not log.exists():
            log.touch()
            _give_to_pg_owner(log)
        # TCP on loopback only: no Unix socket, whose path is limited to 107 characters.
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories=''"
        done = subprocess.run(
            _as_pg_owner(
                [
                    pg_bin("pg_ctl"),
                    "start",
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-w",
                    "-t",
                    str(int(timeout_s)),
                    "-o",
                    options,
                ]
            ),
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise ServiceError(f"pg_ctl start failed:\n{done.stdout[-1000:]}{done.stderr[-1000:]}\n{_tail(log)}")
    (folder / "postgres.port").write_text(f"{port}\n")
    _create_database(port, password)
    return f"postgresql+psycopg2://{PG_USER}:{quote(password, safe='')}@127.0.0.1:{port}/{PG_DB}"


def _create_database(port: int, password: str) -> None:
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, password=password, dbname="postgres")
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DB,))
            if cursor.fetchone() is None:
                cursor.execute(f"CREATE DATABASE {PG_DB}")
    finally:
        connection.close()


def stop_postgres(folder: Path) -> None:
    data = (folder / "pg" / "data").resolve()
    if (data / "postmaster.pid").exists():
        subprocess.run(
            _as_pg_owner([pg_bin("pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"]), capture_output=True
        )


# --- MLflow --------------------------------------------------------------------------------------------


def start_mlflow(
    folder: Path, port: int = 5001, backend_store_uri: str | None = None, pg_port: int = 5433, timeout_s: float = 120
) -> str:
    """`mlflow server` on 127.0.0.1:PORT, on PostgreSQL (started first) unless `backend_store_uri` is
    given; artifacts served by the server from `<folder>/mlflow-artifacts`. Returns the tracking URI."""
    url = f"http://127.0.0.1:{port}"
    if _answers(f"{url}/health"):
        return url
    backend = backend_store_uri or start_postgres(folder, pg_port)
    artifacts = (folder / "mlflow-artifacts").resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    # The store URI (PostgreSQL's password in it) goes through the environment, not the command line
    # that `ps` shows every local user.
    process = _spawn(
        "mlflow",
        [
            _bin("mlflow"),
            "server",
            "--artifacts-destination",
            str(artifacts),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        folder,
        {
            "MLFLOW_BACKEND_STORE_URI": backend,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            # Its background job runner (8 huey processes) serves GenAI jobs Kiln never
            # submits; on a small machine they compete with the stages.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
        },
    )
    wait_http(f"{url}/health", timeout_s, process, folder / "mlflow.log")
    return url


# --- stop ----------------------------------------------------------------------------------------------


def stop_process(folder: Path, name: str, timeout_s: float = 15) -> None:
    """Stop the server recorded in `<folder>/<name>.pid` (its whole process group)."""
    pid_file = folder / f"{name}.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().strip())
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it when this process started it, or it lingers as a zombie
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    pid_file.unlink(missing_ok=True)


def stop_all(folder: Path) -> None:
    for name in ("mlflow", "prefect"):
        stop_process(folder, name)
    stop_postgres(folder)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.services", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("service", choices=["prefect", "postgres", "mlflow", "stop"])
    parser.add_argument("--dir", type=Path, default=Path(".services"), help="pid, log and data folder")
    parser.add_argument("--port", type=int, help="prefect 4200, postgres 5433, mlflow 5001")
    parser.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL's port under mlflow")
    parser.add_argument("--backend-store-uri", help="mlflow: this store instead of PostgreSQL")
    args = parser.parse_args(argv)
    try:
        if args.service == "prefect":
            api = start_prefect(args.dir, args.port or 4200)
            print(f"Prefect server: {api} (log {args.dir / 'prefect.log'})\nexport PREFECT_API_URL={api}")
        elif args.service == "postgres":
            uri = start_postgres(args.dir, args.port or 5433)
            print(
                f"PostgreSQL on 127.0.0.1:{args.port or 5433}, database {PG_DB}: "
                f"{uri.replace(uri.split(':')[2].split('@')[0], '***')}"
            )
        elif args.service == "mlflow":
            url = start_mlflow(args.dir, args.port or 5001, args.backend_store_uri, args.pg_port)
            print(f"MLflow server: {url} (log {args.dir / 'mlflow.log'})\nexport MLFLOW_TRACKING_URI={url}")
        else:
            stop_all(args.dir)
            print(f"stopped the servers of {args.dir}")
    except ServiceError as err:
        print(f"{args.service}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
