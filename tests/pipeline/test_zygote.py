"""The tests' command zygote (tests/pipeline/zygote.py) answers as a process of its own would: same output,
same exit status, through `sh` and through the `kiln` shim that DVC's stage commands find."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.pipeline.helpers import ENV
from tests.pipeline.zygote import Zygote

pytestmark = pytest.mark.pipeline

COMMANDS = (
    ["kiln", "stage", "no_such_stage"],  # an input error: one line, exit 2
    ["kiln", "status", "--target", "corpus"],  # a command that reads the project
)


@pytest.fixture(scope="module")
def zygote():
    return Zygote(ENV)


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: argv[1])
def test_a_forked_command_prints_and_exits_as_its_own_process(zygote, repo_root, argv):
    own = subprocess.run(argv, cwd=repo_root, env=ENV, capture_output=True, text=True, timeout=300)
    forked = zygote.capture(argv, repo_root, ENV, None, timeout=300)
    assert (forked.returncode, forked.stdout, forked.stderr) == (own.returncode, own.stdout, own.stderr)


def test_the_shim_forwards_arguments_streams_and_exit_status(zygote, repo_root):
    shim = os.path.join(zygote.bin, "kiln")
    done = subprocess.run([shim, *COMMANDS[0][1:]], cwd=repo_root, env=ENV, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("kiln stage: error:") and "no_such_stage" in done.stderr
