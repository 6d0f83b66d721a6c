"""Stage name (as in dvc.yaml) -> the Prefect flow that runs it. The stage list itself is dvc.yaml's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flows.detection import detector_flow, map_flow, onnx_flow, scenes_flow
from flows.controlnet import controlnet_flow
from flows.images import (
    diffusion_flow,
    dit_ablation_flow,
    fid_net_flow,
    guidance_flow,
    images_flow,
    latents_flow,
    vae_flow,
)
from flows.lm import lm_compare_flow, lm_flow
from flows.nflow import nflow_flow
from flows.report import report_flow
from flows.text import corpus_flow, ngram_flow
from flows.text_diffusion import ldm_text_flow

STAGE_FLOWS: dict[str, Callable[..., Any]] = {
    "corpus": corpus_flow,
    "ngram": ngram_flow,
    "lm": lm_flow,
    "lm_compare": lm_compare_flow,
    "scenes": scenes_flow,
    "detector": detector_flow,
    "map": map_flow,
    "onnx": onnx_flow,
    "images": images_flow,
    "fid_net": fid_net_flow,
    "vae": vae_flow,
    "latents": latents_flow,
    "diffusion": diffusion_flow,
    "ldm_text": ldm_text_flow,
    "guidance": guidance_flow,
    "controlnet": controlnet_flow,
    "dit_ablation": dit_ablation_flow,
    "nflow": nflow_flow,
    "report": report_flow,
}


def stage_flow(name: str) -> Callable[[], Any]:
    """The flow of stage `name`; `base@item` (a dvc.yaml foreach) calls flow `base` with `item`."""
    base, _, item = name.partition("@")
    if base not in STAGE_FLOWS:
        raise KeyError(f"no stage {name!r} (known: {', '.join(sorted(STAGE_FLOWS))})")
    flow = STAGE_FLOWS[base]
    return (lambda: flow(item)) if item else flow
