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
