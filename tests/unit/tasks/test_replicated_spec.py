"""Replicated stage specs (tasks/spec.py): their names follow DVC's matrix over items and replicate numbers,
a replicate's item splits back into item and number, and the replicate lists are validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.registry import replicate_numbers
from tasks.params import ParamsError
from tasks.spec import ReplicatesConfig, StageContext, StageSpec, replicate_item, replicate_name, replicated


def _task(ctx, inputs):
    return {}


BASE = StageSpec(name="toy", family="text", task=_task, items=("a", "b_c"))
REPLICATE = replicated(BASE, name="toy_replicate", replicates="lm")


def test_names_are_dvcs_matrix_order_and_the_main_stage_is_unchanged():
    assert BASE.stage_names([1, 2]) == ["toy@a", "toy@b_c"]  # replicate numbers mean nothing to the main stage
    assert REPLICATE.stage_names([1, 2]) == [
        "toy_replicate@a-1",
        "toy_replicate@a-2",
        "toy_replicate@b_c-1",
        "toy_replicate@b_c-2",
    ]
    assert REPLICATE.stage_names([]) == []  # an empty list: no replicate stages, as DVC expands it
    assert REPLICATE.task is BASE.task and REPLICATE.items == BASE.items


def test_a_replicate_may_cover_some_items_only():
    some = replicated(BASE, name="toy_replicate", replicates="lm", items=("b_c",))
    assert some.stage_names([1]) == ["toy_replicate@b_c-1"] and BASE.items == ("a", "b_c")
    with pytest.raises(ValueError, match=r"items \['z'\] are not items of toy"):
        replicated(BASE, name="toy_replicate", replicates="lm", items=("a", "z"))


def test_a_replicate_item_splits_into_item_and_number():
    assert REPLICATE.split_item("b_c-12") == ("b_c", 12) and BASE.split_item("b_c") == ("b_c", 0)
    for bad in ("a", "a-0", "a-x", "-1"):
        with pytest.raises(ValueError, match="ITEM-R with R >= 1"):
            REPLICATE.split_item(bad)
    ctx = StageContext(Path("."), "a", 1236, "cpu", None, replicate=2)
    assert ctx.instance == "a-2" and replicate_name("a", 0) == "a"


def test_replicate_lists_are_checked_and_read_from_the_params(tmp_path):
    with pytest.raises(ValueError, match="distinct integers >= 1"):
        ReplicatesConfig(lm=[1, 1], detector=[], diffusion=[])
    with pytest.raises(ValueError, match="distinct integers >= 1"):
        ReplicatesConfig(lm=[], detector=[0], diffusion=[])
    assert ReplicatesConfig(lm=[1, 3], detector=[], diffusion=[]).seeds("lm", 10) == [10, 11, 13]
    params = tmp_path / "params"
    params.mkdir()
    (params / "replicates.yaml").write_text("replicates:\n  lm: [2, 5]\n  detector: []\n  diffusion: []\n")
    assert replicate_numbers(REPLICATE, params) == [2, 5] and replicate_numbers(BASE, params) == []
    (params / "replicates.yaml").write_text("replicates:\n  lm: [-1]\n  detector: []\n  diffusion: []\n")
    with pytest.raises(ParamsError, match="replicates.yaml"):
        replicate_numbers(REPLICATE, params)


def test_replicate_item_inverts_replicate_name_for_replicates_only():
    items = {"ddpm", "sde_vp", "dit-rf"}
    assert [replicate_item(replicate_name(i, r), items) for i in sorted(items) for r in (1, 12)] == [
        i for i in sorted(items) for _ in (1, 12)
    ]
    # A main stage, an item that is not listed, a replicate number 0 and a non-number are no replicates.
    assert [replicate_item(n, items) for n in ("ddpm", "lstm-1", "ddpm-0", "dit-rf", "ddpm-x")] == [None] * 5
