"""`ldm_text`: text-conditioned latent diffusion (tasks/text_diffusion.py)."""

from __future__ import annotations

from prefect import flow

from tasks.stage import open_stage
from tasks.text_diffusion import derived_text_fields, ldm_text_task


@flow(name="ldm_text", log_prints=True)
def ldm_text_flow() -> dict[str, float]:
    sections = ["ldm_text", "ldm", "ldm_text_unet", "text_encoder", "ldm_text_train", "fid"]
    with open_stage("ldm_text", family="images", sections=sections, derive=derived_text_fields) as stage:
        c, rt = stage.configs, stage.env.runtime
        return ldm_text_task(stage.env.root, c["ldm_text"], c["ldm"], c["ldm_text_unet"], c["text_encoder"],
                             c["ldm_text_train"], c["fid"], rt.seed, rt.device, stage.run)
