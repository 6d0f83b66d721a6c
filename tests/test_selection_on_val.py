"""Selection on validation, reporting on test, checked on the committed results of the default run
(data/metrics and data/plots are in git): no metric of any stage is a "best" over test numbers, and the
guidance scale that each guidance kind reports on test is the one of lowest validation FID in its sweep."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METRICS = sorted((REPO / "data" / "metrics").rglob("*.json"))


def keys(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from keys(value, f"{prefix}{key}.")
    elif isinstance(tree, list):
        for item in tree:
            yield from keys(item, prefix)
    else:
        yield prefix.rstrip(".")


def test_the_default_run_committed_its_metrics():
    names = {p.relative_to(REPO / "data" / "metrics").as_posix() for p in METRICS}
    assert {"guidance.json", "lm_compare.json", "map.json", "corpus.json"} <= names


def flagged_rows(tree):
    """Rows of a sweep that carry a `selected` flag."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from flagged_rows(value)
    elif isinstance(tree, list):
        for item in tree:
            if isinstance(item, dict) and "selected" in item:
                yield item
            yield from flagged_rows(item)


@pytest.mark.parametrize("path", METRICS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_metric_is_a_best_over_test(path):
    tree = json.loads(path.read_text())
    for key in keys(tree):
        name = key.rsplit(".", 1)[-1].lower()
        if "best" in name:
            assert "val" in name, f"{path.name}: {key} is a best without its split"
        elif "select" in name and name != "selected":
            # The choice is named for the split it was made on; what it earned on test says "test".
            assert "val" in name or "test" in name or name.endswith("selected_scale"), f"{path.name}: {key}"
    for row in flagged_rows(tree):  # a sweep that selects holds validation numbers only
        assert not [k for k in row if k.startswith("test")], f"{path.name}: a selecting sweep holds {row}"


def test_each_guidance_kind_reports_on_test_the_scale_of_lowest_validation_fid():
    metrics = json.loads((REPO / "data/metrics/guidance.json").read_text())
    with open(REPO / "data/plots/guidance.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    assert not [c for c in rows[0] if c.startswith("test")], "the sweep table holds test numbers"
    kinds = sorted({r["guidance"] for r in rows})
    assert kinds, "no guidance sweep"
    for kind in kinds:
        part = [r for r in rows if r["guidance"] == kind]
        lowest = min(part, key=lambda r: (float(r["val_fid"]), float(r["scale"])))
        assert [r["scale"] for r in part if r["selected"] == "True"] == [lowest["scale"]]
        assert metrics[f"{kind}_selected_scale"] == pytest.approx(float(lowest["scale"]))
        assert metrics[f"{kind}_selected_val_fid"] == pytest.approx(float(lowest["val_fid"]))
        assert f"{kind}_selected_test_fid" in metrics
