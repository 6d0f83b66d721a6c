"""The MLflow UI shows what a stage logged: headless Chromium (Debian's chromium and chromium-driver, driven
by selenium) opens the `mlflow server` that holds a smoke stage's run (the `mlflow_server_run` fixture in
conftest.py, shared with the REST test), finds the experiment and the run, and on the run page the metric
with its value. The screenshots are kept in test-artifacts/.

The detection family end to end runs here too, once, logged to that server: scenes -> ThunderNet and the
one-stage baseline -> map -> onnx, then the report. Its tests check what DVC, the metrics files and the
registry hold, and the UI's pages of that run (the pipeline run, the report, a registered detector). One
smoke run serves both: the branch trained a second time in its own module cost about 70 s of `make test`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.ops.conftest import LOOPBACK, LoggedRun, keep_artifact, require

pytestmark = pytest.mark.pipeline

WAIT_S = 90  # the React app's first load on a busy 2-core machine


@pytest.fixture
def browser(tmp_path: Path):
    chromium = require("chromium", "apt-get install chromium")
    chromedriver = require("chromedriver", "apt-get install chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-proxy-server",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager downloads nothing.
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def test_the_mlflow_ui_shows_the_experiment_the_run_and_its_metric(
    mlflow_server_run: LoggedRun, browser, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, project = mlflow_server_run.url, mlflow_server_run.project
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("text")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'corpus'")
    value = f"{json.loads((project / 'data' / 'metrics' / 'corpus.json').read_text())['vocab_size']:g}"
    shot = tmp_path / "mlflow-ui-run.png"
    wait = WebDriverWait(browser, WAIT_S)

    def exact_text(text: str):
        return (By.XPATH, f"//*[normalize-space(text())={text!r}]")

    try:
        # The experiment's runs tab (its plain page opens on the GenAI overview) lists the run.
        browser.get(f"{url}/#/experiments/{experiment.experiment_id}/runs")
        wait.until(ec.visibility_of_element_located(exact_text("text")))
        wait.until(ec.visibility_of_element_located(exact_text("corpus")))

        # The run page shows the metric, and its value in the same row.
        browser.get(f"{url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}")
        wait.until(ec.visibility_of_element_located(exact_text(run.info.run_id)))
        name = wait.until(ec.visibility_of_element_located(exact_text("vocab_size")))
        row = name.find_element(By.XPATH, f"./ancestor::*[contains(normalize-space(.), '{value}')][1]")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)  # for the screenshot
    finally:
        browser.save_screenshot(str(shot))
        kept = keep_artifact(shot, shot.name)
        print(f"screenshot: {kept}")
    # The nearest element holding both is the metric's row, not the whole page.
    assert row.text.split() == ["vocab_size", value], f"metric row {row.text!r}; screenshot {kept}"


# ------------------------------------------------------- the pipeline view, the report, the registry

DETECTION = ["scenes", "detector@thundernet", "detector@one_stage", "map", "onnx"]


@dataclass(frozen=True)
class DetectionRun:
    url: str
    project: Path
    parent_id: str  # the `kiln run` parent run
    report_id: str  # the `report` stage run
    output: str  # what the `kiln run` printed, its summary table last


@pytest.fixture(scope="module")
def detection_run(mlflow_server_run: LoggedRun) -> DetectionRun:
    """The detection branch as one `kiln run` (five stage runs nested under its parent run, the detectors
    registered) and then the `report` stage, logged to the same server as the `corpus` run."""
    from mlflow.tracking import MlflowClient

    from tests.pipeline.helpers import kiln_run, sh

    url, project = mlflow_server_run.url, mlflow_server_run.project
    env = {"MLFLOW_TRACKING_URI": url, "OMP_NUM_THREADS": "1", **LOOPBACK}
    done = kiln_run(project, "onnx", "map", env=env)
    sh(project, "kiln", "stage", "report", env=env)
    client = MlflowClient(url)
    (parent,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    (report,) = client.search_runs([client.get_experiment_by_name("report").experiment_id])
    return DetectionRun(url, project, parent.info.run_id, report.info.run_id, done.stdout)


def test_every_detection_stage_runs_and_dvc_is_clean(detection_run: DetectionRun):
    from tests.pipeline.helpers import stale, summary

    project = detection_run.project
    assert summary(detection_run.output) == {stage: "ran" for stage in DETECTION}
    assert stale(project, "onnx", "map") == {}
    coco = json.loads((project / "data/prepared/scenes/test/annotations.json").read_text())
    assert len(coco["images"]) == 16 and coco["annotations"]


def test_map_metrics_are_coco_summaries_of_both_detectors(detection_run: DetectionRun):
    project = detection_run.project
    summaries = json.loads((project / "data/metrics/map.json").read_text())
    assert set(summaries) == {"thundernet", "one_stage"}
    for summary_ in summaries.values():
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"):
            assert -1.0 <= summary_[key] <= 1.0
        assert set(summary_["per_class_ap"]) == {str(c) for c in range(1, 11)}
        assert all(-1.0 <= v <= 1.0 for v in summary_["per_class_ap"].values())
        for stat in ("AP", "AP50"):  # bootstrap over the test images
            assert -1.0 <= summary_[f"{stat}_ci_low"] <= summary_[f"{stat}_ci_high"] <= 1.0
        assert summary_["AP_seeds"] == 1 and "AP_seed_mean" not in summary_  # smoke: no seed replicates
    pairs = (project / "data/plots/map_pairs.csv").read_text().splitlines()
    assert pairs[0] == "pair,a,b,stat,difference,ci_low,ci_high,significant,seed_separated"
    assert [row.split(",")[3] for row in pairs[1:]] == ["AP", "AP50"]
    assert all(row.endswith(",") for row in pairs[1:])  # seed_separated empty: seed variance unknown


def test_onnx_stage_reports_parity_int8_and_latency(detection_run: DetectionRun):
    # Smoke-trained detectors score every box near 1/11, so NMS meets exact ties that onnxruntime may
    # break the other way: box-for-box parity is asserted on trained toys in tests/unit/test_detectors.py;
    # here the stage must run end to end, agree on mAP and report every figure.
    project = detection_run.project
    report = json.loads((project / "data/metrics/onnx.json").read_text())
    for name in ("thundernet", "one_stage"):
        entry = report[name]
        assert entry["map_abs_diff"] <= 1e-3
        assert entry["dynamic_batch"] == 1.0  # the graph takes any batch size
        assert entry["max_score_diff"] <= 1e-4  # on the batches whose kept boxes agree
        for key in ("latency_torch", "latency_onnx_fp32", "latency_onnx_int8"):
            assert 0 < entry[key]["p50_ms"] <= entry[key]["p95_ms"]
        assert np.isfinite(entry["map_onnx_int8"])
        assert (project / f"data/models/onnx/{name}.onnx").is_file()
        assert (project / f"data/models/onnx/{name}.int8.onnx").is_file()


def test_a_detector_stage_run_logs_its_params_from_the_data(detection_run: DetectionRun):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(detection_run.url)
    experiment = client.get_experiment_by_name("detection")
    (thunder,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'detector@thundernet'")
    assert thunder.info.status == "FINISHED" and "train_loss" in thunder.data.metrics
    assert thunder.data.params["thundernet.backbone"] == "snet_tiny"
    assert thunder.data.params["thundernet.num_classes"] == "10"  # from the data


def _shot(browser, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    browser.save_screenshot(str(shot))
    kept = keep_artifact(shot, name)
    print(f"screenshot: {kept}")
    return kept


def _exact_text(text: str):
    from selenium.webdriver.common.by import By

    return (By.XPATH, f"//*[normalize-space(text())={text!r}]")


def test_the_pipeline_run_page_lists_and_links_every_stage_run(detection_run: DetectionRun, browser, tmp_path):
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient(detection_run.url)
    parent = client.get_run(detection_run.parent_id)
    assert parent.data.tags["kiln.stages.ran"] == ",".join(DETECTION)
    children = {
        r.info.run_name: r
        for r in client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        )
    }
    assert set(children) == set(DETECTION)
    wait = WebDriverWait(browser, WAIT_S)
    try:
        browser.get(f"{detection_run.url}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}")
        wait.until(ec.visibility_of_element_located(_exact_text(parent.info.run_id)))
        more = browser.find_elements(*_exact_text("Show more"))
        if more:  # a long description is folded
            more[0].click()
        links = {}
        for stage in DETECTION:
            link = wait.until(ec.visibility_of_element_located((By.XPATH, f"//a[normalize-space(.)={stage!r}]")))
            links[stage] = link.get_attribute("href")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", link)
    finally:
        kept = _shot(browser, tmp_path, "mlflow-ui-pipeline-run.png")
    for stage, href in links.items():
        run = children[stage]
        assert href.endswith(f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"), (stage, href, kept)

    # The multi-experiment view nests the stage runs under the parent across experiments.
    from tasks.tracking import pipeline_view_url

    view = pipeline_view_url(detection_run.url, detection_run.url)
    try:
        browser.get(view)
        wait.until(ec.visibility_of_element_located(_exact_text("kiln run")))
        assert not browser.find_elements(*_exact_text("scenes")), "stage runs listed as top-level rows"
        row = browser.find_element(*_exact_text("kiln run")).find_element(By.XPATH, "./ancestor::*[@role='row'][1]")
        row.find_element(By.XPATH, ".//button").click()  # the row's expander
        for stage in DETECTION:
            wait.until(ec.visibility_of_element_located(_exact_text(stage)))
    finally:
        _shot(browser, tmp_path, "mlflow-ui-pipeline-view.png")


def test_the_report_artifact_renders_with_its_images(detection_run: DetectionRun, browser, tmp_path):
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient(detection_run.url)
    run = client.get_run(detection_run.report_id)
    listed = [
        f.path
        for top in client.list_artifacts(run.info.run_id)
        for f in [top, *client.list_artifacts(run.info.run_id, top.path)]
    ]
    (page,) = [path for path in listed if path.endswith("report.html")]
    wait = WebDriverWait(browser, WAIT_S)
    sizes: list[int] = []
    try:
        browser.get(
            f"{detection_run.url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/{page}"
        )
        frame = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "iframe.mlflow-html-iframe")))
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", frame)
        browser.switch_to.frame(frame)
        wait.until(lambda b: b.find_elements(By.TAG_NAME, "img"))
        wait.until(
            lambda b: all(
                b.execute_script("return arguments[0].complete", i) for i in b.find_elements(By.TAG_NAME, "img")
            )
        )
        images = browser.find_elements(By.TAG_NAME, "img")
        sizes = [int(i.get_property("naturalWidth")) for i in images]
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", images[0])  # for the screenshot
        browser.switch_to.default_content()
    finally:
        kept = _shot(browser, tmp_path, "mlflow-ui-report.png")
    assert sizes and all(w > 0 for w in sizes), f"images' natural widths {sizes}; screenshot {kept}"


def test_a_registered_detector_shows_its_signature_and_predicts_on_its_example(
    detection_run: DetectionRun, browser, tmp_path, monkeypatch
):
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient(detection_run.url)
    # The models:/ URIs below resolve against this server. Through the environment, which monkeypatch restores:
    # mlflow.set_tracking_uri would stay set in this test worker and send a later module's runs here.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", detection_run.url)
    onnx_run = client.search_runs(
        [client.get_experiment_by_name("detection").experiment_id], "attributes.run_name = 'onnx'"
    )[0]
    size = None
    for name in ("kiln-thundernet", "kiln-thundernet-int8", "kiln-one_stage", "kiln-one_stage-int8"):
        version = client.get_model_version_by_alias(name, "newest")
        assert version.run_id == onnx_run.info.run_id
        assert "pixels" in version.description and "[0, 1]" in version.description
        assert {"kiln.test_map", "kiln.test_ap50", "kiln.latency_p50_ms"} <= set(version.tags)
        uri = f"models:/{name}@newest"
        local = mlflow.artifacts.download_artifacts(uri)
        # What serving it needs, pinned to this install (tasks/tracking.py: pinned_requirements).
        required = (Path(local) / "requirements.txt").read_text().split()
        assert sorted(r.split("==")[0] for r in required) == ["mlflow", "numpy", "onnx", "onnxruntime"]
        assert all(len(r.split("==")) == 2 and "+" not in r for r in required), required
        example = Model.load(local).load_input_example(local)
        (spec,) = Model.load(local).signature.inputs.inputs
        assert spec.name == "pixels" and spec.shape[:2] == (-1, 1) and str(spec.type) == "float32"
        size = spec.shape[-1]
        predicted = mlflow.pyfunc.load_model(uri).predict(example)
        assert set(predicted) == {"boxes", "scores", "labels", "image_index"}
        assert predicted["boxes"].shape[1:] == (4,)
        assert 0.0 <= float(example["pixels"].min()) and float(example["pixels"].max()) <= 1.0

    version = client.get_model_version_by_alias("kiln-thundernet", "newest")
    wait = WebDriverWait(browser, WAIT_S)
    try:
        browser.get(f"{detection_run.url}/#/models/kiln-thundernet/versions/{version.version}")
        schema = wait.until(ec.visibility_of_element_located(_exact_text("Schema")))
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", schema)
        inputs = wait.until(ec.element_to_be_clickable(_exact_text("Inputs (1)")))
        inputs.click()  # the schema's inputs are folded
        # The input's name in the schema table below the heading (the description above names it too).
        below = "//*[normalize-space(text())='Schema']/following::*[normalize-space(text())='pixels'][1]"
        cell = wait.until(ec.visibility_of_element_located(("xpath", below)))
        row = cell.find_element("xpath", "./ancestor::*[contains(normalize-space(.), 'float32')][1]")
        text = row.text
    finally:
        kept = _shot(browser, tmp_path, "mlflow-ui-model-version.png")
    assert "pixels" in text and "float32" in text and f"{size}" in text, f"schema row {text!r}; screenshot {kept}"
