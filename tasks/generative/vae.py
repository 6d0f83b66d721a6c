"""The first stage of latent diffusion: `vae` (train the KL autoencoder, score its reconstructions) and
`latents` (encode every split once and cache the latents for the latent-space models).

The cache is, per split, `<split>.npy`, a (N, c, h, w) float32 array read memory-mapped, and
`<split>.parquet`, its index (row, label, source image); `latents.json` beside them records the shape and
the scale factor 1 / std of the train latents (Rombach et al. 2022, Section 4.3.2), which the diffusion
model's inputs are multiplied by so that they have unit variance.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import Tensor, nn

from models.generative.vae import VAE, VAEConfig, psnr
from tasks.generative.fid import FIDConfig, FIDEvaluator, check_fid_net, derived_image_fields, image_meta
from tasks.generative.images import ImageSet, image_grid, read_images, to_model_range, to_pixels, write_png
from tasks.io import atomic_path, write_json
from tasks.layout import LATENTS_DIR, METRICS_DIR, SPLITS, VAE_DIR
from tasks.phases import in_phase
from tasks.spec import StageContext, StageSpec
from tasks.tracking import StageRun
from tasks.training import (
    TrainConfig,
    data_digest,
    load_model_with_meta,
    require_meta,
    resolve_device,
    save_model,
    train,
)


@dataclass(frozen=True)
class LatentsConfig:
    """`params/images.yaml: latents`: how the dataset is encoded into the cache."""

    batch_size: int  # images per encoder call

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def build_vae(name: str, config: dict[str, Any]) -> VAE:
    return VAE(VAEConfig(**config))


@in_phase("loading")
def load_vae(root: Path, device: torch.device | str = "cpu") -> VAE:
    """The `vae` stage's model, refused (`StaleArtefact`) unless trained on the current images."""
    path = root / VAE_DIR / "model.pt"
    _, vae, meta = load_model_with_meta(path, build_vae, device)
    require_meta(root, path, meta, image_meta(root), "vae")
    return vae


def vae_loss(model: nn.Module, batch: Tensor) -> Tensor:
    return model.training_losses(batch)["loss"]


@torch.no_grad()
def reconstruct(vae: VAE, x: Tensor, batch_size: int) -> Tensor:
    """Decode the posterior mean: what the latent cache holds, so what latent diffusion can reach."""
    device = next(vae.parameters()).device
    return torch.cat(
        [vae.decode(vae.encode(x[i : i + batch_size].to(device))).cpu() for i in range(0, len(x), batch_size)]
    )


@dataclass
class VAEFit:
    model: VAE
    metrics: dict[str, float]
    reconstructions: Tensor  # of the test split, model range
    val_reconstructions: Tensor  # of the val split: scored by FID against test, whose statistics hold none of them


def fit_vae(
    cfg: VAEConfig,
    train_cfg: TrainConfig,
    splits: dict[str, ImageSet],
    *,
    seed: int,
    device: torch.device,
    checkpoint: Path | None,
    run: StageRun | None,
) -> VAEFit:
    torch.manual_seed(seed)
    model = VAE(cfg)
    x = {s: to_model_range(p.pixels) for s, p in splits.items()}
    x_train = x["train"].to(device)

    def next_batch(generator: torch.Generator) -> Tensor:
        return x_train[torch.randint(0, len(x_train), (train_cfg.batch_size,), generator=generator)]

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"val_psnr": float(psnr(reconstruct(m, x["val"], 256), x["val"]).mean())}

    fingerprint = {
        "config": cfg.__dict__,
        "train": train_cfg.__dict__,
        "seed": seed,
        "n": len(x_train),
        "train_checksum": int(splits["train"].pixels.sum(dtype=np.int64)),
    }
    result = train(
        model,
        train_cfg,
        next_batch=next_batch,
        loss_fn=vae_loss,
        evaluate=evaluate,
        items_per_batch=train_cfg.batch_size,
        seed=seed,
        device=device,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        run=run,
        item_name="images",
        desc="vae",
    )
    model.eval()
    rec = reconstruct(model, x["test"], 256)
    with torch.no_grad():
        losses = model.training_losses(x["test"].to(device), torch.Generator(device).manual_seed(seed))
    metrics = {
        "test_psnr": float(psnr(rec, x["test"]).mean()),
        "test_kl": float(losses["kl"]),
        "test_reconstruction_error": float(losses["reconstruction"]),
        "train_seconds": result.train_seconds,
    }
    return VAEFit(model, metrics, rec, reconstruct(model, x["val"], 256))


@dataclass(frozen=True)
class VAEInputs:
    vae: VAEConfig
    vae_train: TrainConfig
    fid: FIDConfig


@task(name="vae", cache_policy=NO_CACHE)
def vae_task(ctx: StageContext, inputs: VAEInputs) -> dict[str, float]:
    root, run, seed, device_name = ctx.root, ctx.run, ctx.seed, ctx.device
    cfg, train_cfg, fid_cfg = inputs.vae, inputs.vae_train, inputs.fid
    device = resolve_device(device_name)
    check_fid_net(root)  # before training: the reconstructions are scored with it
    splits = {s: read_images(root, s) for s in SPLITS}
    out = root / VAE_DIR
    fit = fit_vae(cfg, train_cfg, splits, seed=seed, device=device, checkpoint=out / "checkpoint.pt", run=run)
    save_model(out / "model.pt", "vae", cfg, fit.model, meta=image_meta(root))
    # FID of the reconstructions: the best a latent model decoded by this VAE can score. Reconstructed test
    # images would be scored against their own originals' statistics, which flatters them, so the val images
    # are reconstructed and scored against test; the val originals' own FID against test is their floor.
    evaluator = FIDEvaluator.load(root, fid_cfg, device)
    val_originals = to_model_range(splits["val"].pixels)
    metrics = {
        **fit.metrics,
        "reconstruction_fid": evaluator.fid(fit.val_reconstructions).fid,
        "reconstruction_fid_originals": evaluator.fid(val_originals).fid,
        "reconstruction_fid_images": float(len(val_originals)),
        "fid_floor": evaluator.floor,
    }
    test = splits["test"]
    shown = np.concatenate([np.flatnonzero(test.labels == k)[:2] for k in range(len(test.classes))])
    pairs = np.stack([test.pixels[shown], to_pixels(fit.reconstructions[shown])], axis=1).reshape(
        -1, *test.pixels.shape[1:]
    )
    grid = write_png(image_grid(pairs, columns=8), out / "reconstructions.png", upscale=2)
    write_json(root / METRICS_DIR / "vae.json", metrics)
    run.log_metrics(metrics)
    run.log_artifact(grid, "samples")
    print(
        f"vae: test PSNR {metrics['test_psnr']:.2f} dB, reconstruction FID {metrics['reconstruction_fid']:.3f} "
        f"(val images vs test; the originals {metrics['reconstruction_fid_originals']:.3f}), "
        f"latent {cfg.latent_channels}x{test.pixels.shape[2] // cfg.downsample_factor}"
        f"x{test.pixels.shape[3] // cfg.downsample_factor}"
    )
    return metrics


# ------------------------------------------------------------------------------------ latents


@torch.no_grad()
def encode(vae: VAE, x: Tensor, batch_size: int) -> Tensor:
    device = next(vae.parameters()).device
    return torch.cat([vae.encode(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


@dataclass(frozen=True)
class LatentsInputs:
    latents: LatentsConfig


@task(name="latents", cache_policy=NO_CACHE)
def latents_task(ctx: StageContext, inputs: LatentsInputs) -> dict[str, float]:
    root, run, device_name, cfg = ctx.root, ctx.run, ctx.device, inputs.latents
    device = resolve_device(device_name)
    vae = load_vae(root, device)
    start = time.perf_counter()
    latents = {
        s: (encode(vae, to_model_range(images.pixels), cfg.batch_size).numpy(), images)
        for s, images in ((s, read_images(root, s)) for s in SPLITS)
    }
    seconds = time.perf_counter() - start
    train_z = latents["train"][0]
    scale = float(1.0 / train_z.std())
    meta = {
        "scale_factor": scale,
        "shape": list(train_z.shape[1:]),
        "train_mean": float(train_z.mean()),
        "train_std": float(train_z.std()),
        "encode_seconds": seconds,
        **{f"{s}_latents": len(z) for s, (z, _) in latents.items()},
    }
    out = root / LATENTS_DIR
    with atomic_path(out, directory=True) as tmp:
        for split, (z, images) in latents.items():
            with open(tmp / f"{split}.npy", "wb") as f:
                np.save(f, z.astype(np.float32))
            pd.DataFrame({"row": np.arange(len(z)), "label": images.labels, "source": images.sources}).to_parquet(
                tmp / f"{split}.parquet", index=False
            )
        # The cache also records the images it encodes, which `read_latents` checks against the current ones.
        # The timing stays in the metrics only: the cache's record is data, the same bytes on every rerun.
        recorded = {**{k: v for k, v in meta.items() if k != "encode_seconds"}, **image_meta(root)}
        (tmp / "latents.json").write_text(json.dumps(recorded, indent=2) + "\n")
    write_json(root / METRICS_DIR / "latents.json", meta)
    run.log_metrics({k: float(v) for k, v in meta.items() if not isinstance(v, list)})
    print(
        f"latents: {'x'.join(map(str, meta['shape']))} per image, scale factor {scale:.4f}, "
        f"encoded {sum(len(z) for z, _ in latents.values())} images in {seconds:.1f} s"
    )
    return meta


@dataclass
class LatentSplit:
    latents: np.ndarray  # (N, c, h, w) float32, memory-mapped, unscaled
    labels: np.ndarray  # (N,) int64
    scale_factor: float


def latents_meta(root: Path) -> dict[str, Any]:
    """The cache's `latents.json`, refused (`StaleArtefact`) unless it encodes the current images."""
    path = root / LATENTS_DIR / "latents.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the latents stage first")
    meta = json.loads(path.read_text())
    require_meta(root, path, {k: str(v) for k, v in meta.items()}, image_meta(root), "latents")
    return meta


def latents_digest(root: Path) -> str:
    """What a latent model depends on in the cache: sha256 (16 hex) of the latent shape and scale factor."""
    meta = latents_meta(root)
    return data_digest({"shape": [int(d) for d in meta["shape"]], "scale_factor": repr(float(meta["scale_factor"]))})


def latent_model_meta(root: Path) -> dict[str, str]:
    """What a latent-space model records it was trained on: the images' digest and the latents cache's."""
    return {**image_meta(root), "latents_digest": latents_digest(root)}


@in_phase("loading")
def read_latents(root: Path, split: str) -> LatentSplit:
    directory = root / LATENTS_DIR
    meta = latents_meta(root)
    latents = np.load(directory / f"{split}.npy", mmap_mode="r")
    index = pd.read_parquet(directory / f"{split}.parquet")
    if len(index) != len(latents):
        raise ValueError(f"{directory / f'{split}.parquet'}: {len(index)} rows for {len(latents)} latents")
    return LatentSplit(latents, index["label"].to_numpy().astype(np.int64), float(meta["scale_factor"]))


SPECS = [
    StageSpec(
        name="vae",
        family="generative",
        task=vae_task,
        inputs=VAEInputs,
        derive=lambda root, item: derived_image_fields("vae", ("in_channels",))(root),
        placeholders={"vae": {"in_channels": 1}},
    ),
    StageSpec(name="latents", family="generative", task=latents_task, inputs=LatentsInputs, seeded=False),
]
