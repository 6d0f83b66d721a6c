"""The MLflow UI shows what a stage logged: headless Chromium (Debian's chromium and chromium-driver, driven
by selenium) opens the `mlflow server` that holds a smoke stage's run (the `mlflow_server_run` fixture in
conftest.py, shared with the REST test), finds the experiment and the run, and on the run page the metric
with its value. The screenshot is kept in test-artifacts/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.ops.conftest import LoggedRun, keep_artifact, require

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
