"""Bad input and faults through the user-facing CLI: every case is one clear error, and nothing is harmed.

The contract, asserted for every case (each runs `flows.cli.main([...])` in-process in one smoke copy of the
project, whose `kiln run --target ngram` the module fixture ran once):

- exit status 2;
- stderr is exactly one line, starting `kiln <command>: error:`, that names the culprit (the file, key,
  record or name: each case asserts its own substring), and holds no traceback;
- the outputs are unchanged: every file under data/ and dvc.lock hash the same before and after;
- no MLflow run is left RUNNING in the project's store (sqlite:///<project>/mlflow.db, all experiments);
- no new listening TCP port is left behind (the LISTEN sockets of /proc/net/tcp and tcp6 before and after,
  less the module's own Prefect API and sockets that processes outside this test process's tree hold).

Categories (one parametrized test each): params (the strict loader: keys, types, non-finite floats, YAML
syntax, tags, alias bombs, size, encoding, sections, profiles), corpus user data (`corpus.source: path`),
images user data (`images.source: folder | parquet`), COCO user data (`scenes.source: coco`), and the CLI
and its artefacts (unknown names, `kiln score`, a stale model, a broken dvc.yaml, an unreachable tracking
server). Each case restores what it changed: params/ and dvc.yaml are restored from their text, user data
lies in the case's own tmp folder, and a case that rebuilds an output puts the old one back.

A case the code does not meet yet is marked xfail(strict=True) with what happens today.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest

from flows.cli import main
from tests.faults import builders as b
from tests.pipeline.helpers import set_params, sh, smoke_project

pytestmark = pytest.mark.pipeline


# ------------------------------------------------------------------------------------ fixtures


@dataclass
class Project:
    root: Path
    prefect_port: int
    client: object  # MlflowClient of the project's store


class _CurrentStderr:
    """Whatever `sys.stderr` is at the moment of writing (the case's capsys): Prefect binds its console
    handlers' stream once, when it first sets up logging, and that stream would be a closed capture later."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False


def _prefect_console_to_current_stderr() -> Callable[[], None]:
    """Point Prefect's console handlers at the current stderr, so each case sees what a user would see;
    returns the call that points them back."""
    import logging

    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    changed: list[tuple[logging.StreamHandler, object, object]] = []
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                changed.append((handler, handler.stream, handler.console.file))
                handler.stream = handler.console.file = _CurrentStderr()
            elif isinstance(handler, logging.StreamHandler) and handler.stream in (sys.__stderr__, sys.stderr):
                changed.append((handler, handler.stream, None))
                handler.stream = _CurrentStderr()

    def restore() -> None:
        for handler, stream, file in changed:
            handler.stream = stream
            if file is not None:
                handler.console.file = file

    return restore


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, repo_root: Path):
    from mlflow.tracking import MlflowClient

    from flows.prefect_api import local_prefect_api

    root = smoke_project(repo_root, tmp_path_factory.mktemp("bad_input") / "repo")
    with ExitStack() as stack:
        had_url = os.environ.get("PREFECT_API_URL")
        url = stack.enter_context(local_prefect_api())
        os.environ["PREFECT_API_URL"] = url
        sh(root, "kiln", "run", "--target", "ngram", env={"PREFECT_API_URL": url})  # a model for kiln score
        assert (root / "data" / "models" / "ngram").is_dir() and (root / "dvc.lock").is_file()
        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        stack.callback(_prefect_console_to_current_stderr())
        # The cases' in-process `kiln stage` flow runs send no heartbeat: Prefect joins its thread, asleep in
        # whole seconds, at the end of every flow run, a second per case (flows/factory.py: _stage_heartbeats).
        from flows.factory import without_heartbeats

        stack.enter_context(without_heartbeats())
        yield Project(root, urlparse(url).port or 0, client)
        if had_url is None:
            os.environ.pop("PREFECT_API_URL", None)


@dataclass
class Ctx:
    """What a case's setup gets: the project, its own tmp folder, monkeypatch, and cleanups to run after."""

    root: Path
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    cwd: Path | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)


Setup = Callable[[Ctx], tuple[list[str], str]]  # -> argv, the substring stderr must hold


def _snapshot(root: Path) -> dict[Path, bytes]:
    files = [p for p in (root / "params").rglob("*") if p.is_file()] + [root / "dvc.yaml"]
    return {p: p.read_bytes() for p in files}


def _restore(root: Path, saved: dict[Path, bytes]) -> None:
    for p in (root / "params").rglob("*"):
        if p.is_file() and p not in saved:
            p.unlink()
    for p, data in saved.items():
        if not p.is_file() or p.read_bytes() != data:
            p.write_bytes(data)


def _fingerprint(root: Path) -> dict[str, str]:
    files = sorted(p for p in (root / "data").rglob("*") if p.is_file()) + [root / "dvc.lock"]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _remove_new_outputs(root: Path, before: dict[str, str] | None) -> None:
    """A case that wrongly succeeded leaves outputs: remove the files under data/ it added (so later cases see
    the fixture's outputs); that it changed any is the case's failure already."""
    if before is None:
        return
    for path in sorted((root / "data").rglob("*"), reverse=True):
        if path.is_file() and str(path.relative_to(root)) not in before:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _running_runs(client) -> list[str]:
    from mlflow.entities import ViewType

    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not ids:
        return []
    return [r.info.run_id for r in client.search_runs(ids, "attributes.status = 'RUNNING'", run_view_type=ViewType.ALL)]


def _listen_sockets() -> dict[str, int]:
    """inode -> port of every TCP socket in LISTEN state (IPv4 and IPv6)."""
    sockets = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as table:
            for line in table.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A":
                    sockets[cols[9]] = int(cols[1].rsplit(":", 1)[1], 16)
    return sockets


def _tree() -> set[int]:
    """This process and its descendants."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    ours, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in ours and pid not in ours}
        ours |= new
        grew = bool(new)
    return ours


def _foreign_inodes(inodes: set[str]) -> set[str]:
    """Of `inodes`, the sockets that a process outside this test process's tree holds (another user of the
    machine): they are not this case's to answer for."""
    ours, foreign = _tree(), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    foreign.add(target[8:-1])
        except OSError:
            continue
    return foreign


def _leaked(inodes: set[str]) -> set[str]:
    """Of the sockets that appeared during a case, those still listening and held by no other process. A
    process of another test worker can be exiting while it is looked at (its fd table is already gone but its
    socket not yet closed), so a candidate must survive three looks half a second apart."""
    for attempt in range(3):
        inodes = (inodes & set(_listen_sockets())) - _foreign_inodes(inodes)
        if not inodes:
            break
        if attempt < 2:
            time.sleep(0.5)
    return inodes


def check_case(project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, setup: Setup) -> None:
    root = project.root
    ctx = Ctx(root, tmp_path, monkeypatch)
    saved = _snapshot(root)
    before: dict[str, str] | None = None
    try:
        monkeypatch.chdir(root)
        argv, expected = setup(ctx)
        monkeypatch.chdir(ctx.cwd or root)
        before, listening = _fingerprint(root), _listen_sockets()
        capsys.readouterr()
        status = main(argv)
        _, err = capsys.readouterr()
        after = _fingerprint(root)
        new_sockets = {i: p for i, p in _listen_sockets().items() if i not in listening and p != project.prefect_port}
        left_running = _running_runs(project.client)
    finally:
        _restore(root, saved)
        _remove_new_outputs(root, before)
        for cleanup in reversed(ctx.cleanups):
            cleanup()
    # First what holds whatever else stderr carries (a case marked xfail for extra stderr lines must still
    # meet these: its xfail only accepts NotOneLine), then the one-line contract.
    assert status == 2, f"exit status {status}, stderr:\n{err[-3000:]}"
    lines = err.splitlines()
    last = lines[-1] if lines else ""
    assert last.startswith(f"kiln {argv[0]}: error: "), f"last stderr line: {last!r}"
    assert expected in last, f"{expected!r} not in {last!r}"
    assert after == before, "outputs or dvc.lock changed"
    assert not left_running, f"MLflow runs left RUNNING: {left_running}"
    leaked = _leaked(set(new_sockets))
    assert not leaked, f"new listening ports left behind: {sorted(new_sockets[i] for i in leaked)}"
    # Prefect's INFO progress lines of the flow run ("12:00:00.000 | INFO    | Flow run ...") may precede the
    # error; anything else (a traceback, a WARNING or ERROR record, a second message) breaks the contract.
    others = [line for line in lines[:-1] if not PREFECT_INFO.match(line)]
    if "Traceback" in err or others or not err.endswith("\n"):
        raise NotOneLine(f"stderr holds more than the error line (traceback: {'Traceback' in err}):\n{err[-2000:]}")


PREFECT_INFO = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| INFO +\| (Flow run|Task run|prefect) ")


class NotOneLine(AssertionError):
    """stderr holds more than the one error line (log lines, a traceback)."""


CASES: dict[str, list] = {"params": [], "corpus": [], "images": [], "coco": [], "cli": []}


def case(category: str, name: str, xfail: str | None = None, raises: type[BaseException] | None = None):
    """Register a setup as a case of `category`; `xfail`: what the code does today instead (by default the
    case must still fail only on the one-line contract, `NotOneLine`)."""

    def register(setup: Setup) -> Setup:
        marks = [pytest.mark.xfail(strict=True, raises=raises or NotOneLine, reason=xfail)] if xfail else []
        CASES[category].append(pytest.param(setup, id=name, marks=marks))
        return setup

    return register


# ------------------------------------------------------------------------------------ params edits


def edit_key(root: Path, file: str, section: str, key: str, raw: str) -> None:
    """Set `section.key` to the raw YAML text `raw` (a text edit: NaN, tags and typos as a user types them)."""
    path = root / "params" / file
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(next(line for line in lines if line.split("#")[0].rstrip() == f"{section}:"))
    for i in range(start + 1, len(lines)):
        if lines[i].startswith(f"  {key}:"):
            lines[i] = f"  {key}: {raw}"
            break
    else:
        raise AssertionError(f"{file}: {section}.{key} not found")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def drop_key(root: Path, file: str, section: str, key: str) -> None:
    path = root / "params" / file
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(next(line for line in lines if line.split("#")[0].rstrip() == f"{section}:"))
    i = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(f"  {key}:"))
    del lines[i]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def add_key(root: Path, file: str, section: str, key: str, raw: str) -> None:
    path = root / "params" / file
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(next(line for line in lines if line.split("#")[0].rstrip() == f"{section}:"))
    lines.insert(start + 1, f"  {key}: {raw}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def params_case(name: str, argv: list[str], edit: Callable[[Path], None], expected: str, xfail: str | None = None):
    xfail = xfail or None

    def setup(ctx: Ctx) -> tuple[list[str], str]:
        edit(ctx.root)
        return argv, expected

    case("params", name, xfail)(setup)


STAGE_NGRAM, DRY_RUN, STATUS = ["stage", "ngram"], ["run", "--dry-run"], ["status"]
BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)

params_case(
    "unknown-key",
    STAGE_NGRAM,
    lambda r: add_key(r, "lm.yaml", "ngram", "ordr", "3"),
    "lm.yaml: ngram.ordr: unknown key",
)
params_case(
    "missing-key", STAGE_NGRAM, lambda r: drop_key(r, "lm.yaml", "ngram", "order"), "lm.yaml: ngram.order: missing key"
)
params_case(
    "str-for-int",
    STAGE_NGRAM,
    lambda r: edit_key(r, "lm.yaml", "ngram", "order", '"three"'),
    "lm.yaml: ngram.order: expected int, got str",
)
params_case(
    "bool-for-int",
    STAGE_NGRAM,
    lambda r: edit_key(r, "lm.yaml", "ngram", "order", "true"),
    "lm.yaml: ngram.order: expected int, got bool",
)
params_case(
    "list-for-float",
    DRY_RUN,
    lambda r: edit_key(r, "lm.yaml", "lm_train", "lr", "[0.1, 0.2]"),
    "lm.yaml: lm_train.lr: expected float, got list",
)
params_case(
    "str-for-float",
    ["stage", "corpus"],
    lambda r: edit_key(r, "data.yaml", "corpus", "val_fraction", '"0.1"'),
    "data.yaml: corpus.val_fraction: expected float, got str",
)
for _name, _raw in (("nan", ".nan"), ("inf", ".inf"), ("minus-inf", "-.inf"), ("1e400", "1e400")):
    params_case(
        f"{_name}-float",
        DRY_RUN,
        lambda r, raw=_raw: edit_key(r, "lm.yaml", "lm_train", "lr", raw),
        "lm.yaml: lm_train.lr: must be a finite number",
    )
params_case(
    "nan-in-list",
    STAGE_NGRAM,
    lambda r: edit_key(r, "lm.yaml", "ngram", "discount_fallback", "[0.5, .nan, 1.5]"),
    "lm.yaml: ngram.discount_fallback[1]: must be a finite number",
)
params_case(
    "unknown-section",
    DRY_RUN,
    lambda r: b.write(r / "params" / "lm.yaml", (r / "params" / "lm.yaml").read_text() + "\nngramm:\n  order: 3\n"),
    "lm.yaml: ngramm: no stage spec reads this section",
)
params_case(
    "section-in-two-files",
    STAGE_NGRAM,
    lambda r: b.write(
        r / "params" / "data.yaml",
        (r / "params" / "data.yaml").read_text() + "\nngram:\n  order: 3\n  discount_fallback: [0.5, 1.0, 1.5]\n",
    ),
    "ngram: section also defined in",
    xfail="",
)
params_case(
    "data-derived-field-set",
    DRY_RUN,
    lambda r: add_key(r, "lm.yaml", "lstm", "vocab_size", "100"),
    "lm.yaml: lstm.vocab_size: is set from the data; remove it from params",
)
params_case(
    "literal-out-of-choices",
    DRY_RUN,
    lambda r: edit_key(r, "lm.yaml", "lm_train", "precision", "fp13"),
    "lm.yaml: lm_train.precision: must be one of",
)
params_case(
    "source-out-of-choices",
    ["stage", "corpus"],
    lambda r: edit_key(r, "data.yaml", "corpus", "source", "web"),
    "data.yaml: corpus.source: must be one of",
)
params_case(
    "constraint-order-0",
    STAGE_NGRAM,
    lambda r: edit_key(r, "lm.yaml", "ngram", "order", "0"),
    "lm.yaml: ngram: ngram.order must be an integer >= 1, got 0",
)
params_case(
    "constraint-fraction",
    ["stage", "corpus"],
    lambda r: edit_key(r, "data.yaml", "corpus", "val_fraction", "0.7"),
    "data.yaml: corpus: val_fraction must be in (0, 0.5), got 0.7",
)
params_case(
    "path-source-without-path",
    ["stage", "corpus"],
    lambda r: set_params(r, "data.yaml", "corpus", source="path", path=""),
    "data.yaml: corpus: path must name a file or folder",
)
params_case(
    "yaml-syntax-error",
    STATUS,
    lambda r: b.write(r / "params" / "lm.yaml", "ngram:\n  order: [3\n"),
    "lm.yaml: <file>: not valid YAML",
)
params_case(
    "duplicate-yaml-key",
    STATUS,
    lambda r: add_key(r, "lm.yaml", "ngram", "order", "4"),
    "lm.yaml: <file>: not valid YAML",
)
params_case(
    "python-object-tag",
    STATUS,
    lambda r: edit_key(r, "lm.yaml", "ngram", "order", "!!python/object/apply:os.system ['true']"),
    "lm.yaml: <file>: not valid YAML",
)
params_case(
    "billion-laughs",
    DRY_RUN,
    lambda r: b.write(r / "params" / "lm.yaml", BOMB),
    "lm.yaml: <file>: too many YAML alias expansions",
)
params_case(
    "file-over-1mib",
    STATUS,
    lambda r: b.write(r / "params" / "lm.yaml", (r / "params" / "lm.yaml").read_text() + "#" * (1 << 20) + "\n"),
    "lm.yaml: <file>: params file too large",
)
params_case(
    "not-utf8",
    STATUS,
    lambda r: b.write(r / "params" / "data.yaml", b"corpus:\n  path: \xff\xfe\n"),
    "data.yaml: <file>: not valid YAML: not UTF-8 text (invalid start byte at byte 16)",
)
params_case(
    "not-a-mapping",
    ["stage", "corpus"],
    lambda r: b.write(r / "params" / "data.yaml", "- corpus\n- path\n"),
    "data.yaml: <file>: expected a mapping of sections",
    xfail="",
)
params_case(
    "params-file-removed",
    DRY_RUN,
    lambda r: (r / "params" / "lm.yaml").unlink(),
    "a stage spec reads this section but no params file has it",
)
params_case(
    "unknown-profile", ["profile", "huge"], lambda r: None, "profiles/huge.yaml: <file>: no profile 'huge' (known: "
)
params_case(
    "profile-not-a-mapping",
    ["profile", "broken"],
    lambda r: b.write(r / "params" / "profiles" / "broken.yaml", "- data.yaml\n"),
    "profiles/broken.yaml: <file>: expected a mapping file -> section -> key -> value",
)
params_case(
    "profile-names-missing-file",
    ["profile", "broken"],
    lambda r: b.write(r / "params" / "profiles" / "broken.yaml", "nosuch.yaml:\n  corpus:\n    max_documents: 3\n"),
    "profiles/broken.yaml: nosuch.yaml: names a params file that does not exist",
)
params_case(
    "runtime-device-choice",
    ["stage", "corpus"],
    lambda r: edit_key(r, "runtime.yaml", "runtime", "device", "tpu"),
    "runtime.yaml: runtime.device: must be one of",
    xfail="",
)


@pytest.mark.parametrize("setup", CASES["params"])
def test_bad_params(project, tmp_path, monkeypatch, capsys, setup):
    check_case(project, tmp_path, monkeypatch, capsys, setup)


# ------------------------------------------------------------------------------------ corpus


def corpus_case(name: str, make: Callable[[Path], tuple[Path, str]], xfail: str | None = None):
    """`make(tmp)` writes the user's text and returns (corpus.path, the substring the error names)."""

    def setup(ctx: Ctx) -> tuple[list[str], str]:
        path, expected = make(ctx.tmp)
        set_params(ctx.root, "data.yaml", "corpus", source="path", path=str(path))
        return ["stage", "corpus"], expected

    case("corpus", name, xfail)(setup)


def _missing(tmp: Path) -> tuple[Path, str]:
    return tmp / "nosuch", f"{tmp / 'nosuch'}: corpus.path names no file or folder"


def _empty_folder(tmp: Path) -> tuple[Path, str]:
    (tmp / "text").mkdir()
    return tmp / "text", f"{tmp / 'text'}: no .txt files in this folder"


def _no_txt(tmp: Path) -> tuple[Path, str]:
    b.write(tmp / "text" / "notes.md", "Some words here.\n")
    b.write(tmp / "text" / "readme", "More words.\n")
    return tmp / "text", f"{tmp / 'text'}: no .txt files in this folder"


def _empty_file(tmp: Path) -> tuple[Path, str]:
    return b.write(tmp / "book.txt", ""), f"{tmp / 'book.txt'}: the corpus is empty"


def _whitespace(tmp: Path) -> tuple[Path, str]:
    return b.write(tmp / "book.txt", "  \n\n\t\n   \n\n"), f"{tmp / 'book.txt'}: the corpus is empty"


def _not_utf8(tmp: Path) -> tuple[Path, str]:
    b.write(tmp / "text" / "a.txt", "The first file is fine.\n")
    b.write(tmp / "text" / "b.txt", b"Line one.\nCaf\xe9 au lait.\n")
    return tmp / "text", f"{tmp / 'text' / 'b.txt'}: not UTF-8 (byte 13, line 2)"


def _binary(tmp: Path) -> tuple[Path, str]:
    b.write(tmp / "image.txt", b.png_bytes())
    return tmp / "image.txt", f"{tmp / 'image.txt'}: not UTF-8 (byte 0, line 1)"


def _utf16(tmp: Path) -> tuple[Path, str]:
    b.write(tmp / "book.txt", "Hello world.\n\nAnother paragraph.\n".encode("utf-16"))
    return tmp / "book.txt", f"{tmp / 'book.txt'}: not UTF-8 (byte 0, line 1)"


def _one_paragraph(tmp: Path) -> tuple[Path, str]:
    b.write(tmp / "book.txt", "Only one paragraph. It has two sentences and no blank line.\n")
    return tmp / "book.txt", f"{tmp / 'book.txt'}: the "  # test or val: whichever split the shuffle left empty


def _all_duplicates(tmp: Path) -> tuple[Path, str]:
    b.write(tmp / "book.txt", "\n\n".join(["The same sentence again."] * 40) + "\n")
    return tmp / "book.txt", "split is empty once sentences that occur in an earlier split are removed"


def _symlink_loop(tmp: Path) -> tuple[Path, str]:
    os.symlink(tmp / "loop", tmp / "loop")
    return tmp / "loop", f"{tmp / 'loop'}: corpus.path names no file or folder"


for _make in (
    _missing,
    _empty_folder,
    _no_txt,
    _empty_file,
    _whitespace,
    _not_utf8,
    _binary,
    _utf16,
    _one_paragraph,
    _all_duplicates,
    _symlink_loop,
):
    corpus_case(_make.__name__.strip("_").replace("_", "-"), _make)


@pytest.mark.parametrize("setup", CASES["corpus"])
def test_bad_corpus(project, tmp_path, monkeypatch, capsys, setup):
    check_case(project, tmp_path, monkeypatch, capsys, setup)


# ------------------------------------------------------------------------------------ images


def images_case(
    name: str, source: str, make: Callable[[Path], tuple[Path, str]], size: int = 16, xfail=None, raises=None
):
    def setup(ctx: Ctx) -> tuple[list[str], str]:
        path, expected = make(ctx.tmp)
        set_params(ctx.root, "images.yaml", "images", source=source, path=str(path), size=size)
        return ["stage", "images"], expected

    case("images", name, xfail, raises)(setup)


def _folder_with(tmp: Path, name: str, data: bytes) -> Path:
    folder = b.image_folder(tmp / "imgs")
    b.write(folder / "b" / name, data)
    return folder / "b" / name


def _img_missing(tmp):
    return tmp / "nosuch", f"{tmp / 'nosuch'}: no such folder"


def _img_empty(tmp):
    (tmp / "imgs").mkdir()
    return tmp / "imgs", f"{tmp / 'imgs'}: expected one subfolder of images per class, found none"


def _img_no_images(tmp):
    b.write(tmp / "imgs" / "a" / "notes.txt", "no images\n")
    b.write(tmp / "imgs" / "b" / "x.csv", "1,2\n")
    return tmp / "imgs", f"{tmp / 'imgs'}: no image files"


def _img_class_without_images(tmp):
    b.image_folder(tmp / "imgs", classes=("a", "b"))
    (tmp / "imgs" / "c").mkdir()
    return tmp / "imgs", "imgs/c: class folder without image files"


def _img_class_too_small(tmp):
    b.image_folder(tmp / "imgs", classes=("a",))
    b.write(tmp / "imgs" / "b" / "0.png", b.png_bytes())
    return tmp / "imgs", "class 1 has 1 image(s)"


def _img_truncated(tmp):
    bad = _folder_with(tmp, "cut.png", b.truncated_png())
    return tmp / "imgs", f"{bad}: not a readable image (OSError"


def _img_not_image(tmp):
    bad = _folder_with(tmp, "fake.png", b"this is not a PNG file\n")
    return tmp / "imgs", f"{bad}: not a readable image (not an image format Pillow knows)"


def _img_bomb(tmp):
    bad = _folder_with(tmp, "bomb.png", b.bomb_png())
    return tmp / "imgs", f"{bad}: not a readable image (too many pixels"


def _img_mixed_sizes(tmp):
    b.image_folder(tmp / "imgs")
    b.write(tmp / "imgs" / "b" / "wide.png", b.png_bytes(12, 20))
    return tmp / "imgs", f"{tmp / 'imgs' / 'b' / 'wide.png'}: image is 20x12 but"


def _img_symlink_out(tmp):
    b.image_folder(tmp / "imgs")
    outside = b.write(tmp / "secret" / "x.png", b.png_bytes())
    os.symlink(outside, tmp / "imgs" / "a" / "link.png")
    return tmp / "imgs", f"{tmp / 'imgs' / 'a' / 'link.png'}: a symbolic link that leads outside"


def _img_class_symlink_out(tmp):
    b.image_folder(tmp / "imgs")
    b.image_folder(tmp / "elsewhere", classes=("c",))
    os.symlink(tmp / "elsewhere" / "c", tmp / "imgs" / "c")
    return tmp / "imgs", f"{tmp / 'imgs' / 'c'}: a symbolic link that leads outside"


images_case(
    "folder-class-without-images",
    "folder",
    _img_class_without_images,
)
for _make, _size in (
    (_img_missing, 16),
    (_img_empty, 16),
    (_img_no_images, 16),
    (_img_class_too_small, 16),
    (_img_truncated, 16),
    (_img_not_image, 16),
    (_img_bomb, 16),
    (_img_mixed_sizes, 0),
    (_img_symlink_out, 16),
    (_img_class_symlink_out, 16),
):
    images_case("folder-" + _make.__name__[5:].replace("_", "-"), "folder", _make, size=_size)


def _pq(tmp: Path, columns: dict, schema=None) -> Path:
    return b.parquet_file(tmp / "images.parquet", columns, schema)


def _pq_missing(tmp):
    return tmp / "nosuch.parquet", f"{tmp / 'nosuch.parquet'}: no such file"


def _pq_not_parquet(tmp):
    b.write(tmp / "images.parquet", "image,label\n")
    return tmp / "images.parquet", f"{tmp / 'images.parquet'}: not a readable Parquet file"


def _pq_no_image(tmp):
    path = _pq(tmp, {"picture": [b.png_bytes()], "label": [0]})
    return path, f"{path}: missing column 'image'"


def _pq_no_label(tmp):
    path = _pq(tmp, {"image": [b.png_bytes()]})
    return path, f"{path}: missing column 'label'"


def _pq_int_image(tmp):
    path = _pq(tmp, {"image": [1, 2, 3], "label": [0, 1, 0]})
    return path, f"{path}: column 'image' holds int64"


def _pq_zero_rows(tmp):
    import pyarrow as pa

    schema = pa.schema([("image", pa.binary()), ("label", pa.int64())])
    path = _pq(tmp, {"image": [], "label": []}, schema)
    return path, f"{path}: no rows"


def _pq_path_only(tmp):
    import pyarrow as pa

    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", kind), ("label", pa.int64())])
    path = _pq(tmp, {"image": [{"bytes": None, "path": "/etc/passwd"}], "label": [0]}, schema)
    return path, f"{path}: row 0: column 'image' gives a path but no bytes"


def _pq_null_label(tmp):
    columns = b.good_parquet_columns()
    columns["label"][3] = None
    path = _pq(tmp, columns)
    return path, f"{path}: row 3: missing label"


def _pq_bad_bytes(tmp):
    columns = b.good_parquet_columns()
    columns["image"][2] = b"not an image"
    path = _pq(tmp, columns)
    return path, f"{path}: row 2: not a readable image (not an image format Pillow knows)"


def _pq_bomb(tmp):
    columns = b.good_parquet_columns()
    columns["image"][5] = b.bomb_png()
    path = _pq(tmp, columns)
    return path, f"{path}: row 5: not a readable image (too many pixels"


for _make in (
    _pq_missing,
    _pq_not_parquet,
    _pq_no_image,
    _pq_no_label,
    _pq_int_image,
    _pq_zero_rows,
    _pq_path_only,
    _pq_null_label,
    _pq_bad_bytes,
    _pq_bomb,
):
    images_case("parquet-" + _make.__name__[4:].replace("_", "-"), "parquet", _make)


@pytest.mark.parametrize("setup", CASES["images"])
def test_bad_images(project, tmp_path, monkeypatch, capsys, setup):
    check_case(project, tmp_path, monkeypatch, capsys, setup)


# ------------------------------------------------------------------------------------ COCO


def coco_case(name: str, spoil: Callable[[Path, Path, Path, dict], str], xfail: str | None = None):
    """`spoil(tmp, images_dir, annotations, data)` breaks a valid dataset (editing `data`, which is then
    written unless the annotations file exists already) and returns the substring the error names."""

    def setup(ctx: Ctx) -> tuple[list[str], str]:
        images, annotations, data = b.coco_dataset(ctx.tmp / "coco")
        expected = spoil(ctx.tmp, images, annotations, data)
        if not annotations.exists():
            b.write_coco(annotations, data)
        paths = {"coco_images": str(images), "coco_annotations": str(annotations)}
        set_params(ctx.root, "detection.yaml", "scenes", source="coco", **paths)
        return ["stage", "scenes"], expected.replace("{ann}", str(annotations))

    case("coco", name, xfail)(setup)


IMAGE0 = "{ann}: images[0] (id 1)"


def _dotdot(tmp, images, ann, data):
    b.write(tmp / "coco" / "outside.png", b.png_bytes(30, 40))
    data["images"][0]["file_name"] = "../outside.png"
    return f"{IMAGE0}: file_name '../outside.png' leads outside the images folder"


def _absolute(tmp, images, ann, data):
    target = b.write(tmp / "abs.png", b.png_bytes(30, 40))
    data["images"][0]["file_name"] = str(target)
    return f"{IMAGE0}: file_name '{target}' leads outside the images folder"


def _symlink_out(tmp, images, ann, data):
    target = b.write(tmp / "elsewhere.png", b.png_bytes(30, 40))
    (images / "001.png").unlink()
    os.symlink(target, images / "001.png")
    return f"{IMAGE0}: file_name '001.png' leads outside the images folder"


def _missing_image(tmp, images, ann, data):
    (images / "003.png").unlink()
    return f"{{ann}}: images[2] (id 3): image file {images / '003.png'} is missing"


def _truncated(tmp, images, ann, data):
    b.write(images / "002.png", b.truncated_png(30, 40))
    return f"{{ann}}: images[1] (id 2): image file {images / '002.png'} is not a readable image (OSError"


def _bomb(tmp, images, ann, data):
    b.write(images / "004.png", b.bomb_png())
    data["images"][3].update(width=20000, height=20000)
    return "{ann}: images[3] (id 4): image file " + f"{images / '004.png'} is not a readable image (too many pixels"


def _no_annotations(tmp, images, ann, data):
    data["annotations"] = []
    return "{ann}: annotations: no annotations"


def _negative_width(tmp, images, ann, data):
    data["annotations"][2]["bbox"] = [5.0, 5.0, -3.0, 4.0]
    return "{ann}: annotations[2] (id 103): bbox [5.0, 5.0, -3.0, 4.0] has non-positive width or height"


def _box_outside(tmp, images, ann, data):
    data["annotations"][0]["bbox"] = [35.0, 5.0, 10.0, 4.0]
    return "{ann}: annotations[0] (id 101): bbox [35.0, 5.0, 10.0, 4.0] lies outside its image 1 (40x30)"


def _nan_box(tmp, images, ann, data):
    b.write(ann, json.dumps(data).replace("[2.0, 3.0, 10.0, 8.0]", "[NaN, 3.0, 10.0, 8.0]", 1))
    return "{ann}: annotations[0] (id 101): bbox must be [x, y, width, height] numbers"


def _unknown_category(tmp, images, ann, data):
    data["annotations"][1]["category_id"] = 7
    return "{ann}: annotations[1] (id 102): category_id 7 is not a category id"


def _duplicate_image_ids(tmp, images, ann, data):
    data["images"][5]["id"] = 1
    return "{ann}: images[5] (id 1): duplicate id 1 (also images[0])"


def _list_id(tmp, images, ann, data):
    data["images"][0]["id"] = [1]
    return "{ann}: images[0] (id [1]): id must be an integer, got [1]"


def _missing_categories(tmp, images, ann, data):
    del data["categories"]
    return "{ann}: <file>: missing key 'categories'"


def _not_json(tmp, images, ann, data):
    b.write(ann, "{'images': []}")
    return "{ann}: not valid JSON"


def _deep_json(tmp, images, ann, data):
    b.write(ann, "[" * 200_000 + "]" * 200_000)
    return "{ann}: not valid JSON"


def _json_list(tmp, images, ann, data):
    b.write(ann, json.dumps([data]))
    return "{ann}: <file>: expected a JSON object, got list"


def _split_without_boxes(tmp, images, ann, data):
    data["annotations"] = data["annotations"][:1]
    return "split's"


def _too_few_images(tmp, images, ann, data):
    data["images"] = data["images"][:2]
    data["annotations"] = data["annotations"][:2]
    return "split is empty (2 images"


def _missing_annotations(tmp, images, ann, data):
    ann.mkdir()  # the path is there, a folder: `exists()` holds, so nothing is written over it
    return "{ann}: no such COCO annotations file"


def _images_not_folder(tmp, images, ann, data):
    shutil.rmtree(images)
    return f"{images}: coco_images names no folder"


for _spoil in (
    _dotdot,
    _absolute,
    _symlink_out,
    _missing_image,
    _truncated,
    _bomb,
    _no_annotations,
    _negative_width,
    _box_outside,
    _nan_box,
    _unknown_category,
    _duplicate_image_ids,
    _list_id,
    _missing_categories,
    _not_json,
    _deep_json,
    _json_list,
    _split_without_boxes,
    _too_few_images,
    _missing_annotations,
    _images_not_folder,
):
    coco_case(_spoil.__name__.strip("_").replace("_", "-"), _spoil)


@pytest.mark.parametrize("setup", CASES["coco"])
def test_bad_coco(project, tmp_path, monkeypatch, capsys, setup):
    check_case(project, tmp_path, monkeypatch, capsys, setup)


# ------------------------------------------------------------------------------------ CLI and artefacts


def cli_case(name: str, argv: list[str], expected: str, xfail: str | None = None):
    case("cli", name, xfail)(lambda ctx: (argv, expected))


cli_case("unknown-stage", ["stage", "ngarm"], "no stage 'ngarm'; did you mean 'ngram'?")
cli_case("unknown-foreach-item", ["stage", "lm@nosuch"], "no stage 'lm@nosuch'")
cli_case("unknown-target", ["run", "--target", "nosuch"], "no stage 'nosuch'")
cli_case("unknown-family", ["run", "--family", "vision"], "no family 'vision'")
cli_case("unknown-status-target", ["status", "--target", "corpos"], "no stage 'corpos'; did you mean 'corpus'?")
cli_case("score-unknown-model", ["score", "--model", "nosuch", "a sentence"], "no language model 'nosuch'")
cli_case("score-untrained-lstm", ["score", "--model", "lstm", "a sentence"], "lstm")


@case(
    "cli",
    "score-no-sentences",
    raises=AssertionError,
)
def _score_empty(ctx: Ctx):
    ctx.monkeypatch.setattr(sys, "stdin", io.StringIO("\n  \n"))
    return ["score"], "no sentences"


@case("cli", "score-stale-vocabulary")
def _score_stale(ctx: Ctx):
    """The corpus rebuilt from another source after the n-gram model was trained: its digest no longer fits."""
    saved = ctx.tmp / "saved-data"
    shutil.copytree(ctx.root / "data", saved, symlinks=True)

    def put_back() -> None:
        shutil.rmtree(ctx.root / "data")
        shutil.copytree(saved, ctx.root / "data", symlinks=True)

    ctx.cleanups.append(put_back)
    text = ctx.tmp / "other.txt"
    paragraphs = [f"Paragraph {i} speaks of river {i % 7} and stone {i % 5}. It ends here." for i in range(60)]
    b.write(text, "\n\n".join(paragraphs) + "\n")
    set_params(ctx.root, "data.yaml", "corpus", source="path", path=str(text), max_documents=0)
    assert main(["stage", "corpus"]) == 0
    return ["score", "the river"], "data/models/ngram/model.arpa was trained on another vocabulary"


@case("cli", "ngram-model-missing")
def _model_missing(ctx: Ctx):
    saved = ctx.tmp / "ngram"
    shutil.move(ctx.root / "data" / "models" / "ngram", saved)
    ctx.cleanups.append(lambda: shutil.move(saved, ctx.root / "data" / "models" / "ngram"))
    return ["score", "a sentence"], "model.arpa: no trained n-gram model"


@case("cli", "dvc-yaml-not-yaml")
def _bad_dvc_yaml(ctx: Ctx):
    b.write(ctx.root / "dvc.yaml", "stages: [corpus\n")
    return ["check"], "dvc.yaml"


@case("cli", "dvc-yaml-not-yaml-status")
def _bad_dvc_yaml_status(ctx: Ctx):
    b.write(ctx.root / "dvc.yaml", "stages: {corpus: [\n")
    return ["status"], "dvc.yaml"


def _read_only_data(ctx: Ctx, stage: str) -> tuple[list[str], str]:
    """data/ read-only (as root, which tests run as, chmod would not stop a write: the refusal is injected
    where the atomic writer creates its temporary output)."""
    import tempfile

    data = str(ctx.root / "data")
    for name in ("mkstemp", "mkdtemp"):
        real = getattr(tempfile, name)

        def refuse(*args, real=real, **kwargs):
            if str(kwargs.get("dir", "")).startswith(data):
                raise PermissionError(13, "Permission denied")
            return real(*args, **kwargs)

        ctx.monkeypatch.setattr(tempfile, name, refuse)
    return ["stage", stage], "cannot write"


case("cli", "read-only-data-corpus")(lambda ctx: _read_only_data(ctx, "corpus"))
case("cli", "read-only-data-scenes")(lambda ctx: _read_only_data(ctx, "scenes"))


@case("cli", "outside-a-project")
def _outside(ctx: Ctx):
    ctx.cwd = ctx.tmp
    return ["status"], "no dvc.yaml at or above"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@case("cli", "tracking-server-unreachable-env")
def _unreachable_env(ctx: Ctx):
    uri = f"http://127.0.0.1:{_closed_port()}"
    ctx.monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return ["stage", "corpus"], uri


@case("cli", "tracking-server-unreachable-params")
def _unreachable_params(ctx: Ctx):
    uri = f"http://127.0.0.1:{_closed_port()}"
    edit_key(ctx.root, "runtime.yaml", "runtime", "mlflow_tracking_uri", f'"{uri}"')
    return ["run", "--target", "ngram", "--force"], uri


@pytest.mark.parametrize("setup", CASES["cli"])
def test_bad_cli_use(project, tmp_path, monkeypatch, capsys, setup):
    check_case(project, tmp_path, monkeypatch, capsys, setup)


def test_enough_cases():
    counts = {category: len(cases) for category, cases in CASES.items()}
    assert sum(counts.values()) >= 70, counts
    assert counts["params"] >= 20 and counts["corpus"] >= 10 and counts["images"] >= 15, counts
    assert counts["coco"] >= 15 and counts["cli"] >= 10, counts
