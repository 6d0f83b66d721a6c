import importlib
import os
import sys
from pathlib import Path

import pytest

from flows.cli import QUIET_ENV

for key, value in QUIET_ENV.items():
    os.environ.setdefault(key, value)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests track into their own temp stores

REPO = Path(__file__).resolve().parents[1]

from tests.pipeline import helpers  # noqa: E402

helpers.SHARE_PREFECT_API = True  # one Prefect API per test worker for the commands the tests start
helpers.FORK_COMMANDS = True  # their `kiln` and `dvc` commands fork from one pre-imported process


# The longest test files, longest first: seconds of test time per file in one `make test` run on 2 cores
# (a timing plugin's log, fixtures included). `make test` hands whole files to its workers in collection
# order (`--dist loadfile --no-loadscope-reorder`: xdist's default reorder puts the files with the most tests
# first, which left these to the end, one worker idling 50 s while the other finished one); the unit-test
# files after them even the two workers out at the end.
LONGEST_FIRST = (
    "tests/pipeline/test_text_pipeline.py",  # 219 s
    "tests/pipeline/test_image_pipeline.py",  # 126 s with controlnet, ldm_text and the flows (174 s as 4 files)
    "tests/pipeline/test_parallel.py",  # 140 s
    "tests/faults/test_bad_input.py",  # 123 s; its cases alone 98 -> 57 s without a heartbeat each
    "tests/pipeline/test_inference.py",  # 115 s
    "tests/pipeline/test_faults.py",  # 113 s
    "tests/ops/test_mlflow_ui.py",  # 100 s; its detection run also serves the branch's tests (71 s as a file)
    "tests/pipeline/test_user_data.py",  # 92 s
    "tests/pipeline/test_experiments.py",  # 86 s
    "tests/pipeline/test_ops.py",  # 40 s
    "tests/pipeline/test_add_stage.py",  # 35 s
    "tests/ops/test_schedule.py",  # 33 s
    "tests/unit/models/detection/test_detectors.py",  # 32 s
    "tests/pipeline/test_torchrun_stage.py",  # 27 s
    "tests/pipeline/test_audit_stages.py",  # 24 s
    "tests/unit/flows/test_prefect_api.py",  # 15 s
    "tests/ops/test_mlflow_server.py",  # 13 s
    "tests/unit/flows/test_check.py",  # 12 s
)


def pytest_collection_modifyitems(session, config, items) -> None:
    """Collect LONGEST_FIRST's files before the others; the order within each file is kept (its tests share
    state in that order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item) -> int:
        return rank.get(Path(str(item.fspath)).relative_to(REPO).as_posix(), len(rank))

    items[:] = sorted(items, key=key)  # stable


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _no_mlflow_store_left_set():
    """Unset MLflow's process-wide tracking URI after each test. A stage run in a test worker's own process
    (`tasks/tracking.py: stage_run`, as a stage process needs) sets it, and a set URI outranks
    MLFLOW_TRACKING_URI in every later test of that worker: test_inference once registered a model into another
    module's store that way, depending on which files shared its worker."""
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)  # a no-op when none is set; else also drops the variable it exported


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
