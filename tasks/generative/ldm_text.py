"""`ldm_text`: text-conditioned latent diffusion, as Stable Diffusion conditions its UNet on text.

Captions are made from each image's label with templates ("a handwritten seven", "a sketch of a 7"); some
templates are held out of training. A small word-level Transformer text encoder (models/generative/text_encoder.py) is
trained with the UNet, whose low-resolution blocks cross-attend to the caption tokens; the DDPM of the `ldm`
section runs on the cached VAE latents, with whole captions dropped to the empty one (`caption_dropout`) so
one model samples with classifier-free guidance. Evaluation: FID and the fid_net class accuracy of samples
from held-out templates and from training templates, at `guidance_scale`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import Tensor, nn

from models.generative.ddpm import (
    ClassifierFreeGuidance,
    DiffusionConfig,
    GaussianDiffusion,
)
from models.generative.text_encoder import (
    PAD_ID,
    UNK_ID,
    TextConditionedUNet,
    TextEncoder,
    TextEncoderConfig,
    WordTokenizer,
    drop_captions,
)
from models.generative.unet import UNet, UNetConfig
from tasks.generative.diffusion import DataSpace, class_grid_of, latent_space, sample_images
from tasks.generative.fid import FIDConfig, FIDEvaluator, balanced_labels, check_fid_net
from tasks.generative.images import write_png
from tasks.generative.vae import latent_model_meta
from tasks.io import write_json
from tasks.layout import DIFFUSION_DIR, LATENTS_DIR, METRICS_DIR
from tasks.spec import StageContext, StageSpec
from tasks.tracking import StageRun
from tasks.training import TrainConfig, code_digest, resolve_device, save_model, train

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LDM_TEXT_DIR = f"{DIFFUSION_DIR}/ldm_text"  # model.pt, checkpoint.pt (persisted), samples.png


@dataclass(frozen=True)
class LdmTextConfig:
    """`params/images.yaml: ldm_text`: captions, caption dropout, and how the samples are scored."""

    train_templates: list[str]  # "{word}" is the class's number word ("seven"), "{digit}" its numeral ("7")
    heldout_templates: list[str]  # never seen in training; their samples measure generalisation over wording
    caption_dropout: float  # probability of training on the empty caption (classifier-free guidance)
    guidance_scale: float  # 0 unconditional, 1 conditional, > 1 guided
    sampler: Literal["ancestral", "ddim"]
    steps: int
    val_images: int  # val latents in the validation loss
    grid_per_class: int

    def __post_init__(self) -> None:
        if not self.train_templates or not self.heldout_templates:
            raise ValueError("train_templates and heldout_templates must be non-empty")
        for t in [*self.train_templates, *self.heldout_templates]:
            if "{word}" not in t and "{digit}" not in t:
                raise ValueError(f"template {t!r} names no class ({{word}} or {{digit}})")
        if set(self.train_templates) & set(self.heldout_templates):
            raise ValueError("heldout_templates must be disjoint from train_templates")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.guidance_scale < 0 or self.steps < 1 or self.val_images < 1 or self.grid_per_class < 1:
            raise ValueError("guidance_scale must be >= 0; steps, val_images and grid_per_class >= 1")


def caption(template: str, label: int) -> str:
    word = NUMBER_WORDS[label] if label < len(NUMBER_WORDS) else str(label)
    return template.format(word=word, digit=label)


def captions(templates: list[str], num_classes: int) -> list[list[str]]:
    """[class][template] -> caption."""
    return [[caption(t, k) for t in templates] for k in range(num_classes)]


def build_tokenizer(cfg: LdmTextConfig, num_classes: int) -> WordTokenizer:
    """The vocabulary of the training captions only: held-out wording can meet <unk>."""
    return WordTokenizer.build([c for row in captions(cfg.train_templates, num_classes) for c in row])


def caption_ids(tokenizer: WordTokenizer, templates: list[str], num_classes: int, length: int) -> Tensor:
    rows = captions(templates, num_classes)
    return torch.stack([tokenizer.encode_batch(row, length) for row in rows])  # (K, T, L)


def derived_text_fields(root: Path) -> dict[str, dict[str, Any]]:
    """The UNet's latent shape (no label embedding) and context width (the text encoder's), and the
    vocabulary size of the training captions."""
    from tasks.params import load_section

    meta = json.loads((root / METRICS_DIR / "images.json").read_text())
    c, h, _ = json.loads((root / LATENTS_DIR / "latents.json").read_text())["shape"]
    cfg = load_section(root / "params", "ldm_text", LdmTextConfig)
    vocab = len(build_tokenizer(cfg, int(meta["classes"])))
    dim = load_section(root / "params", "text_encoder", TextEncoderConfig, {"vocab_size": vocab}).dim
    return {
        "ldm_text_unet": {"in_channels": int(c), "image_size": int(h), "num_classes": 0, "context_dim": dim},
        "text_encoder": {"vocab_size": vocab},
    }


@dataclass
class TextModelConfig:
    unet: UNetConfig
    text_encoder: TextEncoderConfig


def caption_loss(process: GaussianDiffusion, p_uncond: float):
    def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x0, ids = batch
        return process.training_losses(model, x0, y=drop_captions(ids, p_uncond))["loss"]

    return loss


def fit_text_model(
    process: GaussianDiffusion,
    cfg: LdmTextConfig,
    unet_cfg: UNetConfig,
    text_cfg: TextEncoderConfig,
    train_cfg: TrainConfig,
    space: DataSpace,
    train_ids: Tensor,
    *,
    seed: int,
    device: torch.device,
    checkpoint: Path | None,
    run: StageRun | None,
    fingerprint: dict[str, Any],
):
    torch.manual_seed(seed)
    model = TextConditionedUNet(UNet(unet_cfg), TextEncoder(text_cfg))
    x_train, y_train = space.train.to(device), space.train_labels.to(device)
    ids = train_ids.to(device)  # (K, T, L)
    n_val = min(cfg.val_images, len(space.val))
    x_val, y_val = space.val[:n_val].to(device), space.val_labels[:n_val].to(device)
    val_ids = ids[y_val, torch.arange(n_val, device=device) % ids.shape[1]]  # (n_val, L)

    def next_batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(x_train), (train_cfg.batch_size,), generator=generator)
        which = torch.randint(0, ids.shape[1], (train_cfg.batch_size,), generator=generator)
        return x_train[idx], ids[y_train[idx], which.to(device)]

    def evaluate(m: nn.Module) -> dict[str, float]:
        g = torch.Generator(device).manual_seed(seed)
        return {"val_loss": float(process.training_losses(m, x_val, y=val_ids, generator=g)["loss"])}

    fingerprint = {
        **fingerprint,
        "code": code_digest(model, sys.modules[__name__]),
        "unet": asdict(unet_cfg),
        "text_encoder": asdict(text_cfg),
        "train": asdict(train_cfg),
        "seed": seed,
        "n": len(x_train),
        "train_checksum": float(space.train.double().sum()),
    }
    result = train(
        model,
        train_cfg,
        next_batch=next_batch,
        loss_fn=caption_loss(process, cfg.caption_dropout),
        evaluate=evaluate,
        items_per_batch=train_cfg.batch_size,
        seed=seed,
        device=device,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        run=run,
        item_name="images",
        desc="ldm_text",
    )
    model.eval()
    return model, result


@dataclass(frozen=True)
class LdmTextInputs:
    ldm_text: LdmTextConfig
    ldm: DiffusionConfig
    ldm_text_unet: UNetConfig
    text_encoder: TextEncoderConfig
    ldm_text_train: TrainConfig
    fid: FIDConfig


@task(name="ldm_text", cache_policy=NO_CACHE)
def ldm_text_task(ctx: StageContext, inputs: LdmTextInputs) -> dict[str, float]:
    root, run, seed, device_name = ctx.root, ctx.run, ctx.seed, ctx.device
    cfg, process_cfg, unet_cfg, text_cfg = inputs.ldm_text, inputs.ldm, inputs.ldm_text_unet, inputs.text_encoder
    train_cfg, fid_cfg = inputs.ldm_text_train, inputs.fid
    start = time.perf_counter()
    device = resolve_device(device_name)
    # Captions are dropped whole here (caption_dropout); the process's p_uncond would drop single tokens.
    process = GaussianDiffusion(replace(process_cfg, p_uncond=0.0))
    check_fid_net(root)  # before training: the samples are scored with it
    space = latent_space(root, device, fid_cfg.batch_size)
    num_classes = int(space.train_labels.max()) + 1
    tokenizer = build_tokenizer(cfg, num_classes)
    L = text_cfg.max_length
    train_ids = caption_ids(tokenizer, cfg.train_templates, num_classes, L)  # (K, T_train, L)
    heldout_ids = caption_ids(tokenizer, cfg.heldout_templates, num_classes, L)  # (K, T_heldout, L)
    out = root / LDM_TEXT_DIR
    model, result = fit_text_model(
        process,
        cfg,
        unet_cfg,
        text_cfg,
        train_cfg,
        space,
        train_ids,
        seed=seed,
        device=device,
        checkpoint=out / "checkpoint.pt",
        run=run,
        fingerprint={"process": asdict(process_cfg), "ldm_text": asdict(cfg)},
    )
    save_model(out / "model.pt", "ldm_text", TextModelConfig(unet_cfg, text_cfg), model, meta=latent_model_meta(root))

    evaluator = FIDEvaluator.load(root, fid_cfg, device)
    labels = balanced_labels(fid_cfg.samples, evaluator.classifier.cfg.num_classes)
    metrics: dict[str, Any] = {
        "ema_decay": train_cfg.ema_decay,  # the weights every number here comes from (0: the trained ones)
        "fid_floor": evaluator.floor,
        "fid_ceiling": evaluator.ceiling,
        "guidance_scale": cfg.guidance_scale,
        "vocab_size": len(tokenizer),
        "heldout_unk_rate": float((heldout_ids == UNK_ID).sum() / (heldout_ids != PAD_ID).sum()),
    }
    samples = {}
    for split, ids in (("heldout", heldout_ids), ("train", train_ids)):
        # labels cycle through the classes; the templates cycle at a slower pace so every class meets each
        y = ids[labels, (torch.arange(len(labels)) // num_classes) % ids.shape[1]]  # (N, L)
        t0 = time.perf_counter()
        images, nfe = sample_images(
            process,
            model,
            space,
            y,
            sampler=cfg.sampler,
            steps=cfg.steps,
            guidance=lambda c: ClassifierFreeGuidance(y=c, scale=cfg.guidance_scale),
            seed=seed + 1,
            batch_size=fid_cfg.batch_size,
        )
        report = evaluator.report(images, labels)
        metrics.update(
            {
                f"{split}_fid": report["fid"],
                f"{split}_class_accuracy": report["class_accuracy"],
                f"{split}_sample_seconds": time.perf_counter() - t0,
                "nfe": nfe,
            }
        )
        samples[split] = images
        print(
            f"ldm_text: {split} templates: FID {report['fid']:.3f}, class accuracy {report['class_accuracy']:.3f} "
            f"(guidance {cfg.guidance_scale:g}, {cfg.sampler} {cfg.steps} steps)"
        )
    metrics.update(
        fid=metrics["heldout_fid"],
        class_accuracy=metrics["heldout_class_accuracy"],
        train_seconds=result.train_seconds,
        train_images_per_s=result.items_per_second,
        stage_seconds=time.perf_counter() - start,
    )
    grid = write_png(
        class_grid_of(samples["heldout"], labels, cfg.grid_per_class, num_classes), out / "samples.png", upscale=2
    )
    write_json(root / METRICS_DIR / "ldm_text.json", metrics)
    flat = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    run.log_metrics(flat)
    run.log_artifact(grid, "samples")
    run.set_tags({"kiln.headline": "held-out caption templates"})
    print(
        f"ldm_text: held-out FID {metrics['fid']:.3f} (floor {evaluator.floor:.3f}), class accuracy "
        f"{metrics['class_accuracy']:.3f}; training templates {metrics['train_class_accuracy']:.3f}"
    )
    return flat


SPEC = StageSpec(
    name="ldm_text",
    family="generative",
    task=ldm_text_task,
    inputs=LdmTextInputs,
    derive=lambda root, item: derived_text_fields(root),
    placeholders={
        "ldm_text_unet": {"in_channels": 4, "image_size": 8, "num_classes": 0, "context_dim": 32},
        "text_encoder": {"vocab_size": 2},
    },
)
