"""dvc.yaml and the code agree: every stage runs its own flow and writes where the code says."""

import pytest
from dvc.repo import Repo

from flows.factory import stage_flow
from flows.registry import runnable_names
from tasks import layout
from tasks.detection.detectors import DETECTOR_NAMES
from tasks.generative.diffusion import GENERATOR_NAMES
from tasks.generative.normalizing_flows import NORMALIZING_FLOW_NAMES
from tasks.text.lm import LM_NAMES


@pytest.fixture(scope="module")
def stages(repo_root):
    with Repo(str(repo_root)) as repo:
        return {s.addressing: (s.cmd, {str(o.def_path) for o in s.outs}) for s in repo.index.stages}


def test_every_stage_cmd_runs_its_registered_flow(stages):
    for name, (cmd, _) in stages.items():
        assert cmd == f"kiln stage {name}"
        assert name in runnable_names()
        assert callable(stage_flow(name))


def test_stage_outputs_are_the_layout_paths(stages):
    assert stages["corpus"][1] == {layout.CORPUS_DIR, f"{layout.METRICS_DIR}/corpus.json"}
    assert stages["ngram"][1] == {
        layout.NGRAM_DIR,
        f"{layout.METRICS_DIR}/ngram.json",
        f"{layout.PLOTS_DIR}/ngram_perplexity.csv",
    }
    for name in LM_NAMES:
        assert stages[f"lm@{name}"][1] == {
            f"{layout.LM_DIR}/{name}/model.pt",
            f"{layout.LM_DIR}/{name}/checkpoint.pt",
            f"{layout.METRICS_DIR}/lm/{name}.json",
            f"{layout.PLOTS_DIR}/lm/{name}.csv",
        }
    assert stages["scenes"][1] == {layout.SCENES_DIR, f"{layout.METRICS_DIR}/scenes.json"}
    for name in DETECTOR_NAMES:
        assert stages[f"detector@{name}"][1] == {
            f"{layout.DETECTOR_DIR}/{name}/{f}" for f in ("model.pt", "checkpoint.pt", "predictions_test.json")
        } | {f"{layout.METRICS_DIR}/detector/{name}.json", f"{layout.PLOTS_DIR}/detector/{name}.csv"}
    assert stages["onnx"][1] == {layout.ONNX_DIR, f"{layout.METRICS_DIR}/onnx.json"}
    assert stages["images"][1] == {
        layout.IMAGES_DIR,
        f"{layout.PLOTS_DIR}/images_test_grid.png",
        f"{layout.METRICS_DIR}/images.json",
    }
    assert stages["latents"][1] == {layout.LATENTS_DIR, f"{layout.METRICS_DIR}/latents.json"}
    for name in GENERATOR_NAMES:
        assert stages[f"diffusion@{name}"][1] == {
            f"{layout.DIFFUSION_DIR}/{name}/{f}" for f in ("model.pt", "checkpoint.pt", "samples.png")
        } | {f"{layout.METRICS_DIR}/diffusion/{name}.json", f"{layout.PLOTS_DIR}/diffusion/{name}_fid_vs_steps.csv"}
    assert {p for p in stages["guidance"][1] if p.startswith(layout.GUIDANCE_DIR)} == {
        f"{layout.GUIDANCE_DIR}/{f}"
        for f in ("classifier.pt", "checkpoint.pt", "classifier_free_samples.png", "classifier_samples.png")
    }
    assert stages["controlnet"][1] == {
        f"{layout.CONTROLNET_DIR}/{f}" for f in ("edges", "model.pt", "checkpoint.pt", "samples.png")
    } | {f"{layout.METRICS_DIR}/controlnet.json"}
    assert stages["ldm_text"][1] == {
        f"{layout.DIFFUSION_DIR}/ldm_text/{f}" for f in ("model.pt", "checkpoint.pt", "samples.png")
    } | {f"{layout.METRICS_DIR}/ldm_text.json"}
    for name in NORMALIZING_FLOW_NAMES:
        assert stages[f"nflow@{name}"][1] == {
            f"{layout.NFLOW_DIR}/{name}/{f}" for f in ("model.pt", "checkpoint.pt", "samples.png")
        } | {f"{layout.METRICS_DIR}/nflow/{name}.json"}
    assert stages["report"][1] == {layout.REPORT_DIR}
    assert all(path.startswith("data/") for _, outs in stages.values() for path in outs)


def test_every_registered_model_has_a_stage(stages):
    assert {name for name in stages if name.startswith("lm@")} == {f"lm@{n}" for n in LM_NAMES}
    assert {name for name in stages if name.startswith("detector@")} == {f"detector@{n}" for n in DETECTOR_NAMES}
