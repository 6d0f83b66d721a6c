"""`image_audit`: how many val and test images train already holds, exactly (identical pixels) or nearly
(a perceptual hash within `near_hamming` bits; models/duplicates.py), read from the `images` stage's splits.

A separate stage, not a step of `images`, so that auditing never reruns the image models: it reads
data/prepared/images and writes only its metrics. Above a params threshold it fails, naming the split file,
the share and the first offending pair.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from models.duplicates import (
    AuditConfig,
    Breach,
    SplitAudit,
    audit_metrics,
    audit_split,
    first_breach,
    phash,
    same_class_near_rate,
)
from tasks.errors import ContaminationError
from tasks.generative.images import ImageSet, read_images
from tasks.io import write_json
from tasks.layout import IMAGES_DIR, METRICS_DIR
from tasks.spec import StageContext, StageSpec

HELD_OUT = ("val", "test")


def audit_images(splits: dict[str, ImageSet], near_hamming: int) -> tuple[dict[str, SplitAudit], dict[str, float]]:
    """Every val and test image against train, and the metrics: per split the counts and shares of images
    with an identical and with a near-duplicate train image (`{split}_images_{exact,near}_in_train[_share]`),
    and `train_same_class_pairs_near_share`, the share of pairs of different same-class train images the
    threshold calls near (how much of the near figure similar-looking images can explain)."""
    train = splits["train"]
    hashes = phash(train.pixels)
    audits = {s: audit_split(train.pixels, splits[s].pixels, near_hamming, hashes) for s in HELD_OUT}
    metrics = audit_metrics(audits, "images")
    metrics["train_same_class_pairs_near_share"] = same_class_near_rate(
        hashes, train.labels, train.pixels, near_hamming
    )
    return audits, metrics


def breach_message(breach: Breach, splits: dict[str, ImageSet], cfg: AuditConfig) -> str:
    audit, split = breach.audit, breach.split
    if breach.kind == "exact":
        i, j = audit.exact_example()  # type: ignore[misc]  # a breach has at least one
        count, what, pair = audit.exact, "an identical train image", "identical pixels"
    else:
        i, j, distance = audit.near_example()  # type: ignore[misc]
        count, what, pair = audit.near, f"a train image within {cfg.near_hamming} bits", f"Hamming {distance}"
    held, train = splits[split], splits["train"]
    return (
        f"{IMAGES_DIR}/{split}.parquet: {split}_images_{breach.kind}_in_train_share = {breach.share:.4f} exceeds "
        f"image_audit.max_{breach.kind}_share = {breach.limit:g}: {count} of {audit.items} {split} images have "
        f"{what} by perceptual hash (e.g. {split} row {i} [{held.sources[i]}] and train row {j} "
        f"[{train.sources[j]}], {pair}); remove the duplicates from your images, change images.split_seed, "
        "or raise the threshold"
    )


@dataclass(frozen=True)
class ImageAuditInputs:
    image_audit: AuditConfig


@task(name="image_audit", cache_policy=NO_CACHE)
def image_audit_task(ctx: StageContext, inputs: ImageAuditInputs) -> dict[str, float]:
    root, cfg, run = ctx.root, inputs.image_audit, ctx.run
    splits = {s: read_images(root, s) for s in ("train", *HELD_OUT)}
    audits, metrics = audit_images(splits, cfg.near_hamming)
    run.log_metrics(metrics)  # before any failure, so the failed run in MLflow shows the audit
    print(
        "image_audit: "
        + "; ".join(
            f"{s} {a.exact}/{a.items} identical, {a.near}/{a.items} near (<= {cfg.near_hamming} bits) to train"
            for s, a in audits.items()
        )
    )
    breach = first_breach(audits, cfg)
    if breach is not None:
        raise ContaminationError(breach_message(breach, splits, cfg))
    write_json(root / METRICS_DIR / "image_audit.json", metrics)
    return metrics


SPEC = StageSpec(name="image_audit", family="generative", task=image_audit_task, inputs=ImageAuditInputs, seeded=False)
