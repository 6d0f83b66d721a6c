"""Config dataclasses of the sections that are not a model's, and the registry of every params file.

A section's dataclass lives beside the code it configures: model configs in `models/`, data and
runtime configs here. `PARAMS_FILES` is the only place that says which file holds which section.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from models.classifier import FIDNetConfig
from models.controlnet import ControlNetConfig
from models.cnf import CNFConfig
from models.detector import DETECTORS
from models.diffusion import DiffusionConfig
from models.dit import DiTConfig
from models.lm import LANGUAGE_MODELS
from models.ngram import NgramConfig
from models.realnvp import RealNVPConfig
from models.rectified_flow import RectifiedFlowConfig
from models.sde import SDEConfig
from models.text_encoder import TextEncoderConfig
from models.unet import UNetConfig
from models.vae import VAEConfig
from tasks.params import ParamsError, load_params_file
from tasks.autoencoder import LatentsConfig
from tasks.controlnet import ControlNetEvalConfig
from tasks.diffusion import DiffusionEvalConfig, DiTAblationConfig, GuidanceConfig
from tasks.images import FIDConfig, ImagesConfig
from tasks.nflow import NFlowEvalConfig
from tasks.scenes import ScenesConfig
from tasks.text_diffusion import LdmTextConfig
from tasks.training import TrainConfig

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


@dataclass(frozen=True)
class RuntimeConfig:
    """`params/runtime.yaml: runtime`: how stages run, not what they compute (no stage depends on it,
    except through `seed`)."""

    profile: str  # the profile last applied with `kiln profile`; a label, set by that command
    seed: int  # the seed of every stochastic stage (one seeded-RNG helper reads it)
    device: Literal["auto", "cpu", "cuda", "mps"]
    threads: int  # torch intra-op threads; 0 keeps torch's default
    mlflow_tracking_uri: str  # empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db at the repo root
    stage_retries: int  # retries of a failed stage inside `kiln run`
    retry_delay_s: float
    max_parallel: int  # stages `kiln run` runs at once (independent ones only); 1: one after another
    task_runner: Literal["thread", "dask"]  # what runs the stage tasks of `kiln run` in parallel
    dask_address: str  # with task_runner dask: a scheduler address; empty: a local cluster of max_parallel workers

    def __post_init__(self) -> None:
        if self.max_parallel < 1:
            raise ValueError(f"max_parallel must be >= 1, got {self.max_parallel}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.stage_retries < 0:
            raise ValueError(f"stage_retries must be >= 0, got {self.stage_retries}")
        if self.retry_delay_s < 0:
            raise ValueError(f"retry_delay_s must be >= 0, got {self.retry_delay_s}")

    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@dataclass(frozen=True)
class CorpusConfig:
    """`params/data.yaml: corpus`: where the text comes from and how it is split."""

    source: Literal["builtin", "path"]  # builtin: CPython's pydoc_data.topics reference text
    path: str  # with source: path, a UTF-8 .txt file or a folder of .txt files
    min_count: int  # train-split count a word needs to enter the vocabulary
    val_fraction: float  # share of documents (by tokens) held out for validation
    test_fraction: float  # and for test
    split_seed: int  # the document shuffle of the split
    max_documents: int  # 0: all; the smoke profile takes a few

    def __post_init__(self) -> None:
        if self.source == "path" and not self.path:
            raise ValueError("path must name a file or folder when source is 'path'")
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {getattr(self, name)}")
        if self.max_documents < 0:
            raise ValueError(f"max_documents must be >= 0, got {self.max_documents}")


@dataclass(frozen=True)
class LMEvalConfig:
    """`params/lm.yaml: lm_eval`: how the neural LMs are evaluated and sampled."""

    batch_size: int  # evaluation windows per forward pass
    val_max_tokens: int  # tokens of the val stream scored at each mid-training evaluation; 0: all
    sample_tokens: int  # length of the text sample logged to MLflow
    sample_temperature: float
    sample_top_k: int

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.val_max_tokens < 0 or self.sample_tokens < 0:
            raise ValueError("val_max_tokens and sample_tokens must be >= 0")
        if self.sample_temperature < 0 or self.sample_top_k < 1:
            raise ValueError("sample_temperature must be >= 0 and sample_top_k >= 1")


@dataclass(frozen=True)
class DetectionEvalConfig:
    """`params/detection.yaml: detection_eval`: how detectors are evaluated during and after training."""

    batch_size: int  # images per inference batch

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class OnnxConfig:
    """`params/detection.yaml: onnx`: export, parity, int8 and latency of the detectors."""

    batch_size: int  # images per onnxruntime call in the parity run (the batch dimension is dynamic)
    quantize_int8: bool  # also write <name>.int8.onnx (static QDQ quantisation) and measure it
    calibration_images: int  # train images that calibrate the int8 activations
    latency_warmup: int
    latency_runs: int  # batch-1 calls timed for p50/p95
    registered_model_prefix: str  # MLflow registry name = prefix + detector name

    def __post_init__(self) -> None:
        for name in ("batch_size", "calibration_images", "latency_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.latency_warmup < 0:
            raise ValueError(f"latency_warmup must be >= 0, got {self.latency_warmup}")


PARAMS_FILES: dict[str, dict[str, type]] = {
    "runtime.yaml": {"runtime": RuntimeConfig},
    "data.yaml": {"corpus": CorpusConfig},
    "lm.yaml": {"ngram": NgramConfig, "lm_train": TrainConfig, "lm_eval": LMEvalConfig,
                **{name: config for name, (config, _) in LANGUAGE_MODELS.items()}},
    "detection.yaml": {"scenes": ScenesConfig, "detector_train": TrainConfig, "detection_eval": DetectionEvalConfig,
                       **{name: config for name, (config, _) in DETECTORS.items()}, "onnx": OnnxConfig},
    "images.yaml": {"images": ImagesConfig, "fid_net": FIDNetConfig, "fid_net_train": TrainConfig, "fid": FIDConfig,
                    "vae": VAEConfig, "vae_train": TrainConfig, "latents": LatentsConfig,
                    "unet": UNetConfig, "ldm_unet": UNetConfig, "diffusion_train": TrainConfig,
                    "ldm_train": TrainConfig, "diffusion_eval": DiffusionEvalConfig, "ddpm": DiffusionConfig,
                    "sde_vp": SDEConfig, "sde_ve": SDEConfig, "ldm": DiffusionConfig,
                    "dit": DiTConfig, "dit_rf": RectifiedFlowConfig, "dit_train": TrainConfig,
                    "dit_ablation": DiTAblationConfig,
                    "controlnet": ControlNetConfig, "controlnet_train": TrainConfig,
                    "controlnet_eval": ControlNetEvalConfig,
                    "ldm_text": LdmTextConfig, "text_encoder": TextEncoderConfig, "ldm_text_unet": UNetConfig,
                    "ldm_text_train": TrainConfig,
                    "guidance_classifier": UNetConfig, "guidance_train": TrainConfig, "guidance": GuidanceConfig},
    "nflow.yaml": {"realnvp": RealNVPConfig, "realnvp_train": TrainConfig, "cnf": CNFConfig, "cnf_unet": UNetConfig,
                   "cnf_train": TrainConfig, "nflow_eval": NFlowEvalConfig},
}

# Fields a stage fills in from its data, never from params; placeholders let `load_all` validate the rest.
DERIVED_FIELDS: dict[str, dict[str, Any]] = {
    **{name: {"vocab_size": 1} for name in LANGUAGE_MODELS},
    **{name: {"num_classes": 1, "input_size": 32} for name in DETECTORS},
    # The built-in images' values (16 px gray digits, 10 classes; latents 4x8x8), so configs validate.
    "fid_net": {"in_channels": 1, "image_size": 16, "num_classes": 10},
    "vae": {"in_channels": 1},
    "unet": {"in_channels": 1, "image_size": 16, "num_classes": 10},
    "ldm_unet": {"in_channels": 4, "image_size": 8, "num_classes": 10},
    "dit": {"in_channels": 4, "image_size": 8, "num_classes": 10},
    # ldm_text's UNet attends to the text encoder's tokens: its context_dim is text_encoder.dim
    "ldm_text_unet": {"in_channels": 4, "image_size": 8, "num_classes": 0, "context_dim": 32},
    "text_encoder": {"vocab_size": 2},  # the training captions' words + <pad>, <unk>
    "guidance_classifier": {"in_channels": 1, "image_size": 16, "num_classes": 10},
    "realnvp": {"in_channels": 1, "image_size": 16},
    "cnf_unet": {"in_channels": 1, "image_size": 16},
}

SECTION_FILE: dict[str, str] = {s: f for f, sections in PARAMS_FILES.items() for s in sections}


def load_section(params_dir: Path, section: str, **derived: Any) -> Any:
    """One section as its dataclass (its data-derived fields from `derived`); its whole file is validated
    on the way."""
    if section not in SECTION_FILE:
        raise ParamsError(params_dir, section, f"no such params section (known: {', '.join(SECTION_FILE)})")
    file = SECTION_FILE[section]
    fills = {**DERIVED_FIELDS, section: {**DERIVED_FIELDS.get(section, {}), **derived}}
    return load_params_file(params_dir / file, PARAMS_FILES[file], fills)[section]


def load_all(params_dir: Path) -> dict[str, Any]:
    """Every section of every params file (what `kiln profile` and the tests check)."""
    return {
        name: config
        for file, sections in PARAMS_FILES.items()
        for name, config in load_params_file(params_dir / file, sections, DERIVED_FIELDS).items()
    }
