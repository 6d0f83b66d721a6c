import os
from pathlib import Path

import pytest

from flows.cli import QUIET_ENV

for key, value in QUIET_ENV.items():
    os.environ.setdefault(key, value)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests track into their own temp stores

REPO = Path(__file__).resolve().parents[1]


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
