"""`kiln sample` and `kiln detect` on smoke-trained artefacts in a copy of the repo: every generator kind writes
its images, labels and seeds are honoured, the detector finds and draws, and each bad input is one line, exit 2.

One `kiln run` trains what the commands read (diffusion@sde_ve and the one_stage detector stay untrained, the
missing artefacts of the error tests); the thundernet export is the `onnx` stage's own `export_onnx`, without the
rest of that stage (parity, int8, latency, registry: tests/ops/test_mlflow_ui.py). The commands run
in this process through `flows.cli.main` (a `kiln` process costs seconds of imports each); one runs as a process,
to hold the real exit status and stderr. The last tests load the generators that run registered in MLflow
(tasks/generative/logged_models.py) from the store alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tasks.generative.logged_models import input_columns, registered_name
from tasks.tracking import pinned_requirements
from tests.pipeline.helpers import kiln_run, set_params, sh, smoke_project

pytestmark = pytest.mark.pipeline

TRAINED = (
    "diffusion@ddpm",
    "diffusion@sde_vp",
    "diffusion@ldm",
    "diffusion@dit_rf",
    "ldm_text",
    "controlnet",
    "guidance",
    "nflow@realnvp",
    "nflow@cnf",
    "detector@thundernet",
)


# Shorter still than the smoke profile: these tests read the artefacts, they do not judge them.
SHORT_TRAINING = dict(steps=4, eval_every=4, checkpoint_every=4, warmup_steps=1)
TRAINING_SECTIONS = {
    "images.yaml": (
        "fid_net_train",
        "vae_train",
        "diffusion_train",
        "ldm_train",
        "dit_train",
        "ldm_text_train",
        "guidance_train",
        "controlnet_train",
    ),
    "nflow.yaml": ("realnvp_train", "cnf_train"),
    "detection.yaml": ("detector_train",),
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root) -> Path:
    project = smoke_project(repo_root, tmp_path_factory.mktemp("kiln") / "repo")
    for file, sections in TRAINING_SECTIONS.items():
        for section in sections:
            set_params(project, file, section, **SHORT_TRAINING)
    set_params(project, "images.yaml", "fid", samples=20, batch_size=20)
    set_params(project, "images.yaml", "diffusion_eval", steps=[2], flow_steps=[1])
    set_params(project, "nflow.yaml", "nflow_eval", bpd_images=10, bpd_batch_size=10)
    kiln_run(project, *TRAINED)
    from tasks.detection.detectors import load_checked_detector, read_split
    from tasks.detection.onnx_export import export_onnx

    model = load_checked_detector(project, "thundernet", read_split(project, "test"))
    export_onnx(model, model.config.input_size, project / "data/models/onnx/thundernet.onnx")
    return project


@pytest.fixture
def kiln(project, monkeypatch, capsys, one_torch_thread):
    """`kiln ARGS...` in this process, in the project: (exit status, stdout, stderr)."""
    monkeypatch.chdir(project)
    handler = signal.getsignal(signal.SIGTERM)  # main() installs its own

    def run(*args: str) -> tuple[int, str, str]:
        from flows.cli import main

        try:
            status = main(list(args))
        finally:
            signal.signal(signal.SIGTERM, handler)
        out, err = capsys.readouterr()
        return status, out, err

    return run


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.mark.parametrize(
    "stage, extra",
    [
        ("diffusion@ddpm", ()),  # pixel diffusion
        ("diffusion@sde_vp", ()),  # score SDE, predictor-corrector
        ("diffusion@ldm", ()),  # latent diffusion, decoded by the VAE
        ("diffusion@dit_rf", ()),  # DiT, rectified flow, on latents
        ("ldm_text", ("--prompt", "a handwritten seven")),
        ("guidance", ("--label", "4")),
        ("nflow@realnvp", ()),
        ("nflow@cnf", ("--steps", "2")),
    ],
)
def test_every_generator_kind_writes_its_images_and_a_grid(kiln, tmp_path, stage, extra):
    status, out, err = kiln("sample", stage, "-n", "3", "--seed", "1", "--out", str(tmp_path), *extra)
    assert status == 0, err
    images = pngs(tmp_path)
    assert sorted(images) == ["000.png", "001.png", "002.png", "grid.png"]
    for name in ("000.png", "001.png", "002.png"):
        assert images[name].shape == (16, 16) and images[name].dtype == np.uint8  # the digits: 1x16x16
    assert images["grid.png"].shape == (2 * 18, 2 * 52)  # 1 row of 3, 1 px gaps, upscaled twice
    assert f"kiln sample: 3 image(s) of 1x16x16 from {stage}" in out
    assert all(str(tmp_path / name) in out for name in images)


def test_a_seed_gives_the_same_images_and_another_seed_others(kiln, tmp_path):
    for seed, folder in (("5", "a"), ("5", "b"), ("6", "c")):
        status, _, err = kiln(
            "sample", "diffusion@ddpm", "-n", "4", "--steps", "2", "--seed", seed, "--out", str(tmp_path / folder)
        )
        assert status == 0, err
    a, b, c = (pngs(tmp_path / f) for f in "abc")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["000.png"], c["000.png"])


def test_the_label_reaches_the_class_conditional_model(kiln, tmp_path):
    # The same seed draws the same noise for each position in the batch, so image i of a --label 3 run is image i
    # of the run that cycles the classes where that run's label i is 3; --label 5 then changes some image (its
    # output layers start at zero, so a briefly trained model moves little, and not every pixel survives uint8).
    common = ("-n", "10", "--steps", "2", "--seed", "2")
    runs = {}
    for name, label in (("cycled", ()), ("three", ("--label", "3")), ("five", ("--label", "5"))):
        status, out, err = kiln("sample", "diffusion@ddpm", *common, *label, "--out", str(tmp_path / name))
        assert status == 0, err
        runs[name] = pngs(tmp_path / name)
    assert out.count("label 5") == 10
    assert np.array_equal(runs["cycled"]["003.png"], runs["three"]["003.png"])
    assert np.array_equal(runs["cycled"]["005.png"], runs["five"]["005.png"])
    assert any(not np.array_equal(runs["three"][k], runs["five"][k]) for k in runs["three"] if k != "grid.png")


def test_controlnet_samples_from_an_edge_map_of_the_training_size(kiln, project, tmp_path):
    edges = np.load(project / "data/models/controlnet/edges/test.npy")[0, 0] * 255  # a Canny map the stage wrote
    Image.fromarray(edges.astype(np.uint8)).save(tmp_path / "edges.png")
    status, out, err = kiln(
        "sample",
        "controlnet",
        "--edges",
        str(tmp_path / "edges.png"),
        "--label",
        "2",
        "-n",
        "2",
        "--out",
        str(tmp_path / "out"),
    )
    assert status == 0, err
    assert {k: v.shape for k, v in pngs(tmp_path / "out").items() if k != "grid.png"} == {
        "000.png": (16, 16),
        "001.png": (16, 16),
    }
    assert "label 2, edges edges.png" in out

    Image.new("L", (32, 32)).save(tmp_path / "big.png")
    status, _, err = kiln("sample", "controlnet", "--edges", str(tmp_path / "big.png"), "--out", str(tmp_path / "x"))
    assert status == 2 and "edge map of 32x32 px; controlnet was trained on 16x16 images" in err


def test_detect_prints_detections_and_draws_them(kiln, project, tmp_path):
    scene = project / "data/prepared/scenes/test/images/000001.png"
    rgb = tmp_path / "wide.png"  # another size and mode: letterboxed and converted to gray
    Image.open(scene).convert("RGB").resize((96, 64)).save(rgb)
    status, out, err = kiln("detect", str(scene), str(rgb), "--score-threshold", "0", "--out", str(tmp_path / "drawn"))
    assert status == 0, err
    assert "data/models/onnx/thundernet.onnx: 64x64 gray input" in out
    assert f"{scene} (64x64): " in out and f"{rgb} (96x64): " in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and "[" in line]
    assert rows, out  # a smoke detector scores every box low, but at threshold 0 it keeps its NMS survivors
    names = {str(d) for d in range(10)}
    assert all(row[0] in names and 0.0 <= float(row[1]) <= 1.0 for row in rows)
    drawn = pngs(tmp_path / "drawn")
    assert drawn["000001.detections.png"].shape == (256, 256, 3)  # upscaled 4x, in colour
    assert drawn["wide.detections.png"].shape == (128, 192, 3)


def test_detect_loads_a_registered_model_by_uri(kiln, project, tmp_path, monkeypatch):
    import mlflow
    import mlflow.onnx
    import onnx

    # Registered as the onnx stage registers it (kiln-<name>, alias newest), into the project's own store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    experiment = mlflow.MlflowClient().get_experiment_by_name("detection")  # the store keeps no Default experiment
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name="register-for-test"):
        info = mlflow.onnx.log_model(
            onnx.load(str(project / "data/models/onnx/thundernet.onnx")),
            name="thundernet",
            registered_model_name="kiln-test-thundernet",
            pip_requirements=pinned_requirements("mlflow", "numpy", "onnx", "onnxruntime"),  # none inferred: 3 s
        )
    mlflow.MlflowClient().set_registered_model_alias("kiln-test-thundernet", "newest", info.registered_model_version)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # kiln detect finds the store from the project's params
    scene = project / "data/prepared/scenes/test/images/000002.png"
    by_path = kiln("detect", str(scene), "--score-threshold", "0")
    by_uri = kiln("detect", "--model", "models:/kiln-test-thundernet@newest", str(scene), "--score-threshold", "0")
    assert by_uri[0] == 0, by_uri[2]
    assert by_uri[1].startswith("models:/kiln-test-thundernet@newest: 64x64 gray input")
    assert by_uri[1].split("\n", 1)[1] == by_path[1].split("\n", 1)[1]  # the same graph: the same detections


def test_missing_artefact_is_one_line_naming_the_stage_to_repro(project, tmp_path):
    # As a process: the exit status and stderr a user sees. diffusion@sde_ve was never trained here.
    done = sh(project, "kiln", "sample", "diffusion@sde_ve", "--out", str(tmp_path), check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "kiln sample: error: no trained model for diffusion@sde_ve at data/models/diffusion/sde_ve/model.pt; "
        "run `dvc repro diffusion@sde_ve` first"
    ]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ("sample", "ddpn", "--out", "x"),
            "kiln sample: error: no sampleable stage 'ddpn'; did you mean 'diffusion@ddpm'?",
        ),
        (
            ("sample", "diffusion@ddpm", "--label", "11", "--out", "x"),
            "kiln sample: error: --label '11': no such class",
        ),
        (("sample", "nflow@realnvp", "--label", "1", "--out", "x"), "--label does not apply to nflow@realnvp"),
        (("sample", "ldm_text", "--out", "x"), "ldm_text is text-conditioned: give --prompt TEXT"),
        (
            ("detect", "--model", "one_stage", "README.md"),
            "kiln detect: error: no trained model for onnx at data/models/onnx/one_stage.onnx; "
            "run `dvc repro onnx` first",
        ),
        (
            ("detect", "--model", "thundernt", "README.md"),
            "kiln detect: error: no detector 'thundernt'; did you mean 'thundernet'?",
        ),
        (("detect", "README.md"), "README.md: not a readable image"),
        (("detect", "no-such.png"), "no-such.png: no such file"),
        (
            ("detect", "--model", "models:/kiln-nothing@newest", "README.md"),
            "models:/kiln-nothing@newest: cannot load it from the registry",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(kiln, args, line):
    status, out, err = kiln(*args)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and line in err, err
    assert out == ""


# ---------------------------------------------------------------------------------------------------------------
# The same generators as registered MLflow models (tasks/generative/logged_models.py): the kiln run above logged
# each after its stage (flows/factory.py -> tasks/model_logging.py). Each registered version loads by
# `models:/...@newest` in a fresh process with the project's `data/` moved away, and predicts on its own input
# example: uint8 (N, H, W, C), the same images for the same seed.
LOGGED = ("diffusion@ddpm", "diffusion@ldm", "nflow@realnvp")


def test_each_generator_is_registered_with_alias_signature_description_and_tags(project):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    for stage in LOGGED:
        name = registered_name(stage)
        assert name == "kiln-gen-" + stage.replace("@", "-")
        version = client.get_model_version_by_alias(name, "newest")
        run = client.get_run(version.run_id)
        assert run.info.run_name == stage and "kiln.model_logging_error" not in run.data.tags
        assert version.tags["kiln.stage"] == stage and version.tags["kiln.profile"] == "smoke"
        assert float(version.tags["kiln.fid"]) > 0  # the headline FID the stage earned
        assert version.tags["mlflow.source.git.commit"] == run.data.tags["mlflow.source.git.commit"]
        description = client.get_registered_model(name).description
        assert all(f"`{c}`" in description for c in input_columns(stage))
        assert "uint8 array (N, 16, 16, 1)" in description
        assert f"fid {version.tags['kiln.fid']}" in version.description


LOAD_AND_PREDICT = """
import json, sys
import mlflow, numpy as np
from mlflow.models import Model

mlflow.set_tracking_uri(sys.argv[1])
out = {}
for name in sys.argv[2:]:
    uri = f"models:/{name}@newest"
    model = mlflow.pyfunc.load_model(uri)
    local = mlflow.artifacts.download_artifacts(uri)
    example = Model.load(local).load_input_example(local)
    first, again = model.predict(example), model.predict(example)
    other = example.assign(seed=example.seed + 1)
    out[name] = {
        "columns": list(example.columns),
        "n": int(example.n.sum()),
        "shape": list(first.shape),
        "dtype": str(first.dtype),
        "same": bool(np.array_equal(first, again)),
        "other_seed_differs": not np.array_equal(first, model.predict(other)),
        "range": [int(first.min()), int(first.max())],
        "schema": str(model.metadata.get_output_schema()),
    }
print("RESULT " + json.dumps(out))
"""


def test_registered_generators_load_from_the_store_without_the_project_data_and_reproduce(project, tmp_path):
    moved = project.parent / "data-moved-away"
    (project / "data").rename(moved)
    try:
        names = [registered_name(s) for s in LOGGED]
        done = subprocess.run(
            [sys.executable, "-c", LOAD_AND_PREDICT, f"sqlite:///{project / 'mlflow.db'}", *names],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    finally:
        moved.rename(project / "data")
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    for stage, name in zip(LOGGED, names, strict=True):
        got = result[name]
        assert got["columns"] == list(input_columns(stage))
        assert got["shape"] == [got["n"], 16, 16, 1] and got["dtype"] == "uint8"
        assert got["same"] and got["other_seed_differs"]
        assert 0 <= got["range"][0] <= got["range"][1] <= 255
        assert "uint8" in got["schema"] and "(-1, 16, 16, 1)" in got["schema"]
