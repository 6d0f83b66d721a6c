"""Detection flows: `scenes`, `detector@NAME`, `map`, `onnx`."""

from __future__ import annotations

from prefect import flow

from tasks.detection import DETECTOR_NAMES, derived_detector_fields, detector_task, map_task, onnx_task
from tasks.scenes import scenes_task
from tasks.stage import open_stage


@flow(name="scenes", log_prints=True)
def scenes_flow() -> dict[str, float]:
    with open_stage("scenes", family="detection", sections=["scenes"]) as stage:
        return scenes_task(stage.env.root, stage.configs["scenes"], stage.run)


@flow(name="detector", log_prints=True)
def detector_flow(name: str) -> dict[str, float]:
    if name not in DETECTOR_NAMES:
        raise KeyError(f"no detector {name!r} (known: {', '.join(DETECTOR_NAMES)})")
    with open_stage(f"detector@{name}", family="detection", sections=["detector_train", "detection_eval", name],
                    derive=derived_detector_fields(name)) as stage:
        c = stage.configs
        return detector_task(stage.env.root, name, c[name], c["detector_train"], c["detection_eval"],
                             stage.env.runtime.seed, stage.env.runtime.device, stage.run)


@flow(name="map", log_prints=True)
def map_flow() -> dict[str, float]:
    with open_stage("map", family="detection", sections=[]) as stage:
        return map_task(stage.env.root, stage.run)


@flow(name="onnx", log_prints=True)
def onnx_flow() -> dict[str, float]:
    with open_stage("onnx", family="detection", sections=["onnx"]) as stage:
        return onnx_task(stage.env.root, stage.configs["onnx"], stage.run)
