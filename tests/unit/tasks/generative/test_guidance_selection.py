"""tasks/generative/guidance.py: the guidance scale is chosen on val FID and never on test; the report
renders the val sweep and the selected scale's test numbers."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.generative.fid import FIDConfig, FIDEvaluator
from tasks.generative.guidance import select_on_validation


def rows_where_test_disagrees() -> list[dict]:
    # Val prefers scale 2; test (riding along, as a leak would) prefers scale 4.
    return [
        {"guidance": "classifier_free", "scale": 0.0, "val_fid": 9.0, "test_fid": 9.5},
        {"guidance": "classifier_free", "scale": 2.0, "val_fid": 1.2, "test_fid": 1.9},
        {"guidance": "classifier_free", "scale": 4.0, "val_fid": 1.5, "test_fid": 0.8},
    ]


def test_selects_the_lowest_val_fid_not_the_lowest_test_fid():
    rows = rows_where_test_disagrees()
    assert min(rows, key=lambda r: r["test_fid"])["scale"] == 4.0  # test would pick another scale
    assert select_on_validation(rows)["scale"] == 2.0


def test_selection_never_reads_test_numbers():
    class NoTest(dict):
        def __getitem__(self, key):
            if "test" in key:
                raise AssertionError(f"selection read {key!r}")
            return super().__getitem__(key)

        def get(self, key, default=None):
            return self[key] if key in self else default

    rows = [NoTest(r) for r in rows_where_test_disagrees()]
    assert select_on_validation(rows)["scale"] == 2.0


def test_ties_go_to_the_smaller_scale_whatever_the_order():
    rows = [{"scale": 3.0, "val_fid": 1.0}, {"scale": 1.0, "val_fid": 1.0}, {"scale": 0.0, "val_fid": 2.0}]
    assert select_on_validation(rows)["scale"] == 1.0
    assert select_on_validation(rows[::-1])["scale"] == 1.0


def test_empty_sweep_is_an_error():
    with pytest.raises(ValueError, match="no sweep rows"):
        select_on_validation([])


def test_fid_reference_split_must_be_val_or_test(tmp_path):
    with pytest.raises(ValueError, match="'test' or 'val'"):
        FIDEvaluator.load(
            tmp_path,
            FIDConfig(samples=8, batch_size=4, inception_weights="", bound_draws=2, headline_draws=1),
            torch.device("cpu"),
            "train",
        )


def test_report_shows_the_val_sweep_and_the_selected_test_numbers(tmp_path):
    from tasks.report.report import build_report

    (tmp_path / "data" / "plots").mkdir(parents=True)
    (tmp_path / "data" / "metrics" / "diffusion").mkdir(parents=True)
    (tmp_path / "data" / "metrics" / "diffusion" / "ddpm.json").write_text(
        json.dumps({"fid": 0.64, "fid_floor": 0.25, "fid_ceiling": 219.0, "class_accuracy": 0.97})
    )
    (tmp_path / "data" / "plots" / "guidance.csv").write_text(
        "guidance,scale,val_fid,val_class_accuracy,nfe,sample_seconds,selected\n"
        "classifier_free,0.0,21.6,0.09,50,1,False\nclassifier_free,2.0,2.45,1.0,50,1,True\n"
    )
    (tmp_path / "data" / "metrics" / "guidance.json").write_text(
        json.dumps(
            {
                "val_fid_reference_images": 270.0,
                "classifier_free_selected_scale": 2.0,
                "classifier_free_selected_test_fid": 2.61,
                "classifier_free_selected_test_class_accuracy": 0.99,
            }
        )
    )
    report = build_report(tmp_path)
    text = report.markdown()
    assert "| classifier_free | 2 | 2.450 | 1.000 | yes |" in text
    assert "| classifier_free | 0 | 21.600 | 0.090 |  |" in text
    assert "| classifier_free | 2 | 2.610 | 0.990 |" in text
    assert "(270 val images)" in text
    assert "guidance.png" in report.figures
