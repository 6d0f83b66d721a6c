"""Image flows: `images`, `fid_net`, `vae`, `latents`, `diffusion@NAME`, `guidance`."""

from __future__ import annotations

from prefect import flow

from tasks.autoencoder import latents_task, vae_task
from tasks.diffusion import GENERATORS, derived_generator_fields, diffusion_task, dit_ablation_task, guidance_task
from tasks.images import derived_image_fields, fid_net_task, images_task
from tasks.stage import open_stage


@flow(name="images", log_prints=True)
def images_flow() -> dict[str, float]:
    with open_stage("images", family="images", sections=["images"]) as stage:
        return images_task(stage.env.root, stage.configs["images"], stage.run)


@flow(name="fid_net", log_prints=True)
def fid_net_flow() -> dict[str, float]:
    with open_stage("fid_net", family="images", sections=["fid_net", "fid_net_train", "fid"],
                    derive=derived_image_fields("fid_net")) as stage:
        c, rt = stage.configs, stage.env.runtime
        return fid_net_task(stage.env.root, c["fid_net"], c["fid_net_train"], c["fid"], rt.seed, rt.device, stage.run)


@flow(name="vae", log_prints=True)
def vae_flow() -> dict[str, float]:
    with open_stage("vae", family="images", sections=["vae", "vae_train", "fid"],
                    derive=derived_image_fields("vae", ("in_channels",))) as stage:
        c, rt = stage.configs, stage.env.runtime
        return vae_task(stage.env.root, c["vae"], c["vae_train"], c["fid"], rt.seed, rt.device, stage.run)


@flow(name="latents", log_prints=True)
def latents_flow() -> dict[str, float]:
    with open_stage("latents", family="images", sections=["latents"]) as stage:
        return latents_task(stage.env.root, stage.configs["latents"], stage.env.runtime.device, stage.run)


@flow(name="diffusion", log_prints=True)
def diffusion_flow(name: str) -> dict[str, float]:
    if name not in GENERATORS:
        raise KeyError(f"no generator {name!r} (known: {', '.join(GENERATORS)})")
    spec = GENERATORS[name]
    compare = [GENERATORS[spec.compare_with].process_section] if spec.compare_with else []
    sections = [spec.process_section, spec.network_section, spec.train_section, "diffusion_eval", "fid", *compare]
    with open_stage(f"diffusion@{name}", family="images", sections=sections,
                    derive=derived_generator_fields(name)) as stage:
        c, rt = stage.configs, stage.env.runtime
        return diffusion_task(stage.env.root, name, c[spec.process_section], c[spec.network_section],
                              c[spec.train_section], c["diffusion_eval"], c["fid"], rt.seed, rt.device, stage.run,
                              compare_cfg=c[compare[0]] if compare else None)


@flow(name="guidance", log_prints=True)
def guidance_flow() -> dict[str, float]:
    sections = ["ddpm", "guidance_classifier", "guidance_train", "guidance", "diffusion_eval", "fid"]
    with open_stage("guidance", family="images", sections=sections,
                    derive=derived_image_fields("guidance_classifier")) as stage:
        c, rt = stage.configs, stage.env.runtime
        return guidance_task(stage.env.root, c["ddpm"], c["guidance_classifier"], c["guidance_train"], c["guidance"],
                             c["diffusion_eval"], c["fid"], rt.seed, rt.device, stage.run)


@flow(name="dit_ablation", log_prints=True)
def dit_ablation_flow() -> dict[str, float]:
    sections = ["dit_ablation", "dit", "dit_rf", "dit_train", "vae", "vae_train", "diffusion_eval", "fid"]
    derives = (derived_generator_fields("dit_rf"), derived_image_fields("vae", ("in_channels",)))
    with open_stage("dit_ablation", family="images", sections=sections,
                    derive=lambda root: {k: v for derive in derives for k, v in derive(root).items()}) as stage:
        c, rt = stage.configs, stage.env.runtime
        return dit_ablation_task(stage.env.root, c["dit_ablation"], c["dit"], c["dit_rf"], c["dit_train"], c["vae"],
                                 c["vae_train"], c["diffusion_eval"], c["fid"], rt.seed, rt.device, stage.run)
