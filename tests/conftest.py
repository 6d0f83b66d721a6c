import importlib
import os
from pathlib import Path

import pytest

from flows.cli import QUIET_ENV

for key, value in QUIET_ENV.items():
    os.environ.setdefault(key, value)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests track into their own temp stores

REPO = Path(__file__).resolve().parents[1]

from tests.pipeline import helpers  # noqa: E402

helpers.SHARE_PREFECT_API = True  # one Prefect API per test worker for the commands the tests start


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for modules of many tiny tensor ops: a second thread only adds OpenMP barrier
    waits, which cost seconds a test when another process keeps the other core busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(module: str):
    """Import the reference implementation `module` that a test compares against (kenlm, pycocotools,
    torchmetrics ...). Missing, it fails the test under CI (`CI=true`): a reference test that skips there
    checks nothing. Elsewhere it skips, saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"reference package {module} is missing; CI must install it (pip install -e '.[dev]')")
        pytest.skip(f"reference package {module} is missing ({err}); pip install -e '.[dev]' to run this test")
