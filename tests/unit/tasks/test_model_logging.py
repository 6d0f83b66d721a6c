"""Models logged after a stage (tasks/model_logging.py, tasks/text/logged_models.py) and the pipeline's
`stages` table (tasks/tracking.py): logged to a throw-away sqlite store, registered, loaded back with
`mlflow.pyfunc.load_model("models:/...@newest")` and asked to predict on their own input example."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tasks import model_logging
from tasks.model_logging import log_stage_models, model_logger
from tasks.spec import StageContext
from tasks.text.corpus import vocab_digest
from tasks.tracking import (
    last_stage_seconds,
    log_pipeline_stages,
    pinned_requirements,
    pipeline_run,
    pipeline_view_route,
    pipeline_view_url,
    stage_run,
)
from tests.unit.tasks.text.test_scoring_digest import WORDS, _write_corpus, _write_lstm, _write_ngram


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An sqlite store in tmp_path; its artifacts (./mlruns) land there too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KILN_MLFLOW_PARENT_RUN_ID", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"  # tests/conftest.py unsets the URI a test leaves set


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    vocab = _write_corpus(root, WORDS)
    _write_lstm(root, vocab, {"vocab_digest": vocab_digest(vocab)})
    _write_ngram(root, vocab, vocab_digest(vocab))
    return root


def _input_example(uri: str) -> pd.DataFrame:
    from mlflow.models import Model

    local = mlflow.artifacts.download_artifacts(uri)
    return Model.load(local).load_input_example(local)


@pytest.mark.parametrize(("base", "item"), [("lm", "lstm"), ("ngram", "")])
def test_a_language_model_is_logged_registered_and_predicts_on_its_input_example(store, project, base, item):
    from tasks.text.scoring import score_sentences

    stage, model = (f"{base}@{item}" if item else base), (item or "ngram")
    with stage_run(stage, "text", project, store, "smoke", {}) as run:
        registered = log_stage_models(base, StageContext(project, item, 0, "cpu", run), {"test_perplexity": 12.5})
    assert registered == f"kiln-lm-{model}@newest"

    uri = f"models:/{registered}"
    loaded = mlflow.pyfunc.load_model(uri)
    assert [c.name for c in loaded.metadata.get_input_schema().inputs] == ["sentence"]
    outputs = {c.name for c in loaded.metadata.get_output_schema().inputs}
    assert {"log10_prob", "perplexity", "tokens", "unknown_tokens"} <= outputs
    example = _input_example(uri)
    assert list(example.columns) == ["sentence"] and len(example) >= 1
    predicted = loaded.predict(example)
    # The registry's answer is `kiln score`'s, row for row in input order.
    expected = {s.sentence: s.perplexity for s in score_sentences(project, list(example.sentence), [model])}
    assert list(predicted.sentence) == list(example.sentence)
    np.testing.assert_allclose(predicted.perplexity, [expected[s] for s in example.sentence], rtol=1e-6)

    client = MlflowClient(store)
    version = client.get_model_version_by_alias(f"kiln-lm-{model}", "newest")
    assert version.run_id == run.run_id
    assert version.tags["kiln.stage"] == stage and version.tags["kiln.profile"] == "smoke"
    assert version.tags["kiln.test_perplexity"] == "12.5"
    assert "`sentence`" in client.get_registered_model(f"kiln-lm-{model}").description
    assert "12.5" in version.description
    local = Path(mlflow.artifacts.download_artifacts(uri))
    required = (local / "requirements.txt").read_text().split()
    assert [r.split("==")[0] for r in required] == ["mlflow", "torch", "numpy", "pandas", "pyarrow", "prefect"]


def test_pinned_requirements_are_the_installed_versions_without_local_labels():
    from importlib.metadata import version

    import torch

    (pinned,) = pinned_requirements("torch")
    assert pinned == "torch==" + torch.__version__.split("+")[0] and "+" not in pinned
    assert pinned_requirements("numpy", "mlflow") == [f"numpy=={np.__version__}", f"mlflow=={version('mlflow')}"]


def test_a_stage_without_models_logs_nothing_and_the_table_names_importable_loggers(store, project):
    assert model_logger("corpus") is None
    for base in model_logging.MODEL_LOGGERS:
        assert callable(model_logger(base))
    with stage_run("corpus", "text", project, store, "smoke", {}) as run:
        assert log_stage_models("corpus", StageContext(project, "", 0, "cpu", run), {}) is None
    # A torchrun rank other than 0 has no run to log to.
    assert log_stage_models("lm", StageContext(project, "lstm", 0, "cpu", object()), {}) is None


def test_a_failing_model_logger_is_reported_on_the_run_not_raised(store, project, monkeypatch, capsys):
    def broken(ctx, stage, metrics):
        raise RuntimeError("registry down")

    monkeypatch.setattr(model_logging, "model_logger", lambda base: broken)
    with stage_run("lm@lstm", "text", project, store, "smoke", {}) as run:
        assert log_stage_models("lm", StageContext(project, "lstm", 0, "cpu", run), {}) is None
    tags = MlflowClient(store).get_run(run.run_id).data.tags
    assert tags["kiln.model_logging_error"] == "RuntimeError: registry down"
    assert "lm@lstm: its model was not logged" in capsys.readouterr().out


@dataclass
class Outcome:
    stage: str
    status: str
    seconds: float = 1.0
    detail: str = ""


def test_the_pipeline_run_lists_and_links_its_stage_runs_across_experiments(store, project):
    with pipeline_run(project, store, "smoke", []) as parent:
        with stage_run("corpus", "text", project, store, "smoke", {}) as corpus:
            corpus.log_metrics({"test_tokens": 22.0})
        with stage_run("scenes", "detection", project, store, "smoke", {}) as scenes:
            scenes.log_metrics({"test_images": 16.0})
        table = log_pipeline_stages(
            parent,
            [Outcome("corpus", "ran"), Outcome("scenes", "ran"), Outcome("map", "skipped", 0.0, "upstream failed")],
        )
    assert list(table.stage) == ["corpus", "scenes", "map"]
    assert list(table.family) == ["text", "detection", ""]
    assert list(table.run_id[:2]) == [corpus.run_id, scenes.run_id] and table.run_id[2] == ""
    assert table.headline_metric[0] == "test_tokens" and table.headline_value[0] == 22.0
    assert math.isnan(table.headline_value[2])

    client = MlflowClient(store)
    run = client.get_run(parent.run_id)
    note = run.data.tags["mlflow.note.content"]
    text_id = client.get_experiment_by_name("text").experiment_id
    assert f"[corpus](#/experiments/{text_id}/runs/{corpus.run_id})" in note
    assert "| map | " in note  # no run: named, not linked
    assert run.data.tags["kiln.stages.ran"] == "corpus,scenes" and run.data.tags["kiln.stages.skipped"] == "map"
    pipeline_id = client.get_experiment_by_name("pipeline").experiment_id
    logged = client.load_table(pipeline_id, "stages.json", run_ids=[parent.run_id])
    assert list(logged.stage) == ["corpus", "scenes", "map"]

    ids = sorted(e.experiment_id for e in client.search_experiments())
    assert pipeline_view_route(ids) == "#/compare-experiments/s?experiments=" + str(ids).replace("'", '"').replace(
        " ", ""
    )
    assert pipeline_view_url(store, "http://127.0.0.1:5000/") == "http://127.0.0.1:5000/" + pipeline_view_route(ids)


def test_no_pipeline_view_for_a_store_that_does_not_exist(tmp_path):
    assert pipeline_view_url(f"sqlite:///{tmp_path / 'none.db'}", "http://127.0.0.1:5000") is None
    assert not (tmp_path / "none.db").exists()


def test_last_stage_seconds_are_each_stages_newest_finished_run_on_the_profile(store, tmp_path):
    assert last_stage_seconds(store, tmp_path, "default") == {}  # no store yet, and none is created
    assert not (tmp_path / "mlflow.db").exists()
    for stage, profile, seconds in [
        ("lm@lstm", "default", 50.0),
        ("lm@lstm", "default", 40.0),
        ("ngram", "smoke", 2.0),
    ]:
        with stage_run(stage, "text", tmp_path, store, profile, {}) as run:
            run.log_metrics({"stage_seconds": seconds})
    with pytest.raises(RuntimeError), stage_run("lm@lstm", "text", tmp_path, store, "default", {}) as run:
        run.log_metrics({"stage_seconds": 1.0})
        raise RuntimeError("failed runs do not count")
    with stage_run("corpus", "text", tmp_path, store, "default", {}):
        pass  # no stage_seconds: not counted
    assert last_stage_seconds(store, tmp_path, "default") == {"lm@lstm": 40.0}
    assert last_stage_seconds(store, tmp_path, "smoke") == {"ngram": 2.0}
    assert last_stage_seconds("http://127.0.0.1:9", tmp_path, "default") == {}  # unreachable: no ranking
