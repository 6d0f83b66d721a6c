"""Neural language model flows: `lm@NAME` (one of models/lm.py's registry) and `lm_compare`."""

from __future__ import annotations

from prefect import flow

from tasks.lm import LM_NAMES, derived_model_fields, lm_compare_task, lm_task
from tasks.stage import open_stage


@flow(name="lm", log_prints=True)
def lm_flow(name: str) -> dict[str, float]:
    if name not in LM_NAMES:
        raise KeyError(f"no language model {name!r} (known: {', '.join(LM_NAMES)})")
    with open_stage(f"lm@{name}", family="text", sections=["lm_train", "lm_eval", name],
                    derive=derived_model_fields(name)) as stage:
        c = stage.configs
        return lm_task(stage.env.root, name, c[name], c["lm_train"], c["lm_eval"], stage.env.runtime.seed,
                       stage.env.runtime.device, stage.run)


@flow(name="lm_compare", log_prints=True)
def lm_compare_flow() -> dict[str, float]:
    with open_stage("lm_compare", family="text", sections=[]) as stage:
        return lm_compare_task(stage.env.root, stage.run)
