"""The frame every stage flow runs in: repo root, strict params, seeds, threads, the MLflow run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import load_section
from tasks.params import as_flat_dict
from tasks.runtime import StageEnv, seed_everything, stage_env
from tasks.tracking import StageRun, stage_run


@dataclass(frozen=True)
class OpenStage:
    env: StageEnv
    configs: dict[str, Any]  # section name -> config dataclass
    run: StageRun


class OtherRank:
    """The MLflow run as a torchrun rank other than 0 sees it: rank 0 logs for the whole job."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def torchrun_rank() -> int:
    """This process's rank in a torchrun job (0 outside one)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


@contextmanager
def open_stage(stage: str, family: str, sections: list[str],
               derive: Callable[[Path], dict[str, dict[str, Any]]] | None = None) -> Iterator[OpenStage]:
    """Load the stage's params sections (strictly), seed, and open its MLflow run with those params.

    `derive(root)` gives the data-derived fields of sections that have them (`{"mamba": {"vocab_size": V}}`).
    """
    env = stage_env()
    derived = derive(env.root) if derive else {}
    configs = {name: load_section(env.params_dir, name, **derived.get(name, {})) for name in sections}
    seed_everything(env.runtime.seed)
    if env.runtime.threads:
        import torch

        torch.set_num_threads(env.runtime.threads)
    params = {k: v for name, cfg in configs.items() for k, v in as_flat_dict(cfg, f"{name}.").items()}
    params["runtime.seed"] = env.runtime.seed
    if torchrun_rank():  # `torchrun ... kiln stage NAME`: one MLflow run for the job, rank 0's
        yield OpenStage(env, configs, OtherRank())  # type: ignore[arg-type]
        return
    with stage_run(stage, family, env.root, env.runtime.tracking_uri(), env.runtime.profile, params) as run:
        start = time.perf_counter()
        yield OpenStage(env, configs, run)
        # The stage's own work, to tell it apart from orchestration (benchmarks/bench_orchestration.py).
        run.log_metrics({"stage_seconds": time.perf_counter() - start})
