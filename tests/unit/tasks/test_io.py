"""The atomic writer: a failed write leaves neither a partial target nor a temporary behind."""

import pytest

from tasks.io import atomic_path, write_json


def test_file_is_replaced_only_on_success(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": 2, "half')
            raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_directory_is_swapped_whole(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "a.txt").write_text("old")
        (tmp / "stale.txt").write_text("old")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert (target / "a.txt").read_text() == "new"
    with pytest.raises(ValueError):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "a.txt").write_text("partial")
            raise ValueError("bad record")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_outputs_get_the_umask_modes_not_mkstemp_ones(tmp_path):
    import os
    import stat

    from tasks.io import atomic_path, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "folder", directory=True) as tmp:
            (tmp / "b.txt").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_an_unwritable_output_folder_is_an_input_error_naming_it(tmp_path, monkeypatch):
    import tempfile

    import pytest

    from tasks.errors import InputError
    from tasks.io import OutputNotWritable, write_text

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OutputNotWritable, match=r"data: cannot write a\.json here \(Permission denied\)"):
        write_text(tmp_path / "data" / "a.json", "{}")
    assert issubclass(OutputNotWritable, InputError)
    (tmp_path / "file").write_text("x")  # a file where the folder should be
    monkeypatch.undo()
    with pytest.raises(OutputNotWritable, match="file: cannot write b.json here"):
        write_text(tmp_path / "file" / "b.json", "{}")
