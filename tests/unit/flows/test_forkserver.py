"""flows/forkserver.py without its imports: a server that cannot start reports it (and `kiln run` then starts
its stages as processes); only `kiln` and `dvc` commands are forked. The forked commands themselves are held
to their own processes' output in tests/pipeline/test_zygote.py and test_parallel.py."""

from __future__ import annotations

import os

import pytest

from flows.forkserver import ForkServer


def test_a_server_that_cannot_start_is_not_ready_and_leaves_nothing(tmp_path):
    # Python itself fails to start without its standard library.
    server = ForkServer({"PATH": os.environ["PATH"], "PYTHONHOME": str(tmp_path / "none")}, tmp_path)
    assert not server.ready()
    assert server.process.returncode not in (None, 0)
    assert not os.path.exists(server.home)
    assert not server.ready()  # asked again: the same answer, no second start


def test_only_kiln_and_dvc_commands_are_forked(tmp_path):
    server = ForkServer(dict(os.environ), tmp_path)
    with pytest.raises(ValueError, match="not 'sh'"):
        server.submit(["sh", "-c", "true"], tmp_path, {}, (0, 1, 2))
    assert server.process is None  # refused before anything started
    server.close()
    assert not os.path.exists(server.home)
