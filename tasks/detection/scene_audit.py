"""`scene_audit`: how much of what val and test scenes show, train scenes already showed, read from the
`scenes` stage's output (data/prepared/scenes).

- Built-in scenes record, per box, the scikit-learn digit it was drawn from (`digit_index`). The audit
  takes the distinct digits each split's scenes drew and checks every val and test digit against the train
  digits: the same digit (the pools must be disjoint), identical pixels, or a perceptual hash within
  `near_hamming` bits (models/duplicates.py). Clutter (digit fragments and digits far below the box scale)
  is drawn from the split's own pool too, but is not recorded and is no object, so it is not audited.
- Scenes from a user COCO dataset carry no such record: the audit checks whole images instead (the
  letterboxed grayscale PNGs), identical or near.

A separate stage, not a step of `scenes`, so that auditing never retrains the detectors. Above a params
threshold it fails, naming the annotations file, the share and the first offending pair.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
from tasks.digits import load_digit_images
from tasks.errors import ContaminationError
from tasks.io import write_json
from tasks.layout import METRICS_DIR, SCENES_DIR, SPLITS
from tasks.spec import StageContext, StageSpec

HELD_OUT = ("val", "test")


def read_annotations(root: Path, split: str) -> dict:
    path = root / SCENES_DIR / split / "annotations.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the scenes stage first (dvc repro scenes)")
    return json.loads(path.read_text(encoding="utf-8"))


def drawn_digits(cocos: dict[str, dict]) -> dict[str, np.ndarray] | None:
    """The sorted distinct `digit_index` values each split's boxes record; None unless every box has one."""
    anns = [a for coco in cocos.values() for a in coco["annotations"]]
    if not anns or any("digit_index" not in a for a in anns):
        return None
    return {
        s: np.unique(np.array([a["digit_index"] for a in c["annotations"]], dtype=np.int64)) for s, c in cocos.items()
    }


def first_scene_with(coco: dict, digit: int) -> str:
    """The file name of the first image (by id) with a box drawn from `digit`."""
    ids = sorted(a["image_id"] for a in coco["annotations"] if a.get("digit_index") == digit)
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    return names.get(ids[0], "?") if ids else "?"


@dataclass(frozen=True)
class SceneAudit:
    unit: str  # "digits" (built-in scenes) | "images" (a user COCO dataset)
    audits: dict[str, SplitAudit]
    metrics: dict[str, float]
    names: dict[str, list[str]]  # per split, what each audited item is called in messages
    digit_ids: dict[str, np.ndarray] | None = None  # per split, the digit index of each audited item


def audit_digit_pools(
    drawn: dict[str, np.ndarray], digits: np.ndarray, labels: np.ndarray, near_hamming: int
) -> SceneAudit:
    """The digits that val and test scenes drew against those train scenes drew. `digits` (N, 8, 8) in [0, 1]
    as tasks/digits.py reads them; hashed and compared as uint8 pixels, as the images stage stores them."""
    pixels = np.round(np.asarray(digits) * 255).astype(np.uint8)
    train = pixels[drawn["train"]]
    hashes = phash(train)
    audits = {s: audit_split(train, pixels[drawn[s]], near_hamming, hashes) for s in HELD_OUT}
    metrics = audit_metrics(audits, "digits")
    for s in HELD_OUT:  # the same sklearn digit in both: the pools were not disjoint
        metrics[f"{s}_digits_shared_with_train"] = float(len(np.intersect1d(drawn[s], drawn["train"])))
    metrics["train_same_class_pairs_near_share"] = same_class_near_rate(
        hashes, labels[drawn["train"]], train, near_hamming
    )
    names = {s: [f"load_digits()[{int(i)}]" for i in drawn[s]] for s in SPLITS}
    return SceneAudit("digits", audits, metrics, names, drawn)


def read_scene_images(root: Path, split: str, coco: dict) -> tuple[np.ndarray, list[str]]:
    """A split's images in id order as (N, H, W) uint8 grayscale, and their file names."""
    from PIL import Image

    records = sorted(coco["images"], key=lambda im: im["id"])
    arrays = []
    for im in records:
        with Image.open(root / SCENES_DIR / split / im["file_name"]) as png:
            arrays.append(np.asarray(png.convert("L")))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ContaminationError(
            f"{SCENES_DIR}/{split}/annotations.json: images: sizes differ ({sorted(shapes)}); a split has one size"
        )
    stack = np.stack(arrays) if arrays else np.zeros((0, 1, 1), dtype=np.uint8)
    return stack, [im["file_name"] for im in records]


def audit_scene_images(images: dict[str, np.ndarray], names: dict[str, list[str]], near_hamming: int) -> SceneAudit:
    hashes = phash(images["train"])
    audits = {s: audit_split(images["train"], images[s], near_hamming, hashes) for s in HELD_OUT}
    return SceneAudit("images", audits, audit_metrics(audits, "images"), names)


def breach_message(breach: Breach, found: SceneAudit, cocos: dict[str, dict], cfg: AuditConfig) -> str:
    audit, split, unit = breach.audit, breach.split, found.unit
    if breach.kind == "exact":
        i, j = audit.exact_example()  # type: ignore[misc]  # a breach has at least one
        count, what, pair = audit.exact, f"an identical train {unit[:-1]}", "identical pixels"
    else:
        i, j, distance = audit.near_example()  # type: ignore[misc]
        count, what, pair = audit.near, f"a train {unit[:-1]} within {cfg.near_hamming} bits", f"Hamming {distance}"
    held, train = found.names[split][i], found.names["train"][j]
    if found.digit_ids is not None:  # where each digit shows, so the pair can be looked at
        held += f" in {split}/{first_scene_with(cocos[split], int(found.digit_ids[split][i]))}"
        train += f" in train/{first_scene_with(cocos['train'], int(found.digit_ids['train'][j]))}"
        fix = "change scenes.seed or the pool fractions"
    else:
        held, train = f"{split}/{held}", f"train/{train}"
        fix = "remove the duplicates from your COCO images, change scenes.seed"
    return (
        f"{SCENES_DIR}/{split}/annotations.json: {split}_{unit}_{breach.kind}_in_train_share = {breach.share:.4f} "
        f"exceeds scene_audit.max_{breach.kind}_share = {breach.limit:g}: {count} of {audit.items} {split} {unit} "
        f"have {what} by perceptual hash (e.g. {held} and {train}, {pair}); {fix}, or raise the threshold"
    )


@dataclass(frozen=True)
class SceneAuditInputs:
    scene_audit: AuditConfig


@task(name="scene_audit", cache_policy=NO_CACHE)
def scene_audit_task(ctx: StageContext, inputs: SceneAuditInputs) -> dict[str, float]:
    root, cfg, run = ctx.root, inputs.scene_audit, ctx.run
    cocos = {s: read_annotations(root, s) for s in SPLITS}
    drawn = drawn_digits(cocos)
    if drawn is not None:
        digits, labels = load_digit_images()
        found = audit_digit_pools(drawn, digits, labels, cfg.near_hamming)
    else:
        read = {s: read_scene_images(root, s, cocos[s]) for s in SPLITS}
        found = audit_scene_images(
            {s: r[0] for s, r in read.items()}, {s: r[1] for s, r in read.items()}, cfg.near_hamming
        )
    run.log_metrics(found.metrics)  # before any failure, so the failed run in MLflow shows the audit
    print(
        f"scene_audit ({found.unit}): "
        + "; ".join(
            f"{s} {a.exact}/{a.items} identical, {a.near}/{a.items} near (<= {cfg.near_hamming} bits) to train"
            for s, a in found.audits.items()
        )
    )
    breach = first_breach(found.audits, cfg)
    if breach is not None:
        raise ContaminationError(breach_message(breach, found, cocos, cfg))
    write_json(root / METRICS_DIR / "scene_audit.json", found.metrics)
    return found.metrics


SPEC = StageSpec(name="scene_audit", family="detection", task=scene_audit_task, inputs=SceneAuditInputs, seeded=False)
