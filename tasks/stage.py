"""The frame every stage flow runs in: repo root, strict params into the spec's inputs, seeds, threads
(tasks/threads.py), the MLflow run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tasks import phases, threads
from tasks.params import as_flat_dict, load_section, section_index
from tasks.runtime import StageEnv, seed_everything, stage_env
from tasks.spec import StageContext, StageSpec
from tasks.tracking import stage_run


@dataclass(frozen=True)
class OpenStage:
    env: StageEnv
    context: StageContext
    inputs: Any  # the spec's inputs dataclass, one config per params section


class OtherRank:
    """The MLflow run as a torchrun rank other than 0 sees it: rank 0 logs for the whole job."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def torchrun_rank() -> int:
    """This process's rank in a torchrun job (0 outside one)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


@contextmanager
def open_stage(spec: StageSpec, item: str = "") -> Iterator[OpenStage]:
    """Load the stage's params sections (strictly) into its inputs object, seed, and open its MLflow run
    with those params; data-derived fields come from `spec.derive(root, item)`."""
    env = stage_env()
    name = f"{spec.name}@{item}" if item else spec.name
    item, replicate = spec.split_item(item)  # `lstm-2` of a replicated stage: item `lstm`, seed + 2
    seed = env.runtime.seed + replicate
    derived = spec.derive(env.root, item) if spec.derive else {}
    index = section_index(env.params_dir)
    fields = spec.section_types(item)
    configs = {
        field: load_section(env.params_dir, section, cls, derived.get(section), index)
        for field, (section, cls) in fields.items()
    }
    inputs = spec.inputs(**configs)
    seed_everything(seed)
    threads.govern(env.runtime.threads)
    params = {k: v for field, cfg in configs.items() for k, v in as_flat_dict(cfg, f"{fields[field][0]}.").items()}
    params["runtime.seed"] = env.runtime.seed
    if spec.replicates:
        params |= {"replicate": replicate, "seed": seed}

    def context(run: Any) -> StageContext:
        return StageContext(env.root, item, seed, env.runtime.device, run, replicate)

    if torchrun_rank():  # `torchrun ... kiln stage NAME`: one MLflow run for the job, rank 0's
        yield OpenStage(env, context(OtherRank()), inputs)
        return
    with stage_run(name, spec.family, env.root, env.runtime.tracking_uri(), env.runtime.profile, params) as run:
        with phases.clocked() as clock:
            start = time.perf_counter()
            yield OpenStage(env, context(run), inputs)
            # The stage's own work, to tell it apart from orchestration (benchmarks/bench_orchestration.py),
            # and where it went (tasks/phases.py; benchmarks/bench_stages.py reads both).
            run.log_metrics({"stage_seconds": time.perf_counter() - start, **clock.metrics()})
