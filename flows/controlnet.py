"""`controlnet`: a ControlNet on the frozen `diffusion@ddpm` UNet, conditioned on Canny edge maps."""

from __future__ import annotations

from prefect import flow

from tasks.controlnet import controlnet_task
from tasks.stage import open_stage


@flow(name="controlnet", log_prints=True)
def controlnet_flow() -> dict[str, float]:
    sections = ["controlnet", "controlnet_train", "controlnet_eval", "ddpm", "fid"]
    with open_stage("controlnet", family="images", sections=sections) as stage:
        c, rt = stage.configs, stage.env.runtime
        return controlnet_task(stage.env.root, c["controlnet"], c["controlnet_train"], c["controlnet_eval"], c["ddpm"],
                               c["fid"], rt.seed, rt.device, stage.run)
