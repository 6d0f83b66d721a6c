"""The generators as registered MLflow models (tasks/generative/logged_models.py): one smoke `kiln run` trains a
pixel diffusion model, a latent one (decoded by the VAE) and a normalizing flow, and logs each after its stage
(flows/factory.py -> tasks/model_logging.py). Each registered version is then loaded by `models:/...@newest` in a
fresh process with the project's `data/` moved away, and predicts on its own input example: uint8 (N, H, W, C),
the same images for the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tasks.generative.logged_models import input_columns, registered_name
from tests.pipeline.helpers import kiln_run, set_params, smoke_project
from tests.pipeline.test_inference import SHORT_TRAINING, TRAINING_SECTIONS

pytestmark = pytest.mark.pipeline

LOGGED = ("diffusion@ddpm", "diffusion@ldm", "nflow@realnvp")


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root) -> Path:
    project = smoke_project(repo_root, tmp_path_factory.mktemp("kiln") / "repo")
    for file, sections in TRAINING_SECTIONS.items():
        for section in sections:
            set_params(project, file, section, **SHORT_TRAINING)
    set_params(project, "images.yaml", "fid", samples=20, batch_size=20)
    set_params(project, "images.yaml", "diffusion_eval", steps=[2], flow_steps=[1])
    set_params(project, "nflow.yaml", "nflow_eval", bpd_images=10, bpd_batch_size=10)
    done = kiln_run(project, *LOGGED)
    for stage in LOGGED:
        assert f"{stage}: model registered as {registered_name(stage)}@newest" in done.stdout + done.stderr
    return project


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
