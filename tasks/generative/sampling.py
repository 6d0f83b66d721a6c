"""`kiln sample`: images from a trained generator, read from its stage's artefacts only (no training, no
MLflow run, no DVC lock).

Every generator is rebuilt the way its stage saved it (`save_model`: the network's config beside its weights)
and sampled through the stage's own code: `sample_images` of tasks/generative/diffusion.py for the diffusion
models, ldm_text, guidance and ControlNet's base, `sample_images` of tasks/generative/normalizing_flows.py for
the flows. What a model file does not hold, the process (noise schedule, SDE, flow) and the sampler settings,
comes from the same params sections the stage read. Each model is refused (`StaleArtefact`) unless it was
trained on the current data, as the stages that load one refuse it.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tasks.errors import InputError, StaleArtefact, rerun_hint, shown_path
from tasks.layout import (
    CONTROLNET_DIR,
    DIFFUSION_DIR,
    GUIDANCE_DIR,
    IMAGES_DIR,
    LATENTS_DIR,
    NFLOW_DIR,
    VAE_DIR,
)

# Stages whose model is not a `diffusion@*` or `nflow@*` item.
OTHER_GENERATORS = ("ldm_text", "controlnet", "guidance")


class MissingArtefact(InputError):
    """A trained artefact `kiln sample` needs is not there: the message names the file and the stage that makes it."""


class UnknownSampleStage(InputError):
    """A stage name that is no sampleable generator: the message lists them and the closest one."""


def sampleable_stages() -> list[str]:
    """Every stage `kiln sample` reads a generator from, foreach items expanded from the stages' own tables."""
    from tasks.generative.diffusion import GENERATOR_NAMES
    from tasks.generative.normalizing_flows import NORMALIZING_FLOW_NAMES

    return [
        *(f"diffusion@{n}" for n in GENERATOR_NAMES),
        *OTHER_GENERATORS,
        *(f"nflow@{n}" for n in NORMALIZING_FLOW_NAMES),
    ]


def unknown_sample_stage(name: str, known: list[str]) -> UnknownSampleStage:
    """The error for `name`, with the closest stage: `ddpm` (an item on its own) suggests `diffusion@ddpm`."""
    items = {k.split("@")[-1]: k for k in known}
    close = difflib.get_close_matches(name, known, n=1) or [
        items[m] for m in difflib.get_close_matches(name.split("@")[-1], list(items), n=1)
    ]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UnknownSampleStage(f"no sampleable stage {name!r}{hint} (sampleable stages: {', '.join(known)})")


@dataclass(frozen=True)
class SampleRequest:
    """What `kiln sample` was asked for."""

    stage: str
    n: int = 8
    label: str | None = None  # a class name or index (class-conditional models)
    prompt: str | None = None  # ldm_text
    edges: Path | None = None  # controlnet: a PNG edge map
    steps: int | None = None  # None: the steps the stage scores its headline with
    seed: int = 0


@dataclass
class Samples:
    stage: str
    images: Tensor  # (N, C, H, W) in [-1, 1]
    conditions: list[str]  # per image: what it was conditioned on
    how: str  # the sampler and its steps


def missing_artefact(root: Path, stage: str, path: Path) -> MissingArtefact:
    return MissingArtefact(f"no trained model for {stage} at {shown_path(root, path)}; run `dvc repro {stage}` first")


def require(root: Path, path: Path, stage: str) -> Path:
    if not path.exists():
        raise missing_artefact(root, stage, path)
    return path


def class_names(root: Path) -> list[str]:
    """The images stage's class names, from the train split's schema (the pixels are not read)."""
    import pyarrow.parquet as pq

    path = require(root, root / IMAGES_DIR / "train.parquet", "images")
    meta = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
    return [str(c) for c in json.loads(meta["kiln.classes"])]


def parse_label(label: str, classes: list[str]) -> int:
    """A class name (as the images stage lists it) or a 0-based class index."""
    if label in classes:
        return classes.index(label)
    if label.lstrip("-").isdigit() and 0 <= int(label) < len(classes):
        return int(label)
    raise InputError(f"--label {label!r}: no such class (classes: {', '.join(classes)})")


def params_section(root: Path, section: str, cls: type) -> Any:
    """One params section, strictly, as the stage read it: what the model file does not record."""
    from tasks.params import load_section, params_files

    params = root / "params"
    stamp = tuple((p.name, p.stat().st_mtime_ns) for p in params_files(params))
    return load_section(params, section, cls, index=_section_index(params, stamp))


@functools.cache
def _section_index(params: Path, stamp: tuple) -> dict[str, Path]:
    """Which file holds which section, read once per state of the files (`stamp`): a sampler reads several."""
    from tasks.params import section_index

    return section_index(params)


def batch_size(root: Path) -> int:
    """Images per sampler call: the stages' own (`fid.batch_size`), which their models are sized to sample."""
    from tasks.generative.fid import FIDConfig

    return params_section(root, "fid", FIDConfig).batch_size


def checked_steps(request: SampleRequest, default: int) -> int:
    if request.steps is not None and request.steps < 1:
        raise InputError(f"--steps must be >= 1, got {request.steps}")
    return request.steps or default


def _refuse(request: SampleRequest, stage: str, **given: Any) -> None:
    """One line for an option the stage's model cannot use (a label to an unconditional flow, say)."""
    for option, why in given.items():
        if getattr(request, option) is not None:
            raise InputError(f"--{option} does not apply to {stage}: {why}")


def _labels(request: SampleRequest, classes: list[str]) -> tuple[Tensor, list[str]]:
    """--label for every image, else the classes in turn (as the stages' sample grids cycle them)."""
    from tasks.generative.fid import balanced_labels

    if request.label is not None:
        labels = torch.full((request.n,), parse_label(request.label, classes), dtype=torch.long)
    else:
        labels = balanced_labels(request.n, len(classes))
    return labels, [f"label {classes[int(k)]}" for k in labels]


# ------------------------------------------------------------------------------------ data spaces


def _pixel_space(shape: tuple[int, ...]):
    from tasks.generative.diffusion import DataSpace

    empty = torch.empty((0, *shape))
    return DataSpace(empty, torch.empty(0), empty, torch.empty(0), decode=lambda x: x.clamp(-1, 1))


def _latent_space(root: Path, device: torch.device, batch_size: int):
    """The latent shape and scale factor of the cache and the `vae` stage's decoder: what a latent model's
    samples are decoded with (the cached latents themselves are not read)."""
    from tasks.generative.diffusion import vae_space
    from tasks.generative.vae import latents_meta, load_vae

    require(root, root / VAE_DIR / "model.pt", "vae")
    require(root, root / LATENTS_DIR / "latents.json", "latents")
    meta = latents_meta(root)
    empty = torch.empty((0, *(int(d) for d in meta["shape"])))
    vae = load_vae(root, device)
    return vae_space(vae, empty, torch.empty(0), empty, torch.empty(0), float(meta["scale_factor"]), batch_size)


# ------------------------------------------------------------------------------------ generators


def sample_diffusion(root: Path, name: str, request: SampleRequest, device: torch.device) -> Samples:
    """`diffusion@name`: its headline sampler, at the most steps its stage sweeps unless --steps."""
    from tasks.generative.diffusion import (
        GENERATORS,
        PROCESS_CONFIGS,
        DiffusionEvalConfig,
        build_process,
        load_generator,
        sample_images,
    )

    stage, spec = f"diffusion@{name}", GENERATORS[name]
    _refuse(request, stage, prompt="it is class-conditional (--label)", edges="only controlnet takes an edge map")
    require(root, root / DIFFUSION_DIR / name / "model.pt", stage)
    classes = class_names(root)
    labels, conditions = _labels(request, classes)
    # The decoder first: a missing vae or latent cache is named before the model's check reads the cache.
    latents = _latent_space(root, device, batch_size(root)) if spec.space == "latents" else None
    model = load_generator(root, name, device)
    space = latents or _pixel_space(_shape_of(model))
    process = build_process(name, params_section(root, spec.process_section, PROCESS_CONFIGS[name]))
    steps = checked_steps(
        request, max(getattr(params_section(root, "diffusion_eval", DiffusionEvalConfig), spec.steps_field))
    )
    # The adaptive ODE solver picks its own steps: --steps does not reach it.
    fixed = None if spec.headline == "ode" else steps
    images, nfe = sample_images(
        process,
        model,
        space,
        labels,
        sampler=spec.headline,
        steps=fixed,
        seed=request.seed,
        batch_size=batch_size(root),
    )
    return Samples(stage, images, conditions, f"{spec.headline} sampler, {fixed or nfe} steps ({nfe} evaluations)")


def _shape_of(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) a pixel-space UNet samples, from its config."""
    return model.cfg.in_channels, model.cfg.image_size, model.cfg.image_size


def sample_guidance(root: Path, request: SampleRequest, device: torch.device) -> Samples:
    """`guidance`: classifier guidance of the `diffusion@ddpm` model by the stage's noisy classifier, at the
    strongest scale the stage sweeps (as its sample grid shows it): the val-selected one can be 0, which would
    ignore --label."""
    from models.generative.ddpm import ClassifierGuidance, DiffusionConfig, GaussianDiffusion
    from models.generative.unet import EncoderClassifier, UNetConfig
    from tasks.generative.diffusion import load_generator, sample_images
    from tasks.generative.fid import image_meta
    from tasks.generative.guidance import GuidanceConfig
    from tasks.training import load_model_with_meta, require_meta

    _refuse(request, "guidance", prompt="it is class-conditional (--label)", edges="only controlnet takes an edge map")
    path = require(root, root / GUIDANCE_DIR / "classifier.pt", "guidance")
    require(root, root / DIFFUSION_DIR / "ddpm" / "model.pt", "diffusion@ddpm")
    classes = class_names(root)
    _, classifier, meta = load_model_with_meta(path, lambda _, c: EncoderClassifier(UNetConfig(**c)), device)
    require_meta(root, path, meta, image_meta(root), "guidance")
    for p in classifier.parameters():
        p.requires_grad_(False)
    model = load_generator(root, "ddpm", device)
    cfg = params_section(root, "guidance", GuidanceConfig)
    scale = max(cfg.classifier_scales)
    labels, conditions = _labels(request, classes)
    steps = checked_steps(request, cfg.steps)
    images, nfe = sample_images(
        GaussianDiffusion(params_section(root, "ddpm", DiffusionConfig)),
        model,
        _pixel_space(_shape_of(model)),
        labels,
        sampler=cfg.sampler,
        steps=steps,
        guidance=lambda y: ClassifierGuidance(classifier, y=y, scale=scale),
        seed=request.seed,
        batch_size=batch_size(root),
    )
    return Samples("guidance", images, conditions, f"{cfg.sampler}, {steps} steps, classifier guidance {scale:g}")


def sample_ldm_text(root: Path, request: SampleRequest, device: torch.device) -> Samples:
    """`ldm_text`: the caption --prompt, with the stage's classifier-free guidance scale, sampler and steps."""
    from models.generative.ddpm import ClassifierFreeGuidance, DiffusionConfig, GaussianDiffusion
    from models.generative.text_encoder import (
        UNK_ID,
        TextConditionedUNet,
        TextEncoder,
        TextEncoderConfig,
        words,
    )
    from models.generative.unet import UNet, UNetConfig
    from tasks.generative.diffusion import sample_images
    from tasks.generative.ldm_text import LDM_TEXT_DIR, LdmTextConfig, build_tokenizer
    from tasks.generative.vae import latent_model_meta
    from tasks.training import load_model_with_meta, require_meta

    _refuse(request, "ldm_text", label="it is text-conditioned (--prompt)", edges="only controlnet takes an edge map")
    if not request.prompt or not request.prompt.strip():
        raise InputError("ldm_text is text-conditioned: give --prompt TEXT (e.g. --prompt 'a handwritten seven')")
    path = require(root, root / LDM_TEXT_DIR / "model.pt", "ldm_text")
    classes = class_names(root)
    space = _latent_space(root, device, batch_size(root))

    def build(_: str, config: dict[str, Any]) -> nn.Module:
        return TextConditionedUNet(
            UNet(UNetConfig(**config["unet"])), TextEncoder(TextEncoderConfig(**config["text_encoder"]))
        )

    _, model, meta = load_model_with_meta(path, build, device)
    require_meta(root, path, meta, latent_model_meta(root), "ldm_text")
    cfg = params_section(root, "ldm_text", LdmTextConfig)
    # The vocabulary is not in the model file: it is rebuilt from the training templates, as the stage built it.
    tokenizer = build_tokenizer(cfg, len(classes))
    text_encoder = model.text_encoder
    if len(tokenizer) != text_encoder.cfg.vocab_size:
        raise StaleArtefact(
            f"{shown_path(root, path)} has a vocabulary of {text_encoder.cfg.vocab_size} words, the current "
            f"params/images.yaml: ldm_text templates make {len(tokenizer)}: {rerun_hint('ldm_text')}"
        )
    ids = tokenizer.encode_batch([request.prompt] * request.n, text_encoder.cfg.max_length)
    unknown = [w for w in words(request.prompt) if tokenizer.index.get(w, UNK_ID) == UNK_ID]
    steps = checked_steps(request, cfg.steps)
    process = GaussianDiffusion(replace(params_section(root, "ldm", DiffusionConfig), p_uncond=0.0))
    images, nfe = sample_images(
        process,
        model,
        space,
        ids,
        sampler=cfg.sampler,
        steps=steps,
        guidance=lambda c: ClassifierFreeGuidance(y=c, scale=cfg.guidance_scale),
        seed=request.seed,
        batch_size=batch_size(root),
    )
    note = f"; words the model never saw (read as <unk>): {', '.join(unknown)}" if unknown else ""
    how = f"{cfg.sampler}, {steps} steps, classifier-free guidance {cfg.guidance_scale:g}{note}"
    return Samples("ldm_text", images, [f"prompt {request.prompt!r}"] * request.n, how)


def read_edge_map(path: Path, shape: tuple[int, int, int]) -> Tensor:
    """A PNG edge map (any mode; ink >= 128 is an edge) as (1, 1, H, W) in {0, 1}: what ControlNet was trained on
    (Canny maps of the training images). It must be the training images' size: resizing would move edges."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"{path}: no such file (--edges)")
    try:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable image (--edges; {type(err).__name__})") from err
    _, h, w = shape
    if gray.shape != (h, w):
        raise InputError(
            f"{path}: edge map of {gray.shape[1]}x{gray.shape[0]} px; controlnet was trained on {w}x{h} images "
            "(--edges must be that size)"
        )
    return torch.from_numpy((gray >= 128).astype(np.float32))[None, None]


def sample_controlnet(root: Path, request: SampleRequest, device: torch.device) -> Samples:
    """`controlnet`: the `diffusion@ddpm` UNet steered by the ControlNet with the edge map --edges, with the
    stage's sampler and steps; with --label the base is class-conditional too, else unconditional."""
    from models.generative.controlnet import ControlledUNet, ControlNet, ControlNetConfig
    from models.generative.ddpm import DiffusionConfig, GaussianDiffusion
    from tasks.generative.controlnet import ControlNetEvalConfig, sample
    from tasks.generative.diffusion import load_generator
    from tasks.generative.fid import image_meta
    from tasks.training import load_in_saved_layout, require_meta

    _refuse(request, "controlnet", prompt="it is conditioned on an edge map (--edges) and a label (--label)")
    if request.edges is None:
        raise InputError(
            "controlnet is conditioned on an edge map: give --edges FILE (a PNG of the training images' size)"
        )
    path = require(root, root / CONTROLNET_DIR / "model.pt", "controlnet")
    require(root, root / DIFFUSION_DIR / "ddpm" / "model.pt", "diffusion@ddpm")
    classes = class_names(root)
    base = load_generator(root, "ddpm", device)
    saved = torch.load(path, map_location=device, weights_only=True)
    require_meta(root, path, dict(saved.get("meta") or {}), image_meta(root), "controlnet")
    if saved["base_config"] != asdict(base.cfg):
        raise StaleArtefact(
            f"{shown_path(root, path)} was trained on another diffusion@ddpm network: {rerun_hint('controlnet')}"
        )
    controlnet = ControlNet(base, ControlNetConfig(**saved["config"]))
    load_in_saved_layout(controlnet, saved["state_dict"])  # the base's layout is load_generator's
    model = ControlledUNet(base, controlnet).to(device).eval()
    shape = (base.cfg.in_channels, base.cfg.image_size, base.cfg.image_size)
    edges = read_edge_map(request.edges, shape).expand(request.n, -1, -1, -1)
    if request.label is not None:
        labels, conditions = _labels(request, classes)
    else:  # the null label: the base's unconditional half, which label dropout trained
        labels = torch.full((request.n,), base.null_label, dtype=torch.long)
        conditions = ["unconditional"] * request.n
    conditions = [f"{c}, edges {request.edges.name}" for c in conditions]
    eval_cfg = params_section(root, "controlnet_eval", ControlNetEvalConfig)
    eval_cfg = replace(eval_cfg, steps=checked_steps(request, eval_cfg.steps))
    x_T = torch.randn((request.n, *shape), generator=torch.Generator().manual_seed(request.seed)).to(device)
    process = GaussianDiffusion(params_section(root, "ddpm", DiffusionConfig))
    images = sample(process, model, x_T, labels, edges, eval_cfg, batch_size(root))
    return Samples("controlnet", images, conditions, f"{eval_cfg.sampler}, {eval_cfg.steps} steps")


def sample_flow(root: Path, name: str, request: SampleRequest, device: torch.device) -> Samples:
    """`nflow@name`: RealNVP's inverse in one pass; the CNF's ODE with its sampling solver (--steps: RK4 steps)."""
    from models.generative.cnf import CNFConfig
    from models.generative.realnvp import RealNVPConfig
    from models.generative.unet import UNetConfig
    from tasks.generative.fid import image_meta
    from tasks.generative.normalizing_flows import build_normalizing_flow, sample_images
    from tasks.training import load_in_saved_layout, require_meta

    stage = f"nflow@{name}"
    unconditional = "the flows are unconditional"
    _refuse(request, stage, label=unconditional, prompt=unconditional, edges=unconditional)
    path = require(root, root / NFLOW_DIR / name / "model.pt", stage)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    require_meta(root, path, dict(saved.get("meta") or {}), image_meta(root), stage)
    if name == "realnvp":
        _refuse(request, stage, steps="RealNVP samples in one pass of its inverse")
        flow = build_normalizing_flow(name, RealNVPConfig(**saved["config"]), None)
        how = "one pass of the inverse"
    else:
        cfg = params_section(root, "cnf", CNFConfig)
        if request.steps is not None:
            cfg = replace(cfg, sample_solver="rk4", sample_steps=checked_steps(request, cfg.sample_steps))
        flow = build_normalizing_flow(name, cfg, UNetConfig(**saved["config"]))
        how = f"ODE, {cfg.sample_solver}" + (f", {cfg.sample_steps} steps" if cfg.sample_solver == "rk4" else "")
    load_in_saved_layout(flow.model, saved["state_dict"])
    flow.model.to(device).eval()
    images, _ = sample_images(flow, request.n, batch_size(root), seed=request.seed)
    return Samples(stage, images, ["unconditional"] * request.n, how)


def sample_stage(root: Path, request: SampleRequest, device: torch.device | str = "cpu") -> Samples:
    """`request.n` samples of the generator of `request.stage` (one of `sampleable_stages()`)."""
    known = sampleable_stages()
    if request.stage not in known:
        raise unknown_sample_stage(request.stage, known)
    if request.n < 1:
        raise InputError(f"-n must be >= 1, got {request.n}")
    device = torch.device(device)
    torch.manual_seed(request.seed)  # anything a sampler draws outside its generator
    base, _, item = request.stage.partition("@")
    # Classifier guidance differentiates the classifier; every other sampler runs without autograd.
    with torch.set_grad_enabled(base == "guidance"):
        if base == "diffusion":
            return sample_diffusion(root, item, request, device)
        if base == "nflow":
            return sample_flow(root, item, request, device)
        return {"ldm_text": sample_ldm_text, "controlnet": sample_controlnet, "guidance": sample_guidance}[base](
            root, request, device
        )


def write_samples(samples: Samples, out: Path) -> list[Path]:
    """One PNG per image (000.png, 001.png, ...; the images' own size) and grid.png (2x upscaled); the paths."""
    from tasks.generative.images import image_grid, to_pixels, write_png

    pixels = to_pixels(samples.images)  # (N, C, H, W) uint8
    out.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(len(pixels) - 1)))
    paths = [write_png(_hwc(p), out / f"{i:0{digits}d}.png") for i, p in enumerate(pixels)]
    columns = min(len(pixels), 8)
    paths.append(write_png(image_grid(pixels, columns), out / "grid.png", upscale=2))
    return paths


def _hwc(pixels: np.ndarray) -> np.ndarray:
    """(C, H, W) -> what PIL reads: (H, W) gray or (H, W, 3) RGB."""
    return pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
