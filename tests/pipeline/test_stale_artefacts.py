"""A model trained on other images is refused by the stages that use it, even when DVC is bypassed: train
fid_net on the smoke images, rebuild the images at another size with a direct `kiln stage images`, and a direct
`kiln stage vae` (which scores with fid_net) stops at once with one line naming the file and the rerun.

The tests of this module run in file order on one shared copy.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.pipeline.helpers import kiln_run, set_params, sh, smoke_project

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root) -> Path:
    return smoke_project(repo_root, tmp_path_factory.mktemp("kiln") / "repo")


def test_fid_net_trained_on_the_images_is_used(project):
    kiln_run(project, "fid_net")
    assert (project / "data/models/fid_net/model.pt").is_file()


def test_a_direct_stage_run_refuses_a_fid_net_trained_on_other_images(project):
    set_params(project, "images.yaml", "images", size=12)
    sh(project, "kiln", "stage", "images")  # a direct run: DVC's staleness is not consulted

    done = sh(project, "kiln", "stage", "vae", check=False)
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-4000:])
    # Prefect's own report of the failure (traceback, failed state) is held back: the error is one line.
    assert "Traceback" not in done.stderr + done.stdout and "StaleArtefact" not in done.stderr + done.stdout
    [line] = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert re.fullmatch(
        r"kiln stage: error: data/models/fid_net/model\.pt was trained on other data "
        r"\(images_digest: [0-9a-f]{16} vs [0-9a-f]{16}\): "
        r"rerun `dvc repro fid_net` \(or `kiln run --target fid_net`\)",
        line,
    ), line
    assert not (project / "data/models/vae/model.pt").exists(), "vae trained before the check"
