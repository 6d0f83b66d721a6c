"""Normalizing-flow flows: `nflow@NAME` (realnvp, cnf)."""

from __future__ import annotations

from prefect import flow

from tasks.nflow import FLOWS, derived_flow_fields, nflow_task
from tasks.stage import open_stage


@flow(name="nflow", log_prints=True)
def nflow_flow(name: str) -> dict[str, float]:
    if name not in FLOWS:
        raise KeyError(f"no normalizing flow {name!r} (known: {', '.join(FLOWS)})")
    spec = FLOWS[name]
    sections = [s for s in (spec.model_section, spec.net_section, spec.train_section) if s] + ["nflow_eval", "fid"]
    with open_stage(f"nflow@{name}", family="images", sections=sections, derive=derived_flow_fields(name)) as stage:
        c, rt = stage.configs, stage.env.runtime
        net = c[spec.net_section] if spec.net_section else None
        return nflow_task(stage.env.root, name, c[spec.model_section], net, c[spec.train_section], c["nflow_eval"],
                          c["fid"], rt.seed, rt.device, stage.run)
