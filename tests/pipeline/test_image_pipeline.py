"""The image family end to end in one copy of the repo (smoke profile), then what DVC, the metrics files, the
cache and MLflow hold: images -> fid_net -> vae -> latents -> diffusion@{ddpm, ldm, dit_rf} -> guidance,
dit_ablation and one training-seed replicate of ddpm; controlnet on the ddpm base; ldm_text on the latents;
the normalizing flows nflow@{realnvp, cnf}. One run for all of them: the upstream stages they share
(images, fid_net, vae, latents, ddpm) run once, not once per generator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.phases import PHASES
from tests.pipeline.helpers import kiln_run, mlflow_client, runs_of, set_params, sh, smoke_project, stale, summary

pytestmark = pytest.mark.pipeline

STAGES = [
    "images",
    "fid_net",
    "vae",
    "latents",
    "diffusion@ddpm",
    "diffusion@ldm",
    "diffusion@dit_rf",
    "dit_ablation",
    "guidance",
    "diffusion_replicate@ddpm-1",
    "controlnet",
    "ldm_text",
    "nflow@realnvp",
    "nflow@cnf",
]
FLOWS = ["realnvp", "cnf"]
TARGETS = (
    "guidance",
    "diffusion@dit_rf",
    "dit_ablation",
    "diffusion_replicate@ddpm-1",
    "controlnet",
    "ldm_text",
    *(f"nflow@{name}" for name in FLOWS),
)


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root) -> Path:
    project = smoke_project(repo_root, tmp_path_factory.mktemp("kiln") / "repo")
    set_params(project, "replicates.yaml", "replicates", diffusion=[1])  # the smoke profile has none
    return project


@pytest.fixture(scope="module")
def first_run(project):
    return kiln_run(project, *TARGETS)


def metrics(project: Path, name: str) -> dict:
    return json.loads((project / "data/metrics" / f"{name}.json").read_text())


def test_image_stages_run_and_dvc_is_clean(project, first_run):
    assert summary(first_run.stdout) == {stage: "ran" for stage in STAGES}
    assert stale(project, *TARGETS) == {}
    ran = list(summary(first_run.stdout))  # in the order of the DAG that `kiln run` walked
    for upstream, stage in (
        ("diffusion@ddpm", "controlnet"),  # the ControlNet trains on its frozen base
        ("latents", "ldm_text"),
        ("fid_net", "nflow@realnvp"),
        ("fid_net", "nflow@cnf"),
    ):
        assert ran.index(upstream) < ran.index(stage), ran
    images = metrics(project, "images")
    assert (images["train_images"], images["val_images"], images["test_images"]) == (1167, 270, 360)


def test_ddpm_logs_fid_with_floor_ceiling_and_samples_to_mlflow(project, first_run):
    run = runs_of(project, "generative", "diffusion@ddpm")[0]
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    reference = metrics(project, "fid_net")
    assert m["fid_floor"] == pytest.approx(reference["fid_floor"]) and m["fid_ceiling"] == pytest.approx(
        reference["fid_ceiling"]
    )
    assert np.isfinite(m["fid"]) and m["fid"] >= 0 and m["fid_samples"] == 40 and m["fid_feature_dim"] == 8
    assert 0 <= m["class_accuracy"] <= 1
    # FID versus sampling steps: one point per step count of the smoke sweep, for both samplers
    client = mlflow_client(project)
    for sampler in ("ancestral", "ddim"):
        history = client.get_metric_history(run.info.run_id, f"fid_{sampler}")
        assert sorted(h.step for h in history) == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/samples.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/fid_vs_steps.png"}
    grid = np.asarray(Image.open(project / "data/models/diffusion/ddpm/samples.png"))
    per_class = 4  # the smoke profile's 40 samples: 10 rows (one per class) of 4, 1 px gaps, upscaled 2x
    assert grid.shape == (2 * (10 * 17 + 1), 2 * (per_class * 17 + 1))
    sweep = metrics(project, "diffusion/ddpm")["sweep"]
    assert {(r["sampler"], r["steps"]) for r in sweep} == {(s, n) for s in ("ancestral", "ddim") for n in (2, 4)}


def test_every_stage_run_logs_where_its_seconds_went(project, first_run):
    """The phase clock (tasks/phases.py) that benchmarks/bench_stages.py splits each stage's seconds by."""
    for stage, busy in {
        "diffusion@ddpm": ("loading", "training", "evaluation", "sampling", "scoring", "io"),
        "fid_net": ("loading", "training", "scoring", "io"),
        "guidance": ("training", "sampling", "scoring", "io"),
    }.items():
        m = runs_of(project, "generative", stage)[0].data.metrics
        spent = {p: m[f"phase_{p}_seconds"] for p in PHASES}
        assert all(spent[p] > 0 for p in busy), (stage, spent)
        assert sum(spent.values()) <= m["stage_seconds"], (stage, spent, m["stage_seconds"])
    m = runs_of(project, "generative", "images")[0].data.metrics
    assert m["phase_training_seconds"] == m["phase_sampling_seconds"] == 0  # a data stage trains nothing


def test_latent_cache_records_its_scale_and_matches_the_index(project, first_run):
    cache = project / "data/cache/latents"
    meta = json.loads((cache / "latents.json").read_text())
    train = np.load(cache / "train.npy", mmap_mode="r")
    assert train.shape == (1167, *meta["shape"]) and meta["shape"][1:] == [8, 8]
    assert meta["scale_factor"] == pytest.approx(1 / float(np.asarray(train).std()), rel=1e-5)
    import pandas as pd

    index = pd.read_parquet(cache / "train.parquet")
    images = pd.read_parquet(project / "data/prepared/images/train.parquet")
    assert index["label"].tolist() == images["label"].tolist()
    ldm = runs_of(project, "generative", "diffusion@ldm")[0]
    assert ldm.data.params["ldm_unet.in_channels"] == str(meta["shape"][0])  # from the cache
    assert np.isfinite(ldm.data.metrics["fid"])


def test_guidance_sweeps_both_kinds_and_writes_the_tradeoff(project, first_run):
    report = metrics(project, "guidance")
    assert {(r["guidance"], r["scale"]) for r in report["sweep"]} == {
        ("classifier_free", 0.0),
        ("classifier_free", 2.0),
        ("classifier", 0.0),
        ("classifier", 4.0),
    }
    # classifier-free guidance runs the network twice per step
    nfe = {(r["guidance"], r["scale"]): r["nfe"] for r in report["sweep"]}
    assert nfe[("classifier_free", 2.0)] == 2 * nfe[("classifier", 4.0)] == 8
    client = mlflow_client(project)
    run = runs_of(project, "generative", "guidance")[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/guidance_tradeoff.png"}
    assert (project / "data/plots/guidance.csv").read_text().startswith("guidance,scale,val_fid,val_class_accuracy")


def test_second_run_executes_nothing(project, first_run):
    again = kiln_run(project, *TARGETS)
    assert set(summary(again.stdout).values()) == {"up to date"}


def test_dit_rf_sweeps_euler_steps_beside_the_ldm_unet(project, first_run):
    run = runs_of(project, "generative", "diffusion@dit_rf")[0]
    assert run.info.status == "FINISHED" and np.isfinite(run.data.metrics["fid"])
    assert run.data.params["dit.in_channels"] == "4" and run.data.params["dit_rf.timestep_sampling"] == "logit_normal"
    client = mlflow_client(project)
    # the comparison: the ldm UNet sampled with DDIM at the same step counts, from the same noise
    for series in ("fid_euler", "fid_ldm_ddim"):
        assert sorted(h.step for h in client.get_metric_history(run.info.run_id, series)) == [1, 2]
    sweep = metrics(project, "diffusion/dit_rf")["sweep"]
    assert {(r["sampler"], r["nfe"]) for r in sweep} == {("euler", 1), ("euler", 2), ("ldm_ddim", 1), ("ldm_ddim", 2)}


def test_dit_ablation_compares_each_sd3_choice_by_fid(project, first_run):
    report = metrics(project, "dit_ablation")
    variants = {r["variant"]: r for r in report["variants"]}
    assert list(variants) == ["baseline", "pos1d", "latent8"]  # the smoke profile's list, in order
    assert variants["latent8"]["latent_channels"] == 8 and variants["baseline"]["latent_channels"] == 4
    assert all(np.isfinite(r["fid"]) for r in variants.values())
    run = runs_of(project, "generative", "dit_ablation")[0]
    assert run.data.metrics["fid_pos1d"] == pytest.approx(variants["pos1d"]["fid"])


def test_a_pixel_generator_replicate_trains_another_seed_into_its_own_outputs(project, first_run):
    """`replicates.diffusion: [1]` adds `diffusion_replicate@<pixel generator>-1` to DVC's graph (the latent
    generators have none): ddpm again with seed runtime.seed + 1, beside the main stage's outputs."""
    from ruamel.yaml import YAML

    seed = int(YAML().load((project / "params/runtime.yaml").read_text())["runtime"]["seed"])
    listed = sh(project, "dvc", "stage", "list", "--name-only").stdout.split()
    assert [n for n in listed if n.startswith("diffusion_replicate@")] == [
        f"diffusion_replicate@{m}-1" for m in ("ddpm", "sde_vp", "sde_ve")
    ]
    main, replica = metrics(project, "diffusion/ddpm"), metrics(project, "diffusion/ddpm-1")
    assert replica["fid"] != main["fid"]  # another seed, another model
    models = project / "data/models/diffusion"
    assert (models / "ddpm-1/model.pt").read_bytes() != (models / "ddpm/model.pt").read_bytes()
    assert (project / "data/plots/diffusion/ddpm-1_fid_vs_steps.csv").is_file()
    run = runs_of(project, "generative", "diffusion_replicate@ddpm-1")[0]
    assert (run.data.params["seed"], run.data.params["replicate"]) == (str(seed + 1), "1")


def test_controlnet_metrics_outputs_and_mlflow(project, first_run):
    report = json.loads((project / "data/metrics/controlnet.json").read_text())
    for key in ("fid", "fid_base", "fid_floor", "fid_ceiling", "class_accuracy", "class_accuracy_base"):
        assert np.isfinite(report[key]), key
    for key in ("edge_f1_control", "edge_f1_base", "edge_f1_control_exact", "edge_f1_base_exact"):
        assert 0 <= report[key] <= 1, key
    assert report["edge_f1_control_exact"] <= report["edge_f1_control"]  # a tolerance only adds matches
    assert report["fid_samples"] == 40 and report["trainable_parameters"] > 0
    # Held-out conditions: 40 val images' edges, scored against all 360 test images (not their own source).
    assert report["condition_images"] == 40 and report["fid_reference_images"] == 360
    out = project / "data/models/controlnet"
    for split, n in (("train", 1167), ("val", 270), ("test", 360)):
        edges = np.load(out / "edges" / f"{split}.npy")
        assert edges.shape == (n, 1, 16, 16) and set(np.unique(edges)) <= {0, 1}
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["model"] == "controlnet" and saved["config"]["hint_channels"] == [4]
    grid = np.asarray(Image.open(out / "samples.png"))  # 4 rows of condition | controlled | base, upscaled 2x
    assert grid.shape == (2 * (4 * 17 + 1), 2 * (3 * 17 + 1))
    run = runs_of(project, "generative", "controlnet")[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["edge_f1_control"] == pytest.approx(report["edge_f1_control"])
    assert run.data.metrics["fid_floor"] == pytest.approx(report["fid_floor"])
    assert run.data.params["controlnet_train.steps"] == "10"
    client = mlflow_client(project)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} == {"samples/samples.png"}
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val_loss")]


def test_ldm_text_metrics_outputs_and_mlflow(project, first_run):
    report = json.loads((project / "data/metrics/ldm_text.json").read_text())
    for split in ("heldout", "train"):
        assert np.isfinite(report[f"{split}_fid"]) and 0 <= report[f"{split}_class_accuracy"] <= 1
    assert report["fid"] == report["heldout_fid"] and report["nfe"] == 2 * 4  # guided DDIM, the smoke 4 steps
    assert 0 < report["heldout_unk_rate"] < 1  # held-out wording meets <unk>, the class words do not
    grid = np.asarray(Image.open(project / "data/models/diffusion/ldm_text/samples.png"))
    assert grid.shape[0] == 2 * (10 * 17 + 1)  # one row per digit, upscaled 2x
    saved = torch.load(project / "data/models/diffusion/ldm_text/model.pt", weights_only=True)
    assert saved["config"]["unet"]["context_dim"] == saved["config"]["text_encoder"]["dim"] == 16
    run = runs_of(project, "generative", "ldm_text")[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["heldout_class_accuracy"] == pytest.approx(report["heldout_class_accuracy"])
    assert run.data.params["ldm_text_unet.context_dim"] == "16" and run.data.params["ldm_text_unet.num_classes"] == "0"
    client = mlflow_client(project)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} == {"samples/samples.png"}


@pytest.mark.parametrize("name", FLOWS)
def test_flow_logs_bpd_and_fid_with_floor_and_ceiling(project, first_run, name):
    report = json.loads((project / f"data/metrics/nflow/{name}.json").read_text())
    reference = json.loads((project / "data/metrics/fid_net.json").read_text())
    assert report["fid_floor"] == pytest.approx(reference["fid_floor"])
    assert report["fid_ceiling"] == pytest.approx(reference["fid_ceiling"])
    assert report["test_bpd_images"] == 40 and report["fid_samples"] == 40
    assert 0 < report["test_bpd"] < 12 and np.isfinite(report["fid"]) and report["fid"] >= 0
    run = runs_of(project, "generative", f"nflow@{name}")[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_bpd"] == pytest.approx(report["test_bpd"])
    assert run.data.metrics["fid"] == pytest.approx(report["fid"])
    assert run.data.params[f"{'realnvp' if name == 'realnvp' else 'cnf_unet'}.image_size"] == "16"  # from the data
    client = mlflow_client(project)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "samples")} == {"samples/samples.png"}
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val_loss")] == [10, 20]
    # 8 columns of 16 px images with 1 px gaps, upscaled 2x; the checkpoints load with weights_only
    grid = np.asarray(Image.open(project / f"data/models/nflow/{name}/samples.png"))
    assert grid.shape == (2 * (5 * 17 + 1), 2 * (8 * 17 + 1))
    saved = torch.load(project / f"data/models/nflow/{name}/model.pt", weights_only=True)
    assert saved["model"] == ("realnvp" if name == "realnvp" else "unet")
    assert torch.load(project / f"data/models/nflow/{name}/checkpoint.pt", weights_only=True)["step"] == 20


def test_cnf_reports_its_solver_and_trace(project, first_run):
    report = json.loads((project / "data/metrics/nflow/cnf.json").read_text())
    assert (report["trace"], report["sample_solver"], report["likelihood_solver"]) == ("hutchinson", "rk4", "rk4")
    assert report["sample_nfe"] == report["likelihood_nfe"] == 8  # 2 RK4 steps in the smoke profile


def test_a_direct_stage_run_refuses_a_model_trained_on_other_images(project, first_run):
    """Last in the module (it rebuilds the images): a direct `kiln stage` bypasses DVC's staleness, which is
    exactly when the artefact's record of its training data must stop it."""
    set_params(project, "images.yaml", "images", size=12)
    sh(project, "kiln", "stage", "images")
    before = sorted(p.name for p in (project / "data/models/vae").iterdir())

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
    assert sorted(p.name for p in (project / "data/models/vae").iterdir()) == before  # nothing trained
