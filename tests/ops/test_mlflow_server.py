"""MLflow on a real tracking server: PostgreSQL as its backend store and artifacts served by the server,
both started the way `make mlflow-server` starts them (flows/services.py), on free loopback ports. A smoke
stage logs to it over HTTP (the `mlflow_server_run` fixture in conftest.py); its run, metrics and an
artifact are read back over the REST API.
"""

from __future__ import annotations

import json

import pytest
import requests

from flows.services import PG_DB, PG_USER
from tests.ops.conftest import LoggedRun

pytestmark = pytest.mark.pipeline


def api(url: str, method: str, endpoint: str, **kwargs) -> dict:
    answer = requests.request(method, f"{url}/api/2.0/mlflow/{endpoint}", timeout=10, **kwargs)
    assert answer.status_code == 200, f"{method} {endpoint}: {answer.status_code} {answer.text[:500]}"
    return answer.json()


def test_a_stage_logs_to_an_mlflow_server_on_postgresql_and_reads_back_over_rest(mlflow_server_run: LoggedRun) -> None:
    url, project, folder, pg_port = (
        mlflow_server_run.url,
        mlflow_server_run.project,
        mlflow_server_run.services,
        mlflow_server_run.pg_port,
    )
    assert not (project / "mlflow.db").exists(), "the stage logged to the local sqlite store, not the server"
    expected = json.loads((project / "data" / "metrics" / "corpus.json").read_text())

    experiment = api(url, "GET", "experiments/get-by-name", params={"experiment_name": "text"})["experiment"]
    (run,) = api(
        url,
        "POST",
        "runs/search",
        json={"experiment_ids": [experiment["experiment_id"]], "filter": "attributes.run_name = 'corpus'"},
    )["runs"]
    assert run["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["dvc.stage"] == "corpus" and tags["kiln.profile"] == "smoke"
    run_id = run["info"]["run_id"]

    history = api(url, "GET", "metrics/get-history", params={"run_id": run_id, "metric_key": "vocab_size"})
    assert [m["value"] for m in history["metrics"]] == [expected["vocab_size"]]

    # The artifact went to the server (mlflow-artifacts:/ root), not to a local folder of the client.
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/"), run["info"]["artifact_uri"]
    listed = api(url, "GET", "artifacts/list", params={"run_id": run_id, "path": "corpus"})
    assert {"corpus/vocab.parquet", "corpus/documents.parquet"} <= {f["path"] for f in listed["files"]}
    download = requests.get(
        f"{url}/get-artifact", params={"run_id": run_id, "path": "corpus/vocab.parquet"}, timeout=10
    )
    assert download.status_code == 200
    assert download.content == (project / "data" / "prepared" / "corpus" / "vocab.parquet").read_bytes()
    assert any(folder.joinpath("mlflow-artifacts").rglob("vocab.parquet")), "no artifact in the server's store"

    # And the runs are rows in PostgreSQL, not in some fallback store.
    import psycopg2

    password = (folder / "pg" / "password").read_text().strip()
    db = psycopg2.connect(host="127.0.0.1", port=pg_port, user=PG_USER, password=password, dbname=PG_DB)
    try:
        with db.cursor() as cursor:
            cursor.execute("SELECT name FROM runs WHERE run_uuid = %s", (run_id,))
            assert cursor.fetchone() == ("corpus",)
    finally:
        db.close()


def test_the_uris_password_is_never_printed(mlflow_server_run: LoggedRun) -> None:
    from tests.ops.conftest import PLANTED_PASSWORD

    assert PLANTED_PASSWORD not in mlflow_server_run.output
    assert "View run" not in mlflow_server_run.output  # MLflow's own line prints the URI as given
    assert "MLflow run corpus: http://***@127.0.0.1:" in mlflow_server_run.output
