"""`kiln run`'s commits read dvc.lock with ruamel.yaml's safe parser in C (flows/dvc_graph.py:
`lock_file_read_in_c`), where DVC uses its round-trip parser: the lock file must come out byte for byte as
DVC writes it, and dvc.yaml keep its comments."""

from __future__ import annotations

import io
from pathlib import Path

import dvc.utils.serialize._yaml as yaml_io
from dvc.repo import Repo
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from flows.dvc_graph import lock_file_read_in_c
from flows.pipeline import _commit

REPO = Path(__file__).resolve().parents[3]

DVC_YAML = """\
# a comment of the user's, which a commit must keep
stages:
  first:  # writes a.txt
    cmd: python -c "open('a.txt', 'w').write('a')"
    params:
      - lr
      - label
    outs:
      - a.txt
  second:
    cmd: python -c "open('b.txt', 'w').write(open('a.txt').read() * 2)"
    deps:
      - a.txt
    params:
      - steps
    outs:
      - b.txt
"""
PARAMS = "lr: 1.0e-05\nlabel: '2.0'\nsteps: [10, 25, 50]\n"


def dvc_dump(data) -> str:
    out = io.StringIO()
    yaml_io._dump(data, out)
    return out.getvalue()


def test_dvcs_dumper_writes_the_committed_lock_file_back_from_either_parse():
    text = (REPO / "dvc.lock").read_text(encoding="utf-8")
    assert dvc_dump(YAML(typ="safe").load(text)) == text
    assert dvc_dump(YAML(typ="rt").load(text)) == text


def test_only_dvc_lock_changes_parser():
    with lock_file_read_in_c():
        assert type(yaml_io.parse_yaml_for_update("a: 1\n", "x/dvc.lock")) is dict
        assert isinstance(yaml_io.parse_yaml_for_update("a: 1\n", "x/dvc.yaml"), CommentedMap)
    assert isinstance(yaml_io.parse_yaml_for_update("a: 1\n", "x/dvc.lock"), CommentedMap)


def project(root: Path) -> Path:
    root.mkdir()
    Repo.init(str(root), no_scm=True).close()
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text(PARAMS)
    (root / "a.txt").write_text("a")
    (root / "b.txt").write_text("aa")
    return root


def commit(root: Path, name: str, monkeypatch, ours: bool) -> None:
    monkeypatch.chdir(root)  # DVC finds a stage's dvc.yaml from the working directory, as in `kiln run`
    if ours:
        _commit(root, name)
    else:
        with Repo(str(root)) as repo:
            repo.commit(name, force=True)


def test_kilns_commits_write_the_lock_file_dvcs_own_commits_write(tmp_path, monkeypatch):
    ours, dvcs = project(tmp_path / "ours"), project(tmp_path / "dvcs")
    for name in ("first", "second"):
        commit(ours, name, monkeypatch, ours=True)
        commit(dvcs, name, monkeypatch, ours=False)
        assert (ours / "dvc.lock").read_bytes() == (dvcs / "dvc.lock").read_bytes()
    # A rewrite of an existing entry, as a stage's rerun makes: same bytes again, in the same place.
    for root in (ours, dvcs):
        (root / "params.yaml").write_text(PARAMS.replace("1.0e-05", "0.0003"))
    commit(ours, "first", monkeypatch, ours=True)
    commit(dvcs, "first", monkeypatch, ours=False)
    lock = (ours / "dvc.lock").read_text()
    assert lock == (dvcs / "dvc.lock").read_text()
    assert lock.index("first:") < lock.index("second:") and "0.0003" in lock
    assert (ours / "dvc.yaml").read_text() == DVC_YAML
