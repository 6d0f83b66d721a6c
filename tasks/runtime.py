"""Where a stage runs: the repo root, its params, the seeded RNGs. One helper for each."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from tasks.params import load_section

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


@dataclass(frozen=True)
class RuntimeConfig:
    """`params/runtime.yaml: runtime`: how stages run, not what they compute (no stage depends on it,
    except through `seed`)."""

    profile: str  # the profile last applied with `kiln profile`; a label, set by that command
    seed: int  # the seed of every stochastic stage (one seeded-RNG helper reads it)
    device: Literal["auto", "cpu", "cuda", "mps"]
    threads: int  # torch intra-op threads; 0: the cores free for this stage (tasks/threads.py)
    mlflow_tracking_uri: str  # empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db at the repo root
    stage_retries: int  # retries of a failed stage inside `kiln run`
    retry_delay_s: float
    max_parallel: int  # stages `kiln run` runs at once (independent ones only); 1: one after another
    task_runner: Literal["thread", "dask"]  # what runs the stage tasks of `kiln run` in parallel
    dask_address: str  # with task_runner dask: a scheduler address; empty: a local cluster of max_parallel workers

    def __post_init__(self) -> None:
        if self.max_parallel < 1:
            raise ValueError(f"max_parallel must be >= 1, got {self.max_parallel}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.stage_retries < 0:
            raise ValueError(f"stage_retries must be >= 0, got {self.stage_retries}")
        if self.retry_delay_s < 0:
            raise ValueError(f"retry_delay_s must be >= 0, got {self.retry_delay_s}")

    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def repo_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: the working directory) holding dvc.yaml."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise FileNotFoundError(f"no dvc.yaml at or above {here}: run kiln inside a Kiln project")


@dataclass(frozen=True)
class StageEnv:
    root: Path
    runtime: RuntimeConfig

    @property
    def params_dir(self) -> Path:
        return self.root / "params"

    def path(self, relative: str) -> Path:
        return self.root / relative


def load_runtime(params_dir: Path) -> RuntimeConfig:
    """`params/runtime.yaml: runtime`, strictly."""
    return load_section(params_dir, "runtime", RuntimeConfig)


def stage_env(root: Path | None = None) -> StageEnv:
    root = repo_root(root)
    return StageEnv(root, load_runtime(root / "params"))


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, numpy and (when loaded) torch; return a numpy Generator for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    import sys

    if "torch" in sys.modules:  # never import torch just to seed it: text stages do not need it
        sys.modules["torch"].manual_seed(seed)
    return np.random.default_rng(seed)
