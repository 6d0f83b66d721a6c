"""`kiln sample`'s helpers: stage names, labels, edge maps, the files written, and the input errors raised before
any model is read (the sampling itself runs on trained artefacts in tests/pipeline/test_inference.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.errors import InputError
from tasks.generative.sampling import (
    MissingArtefact,
    SampleRequest,
    Samples,
    UnknownSampleStage,
    parse_label,
    read_edge_map,
    sample_stage,
    sampleable_stages,
    unknown_sample_stage,
    write_samples,
)


def test_sampleable_stages_are_every_generator_item_and_the_conditioned_stages():
    assert sampleable_stages() == [
        "diffusion@ddpm",
        "diffusion@sde_vp",
        "diffusion@sde_ve",
        "diffusion@ldm",
        "diffusion@dit_rf",
        "ldm_text",
        "controlnet",
        "guidance",
        "nflow@realnvp",
        "nflow@cnf",
    ]


@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("diffusion@ddpn", "diffusion@ddpm"),
        ("ddpm", "diffusion@ddpm"),  # the item alone
        ("realnvp", "nflow@realnvp"),
        ("ldm_txt", "ldm_text"),
        ("zzz", None),
    ],
)
def test_an_unknown_stage_lists_the_sampleable_ones_and_the_closest(name, suggestion):
    message = str(unknown_sample_stage(name, sampleable_stages()))
    assert message.startswith(f"no sampleable stage {name!r}")
    assert ("did you mean" in message) == (suggestion is not None)
    if suggestion:
        assert f"did you mean {suggestion!r}?" in message
    assert message.endswith(f"(sampleable stages: {', '.join(sampleable_stages())})")


def test_a_label_is_a_class_name_or_an_index():
    classes = ["cat", "dog", "7"]
    assert parse_label("dog", classes) == 1
    assert parse_label("1", classes) == 1
    assert parse_label("7", classes) == 2  # a class named like a number is that class
    for bad in ("3", "-1", "bird", ""):
        with pytest.raises(InputError, match=f"--label {bad!r}: no such class \\(classes: cat, dog, 7\\)"):
            parse_label(bad, classes)


def test_an_edge_map_is_thresholded_to_zero_and_one(tmp_path):
    gray = np.zeros((4, 6), dtype=np.uint8)
    gray[1, 2], gray[2, 3], gray[3, 0] = 255, 128, 127
    Image.fromarray(gray).convert("RGB").save(tmp_path / "edges.png")  # any mode: read as gray
    edges = read_edge_map(tmp_path / "edges.png", (1, 4, 6))
    assert edges.shape == (1, 1, 4, 6) and edges.dtype == torch.float32
    assert edges[0, 0].nonzero().tolist() == [[1, 2], [2, 3]]


def test_an_edge_map_of_another_size_or_no_image_is_one_line(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="edge map of 8x8 px; controlnet was trained on 16x16 images"):
        read_edge_map(tmp_path / "small.png", (1, 16, 16))
    (tmp_path / "notes.png").write_text("not a png")
    with pytest.raises(InputError, match="notes.png: not a readable image"):
        read_edge_map(tmp_path / "notes.png", (1, 16, 16))
    with pytest.raises(InputError, match="absent.png: no such file"):
        read_edge_map(tmp_path / "absent.png", (1, 16, 16))


@pytest.mark.parametrize("channels", [1, 3])
def test_samples_are_written_one_png_each_plus_a_grid(tmp_path, channels):
    images = torch.linspace(-1, 1, 3 * channels * 4 * 5).reshape(3, channels, 4, 5)
    paths = write_samples(Samples("x", images, ["a", "b", "c"], "how"), tmp_path / "out")
    assert [p.name for p in paths] == ["000.png", "001.png", "002.png", "grid.png"]
    first = np.asarray(Image.open(paths[0]))
    assert first.shape == ((4, 5) if channels == 1 else (4, 5, 3))
    expected = ((images[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(first, expected[0] if channels == 1 else expected.transpose(1, 2, 0))
    grid = np.asarray(Image.open(paths[-1]))
    assert grid.shape[:2] == (2 * (4 + 2), 2 * (3 * 6 + 1))  # one row of three, 1 px gaps, upscaled twice


@pytest.mark.parametrize(
    "request_, error, message",
    [
        (SampleRequest("diffusion@ddpx"), UnknownSampleStage, "no sampleable stage 'diffusion@ddpx'"),
        (SampleRequest("diffusion@ddpm", n=0), InputError, "-n must be >= 1, got 0"),
        (
            SampleRequest("diffusion@ddpm"),
            MissingArtefact,
            "no trained model for diffusion@ddpm at data/models/diffusion/ddpm/model.pt; "
            "run `dvc repro diffusion@ddpm` first",
        ),
        (
            SampleRequest("nflow@cnf"),
            MissingArtefact,
            "no trained model for nflow@cnf at data/models/nflow/cnf/model.pt; run `dvc repro nflow@cnf` first",
        ),
        (SampleRequest("guidance"), MissingArtefact, "run `dvc repro guidance` first"),
        (SampleRequest("nflow@realnvp", label="3"), InputError, "--label does not apply to nflow@realnvp"),
        (SampleRequest("diffusion@ldm", prompt="a seven"), InputError, "--prompt does not apply to diffusion@ldm"),
        (SampleRequest("ldm_text"), InputError, "ldm_text is text-conditioned: give --prompt TEXT"),
        (SampleRequest("ldm_text", prompt="a seven", label="7"), InputError, "--label does not apply to ldm_text"),
        (SampleRequest("controlnet"), InputError, "controlnet is conditioned on an edge map: give --edges FILE"),
    ],
)
def test_bad_requests_are_refused_before_any_model_is_read(tmp_path: Path, request_, error, message):
    # An empty project: whatever is refused here is refused without reading an artefact.
    with pytest.raises(error) as raised:
        sample_stage(tmp_path, request_)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)
