"""Where a stage runs: the repo root, its params, the seeded RNGs. One helper for each."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.config import RuntimeConfig, load_section


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


def stage_env(root: Path | None = None) -> StageEnv:
    root = repo_root(root)
    return StageEnv(root, load_section(root / "params", "runtime"))


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, numpy and (when loaded) torch; return a numpy Generator for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    import sys

    if "torch" in sys.modules:  # never import torch just to seed it: text stages do not need it
        sys.modules["torch"].manual_seed(seed)
    return np.random.default_rng(seed)
