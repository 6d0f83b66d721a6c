"""The one MLflow helper every stage logs through.

One experiment per family, one run per stage run, named after the stage. Under `kiln run` the stage's
run is nested under the pipeline's parent run (its id travels in `KILN_MLFLOW_PARENT_RUN_ID`, so it
also reaches a stage started as a subprocess); a stage run alone (`dvc repro ngram`) is a top-level run.

Logging goes through `MlflowClient` with an explicit run id rather than the fluent API's active-run
stack, which is thread-local: Prefect may run a task in another thread than its flow.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlflow
import pandas as pd
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from tasks.phases import in_phase
from tasks.processes import process_alive

PARENT_RUN_ENV = "KILN_MLFLOW_PARENT_RUN_ID"
_OPEN_RUNS: dict[str, MlflowClient] = {}  # run id -> its client: the runs this process has open
PIPELINE_EXPERIMENT = "pipeline"
_MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per call


def project_root(root: Path) -> Path:
    """The user's project: `root`, except under `dvc exp run --temp` or a queued experiment, where the
    stage runs in a copy under `.dvc/tmp/exps/` that DVC deletes afterwards; DVC then names the parent
    repo in $DVC_ROOT (dvc/repo/experiments/queue/base.py)."""
    parent = os.environ.get("DVC_ROOT")
    return Path(parent) if parent and Path(parent).resolve() != root.resolve() else root


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """The relative default `sqlite:///mlflow.db` means the project's root, whatever the working directory
    and even inside a DVC experiment's temporary copy (its runs land in the project's store, not in a
    database DVC deletes)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(project_root(root) / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def dvc_experiment_tags() -> dict[str, str]:
    """The DVC experiment a stage runs in (`dvc exp run` sets these for queued and temp experiments)."""
    names = {"DVC_EXP_NAME": "dvc.exp.name", "DVC_EXP_BASELINE_REV": "dvc.exp.baseline_rev"}
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


class TrackingServerUnreachable(RuntimeError):
    """The configured MLflow tracking server does not answer."""


def redact_uri(uri: str) -> str:
    """`https://user:secret@host/path` -> `https://***@host/path`: a URI in an error message or a log
    must not carry the password some users put in it."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _root_cause(err: BaseException) -> str:
    """The innermost error under requests' and urllib3's wrappers: `Connection refused`, not three
    nested pool reprs."""
    while (inner := err.__cause__ or err.__context__) is not None:
        err = inner
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__


def check_tracking_server(uri: str, timeout_s: float = 3.0) -> None:
    """Raise `TrackingServerUnreachable` unless an http(s) tracking URI answers `GET <uri>/health` within
    `timeout_s` with a status below 500 (a 502/503 from a proxy means the server behind it is down).

    MLflow's client retries a refused connection with backoff for minutes before it gives up, so a run
    against a server that is down would hang at its first log call instead of saying so. Any other URI
    (sqlite, file, databricks) is left alone: a local store is created on first use. The probe uses
    MLflow's own TLS settings, so a certificate MLflow would reject fails here too.
    """
    if not uri.lower().startswith(("http://", "https://")):
        return
    import requests
    from mlflow.environment_variables import (
        MLFLOW_TRACKING_CLIENT_CERT_PATH,
        MLFLOW_TRACKING_INSECURE_TLS,
        MLFLOW_TRACKING_SERVER_CERT_PATH,
    )

    verify = False if MLFLOW_TRACKING_INSECURE_TLS.get() else (MLFLOW_TRACKING_SERVER_CERT_PATH.get() or True)
    shown = redact_uri(uri)
    try:
        with warnings.catch_warnings():  # the insecure-TLS warning repeats what the user chose
            warnings.simplefilter("ignore")
            answer = requests.get(
                uri.rstrip("/") + "/health",
                timeout=timeout_s,
                verify=verify,
                cert=MLFLOW_TRACKING_CLIENT_CERT_PATH.get(),
            )
    except requests.Timeout:
        raise TrackingServerUnreachable(
            f"MLflow tracking server {shown} did not answer within {timeout_s:g} s"
        ) from None
    except requests.RequestException as err:
        raise TrackingServerUnreachable(f"MLflow tracking server {shown} is unreachable: {_root_cause(err)}") from None
    if answer.status_code >= 500:
        raise TrackingServerUnreachable(
            f"MLflow tracking server {shown} answered GET /health with {answer.status_code} {answer.reason}"
        )


def git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def prefect_flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


@dataclass
class StageRun:
    """An open MLflow run of one stage; every method logs to exactly this run."""

    client: MlflowClient
    run_id: str
    root: Path

    @in_phase("io")
    def log_params(self, params: Mapping[str, Any]) -> None:
        entries = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(entries), 100):
            self.client.log_batch(self.run_id, params=entries[i : i + 100])

    @in_phase("io")
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Final metrics (no step) or one step's metrics. NaN and inf are logged as they are."""
        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(entries), _MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[i : i + _MAX_BATCH])

    @in_phase("io")
    def log_metric_series(self, key: str, values: Mapping[int, float]) -> None:
        """A metric along a step axis (train loss per step, perplexity per order)."""
        now = int(time.time() * 1000)
        entries = [Metric(key, float(v), now, int(s)) for s, v in values.items()]
        for i in range(0, len(entries), _MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[i : i + _MAX_BATCH])

    @in_phase("io")
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    @in_phase("io")
    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    @in_phase("io")
    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    @in_phase("io")
    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    @in_phase("io")
    def log_model(self, flavor: Any, name: str, tags: Mapping[str, str] | None = None, **kwargs: Any) -> Any:
        """Log a model with an MLflow flavor module (`mlflow.onnx`, `mlflow.pyfunc`) to this run, as a
        LoggedModel of the run's experiment that carries the run's params; `kwargs` go to the flavor's
        `save_model` (signature, input_example, registered_model_name, ...). Returns MLflow's ModelInfo.

        Not the flavor's `log_model`: that needs the fluent active run (thread-local, and ending it ends
        the stage's run), and `Model.log(run_id=...)` alone files the LoggedModel under the fluent API's
        default experiment, which Kiln deletes, instead of the run's."""
        from mlflow.models import Model

        run = self.client.get_run(self.run_id)
        logged = mlflow.initialize_logged_model(
            name=name,
            source_run_id=self.run_id,
            tags=dict(tags or {}),
            params=dict(run.data.params),
            experiment_id=run.info.experiment_id,
        )
        return Model.log(None, flavor, run_id=self.run_id, model_id=logged.model_id, name=name, **kwargs)

    @in_phase("io")
    def log_input(self, df: pd.DataFrame, source: Path | str, name: str, context: str) -> None:
        """Record the dataset this stage read: its schema, a digest of its contents and where it lies."""
        with warnings.catch_warnings():  # its hint about integer columns and missing values does not apply
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(df, source=str(source), name=name)
            entity = dataset._to_mlflow_entity()  # the public fluent log_input only knows the active run
        self.client.log_inputs(self.run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", context)])])


def pinned_requirements(*packages: str) -> list[str]:
    """`name==version` of each installed package (local version labels such as torch's `+cpu` dropped): the
    pip requirements a logged model declares. Given explicitly, MLflow does not load the model in a
    subprocess to infer them (about 3 s a model on 2 cores: tasks/detection/onnx_export.py)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


@contextmanager
def stage_run(
    stage: str,
    family: str,
    root: Path,
    tracking_uri: str,
    profile: str,
    params: Mapping[str, Any],
    is_dvc_stage: bool = True,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage run: experiment `family`, run name `stage`, params and tags.

    The run ends FINISHED when the body returns and FAILED (with the error as a tag) when it raises.
    """
    uri = resolve_tracking_uri(tracking_uri, root)
    # MLflow prints "View run ... at: URI" with the URI as given, password included: its line is off and
    # ours below carries the redacted URI.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, family)
    mark_orphans_killed(client, experiment_id, stage)
    tags = {
        "mlflow.runName": stage,
        "kiln.stage": stage,
        "kiln.family": family,
        "kiln.profile": profile,
        "mlflow.source.git.commit": git_commit(root),
        "prefect.flow_run_id": prefect_flow_run_id(),
        "kiln.pid": str(os.getpid()),
        "kiln.host": socket.gethostname(),
        **dvc_experiment_tags(),
    }
    if is_dvc_stage:
        tags["dvc.stage"] = stage
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, run_name=stage, tags=tags)
    tracked = StageRun(client, run.info.run_id, root)
    _OPEN_RUNS[run.info.run_id] = client
    try:
        tracked.log_params(params)
        yield tracked
    except BaseException as err:
        if _OPEN_RUNS.pop(run.info.run_id, None):
            client.set_tag(run.info.run_id, "kiln.error", f"{type(err).__name__}: {err}"[:5000])
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    if _OPEN_RUNS.pop(run.info.run_id, None) is None:
        return  # ended by fail_open_runs (a signal) while the body finished
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    if uri.startswith(("http://", "https://")):
        print(f"MLflow run {stage}: {redact_uri(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run.info.run_id}")


def mark_orphans_killed(client: MlflowClient, experiment_id: str, stage: str) -> list[str]:
    """Runs of `stage` left RUNNING by a process of this host that no longer exists (killed with -9, a
    lost machine's runs stay as they are) are ended KILLED; returns their ids."""
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id], f"attributes.status = 'RUNNING' and tags.`kiln.stage` = '{stage}'", max_results=200
    )
    ended = []
    for run in runs:
        pid, run_host = run.data.tags.get("kiln.pid", ""), run.data.tags.get("kiln.host")
        if run_host == host and pid.isdigit() and not process_alive(int(pid)):
            client.set_tag(run.info.run_id, "kiln.error", f"process {pid} ended without closing this run")
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            ended.append(run.info.run_id)
    return ended


def fail_open_runs(reason: str) -> None:
    """End every run this process has open FAILED with `reason` (a signal handler's last act)."""
    while _OPEN_RUNS:
        run_id, client = _OPEN_RUNS.popitem()
        try:
            client.set_tag(run_id, "kiln.error", reason)
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        except Exception:  # the store may be the thing that is going away; the next start marks it KILLED
            pass


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created as a model-training experiment with a description (MLflow 3's
    UI otherwise opens it in the GenAI view); MLflow's own empty `Default` experiment is removed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        what = (
            "one run per `kiln run`; its stage runs are its children"
            if name == PIPELINE_EXPERIMENT
            else "one run per stage run (the dvc.yaml stage is the run name and the `dvc.stage` tag)"
        )
        experiment_id = client.create_experiment(
            name,
            tags={
                "mlflow.experimentKind": "custom_model_development",
                "mlflow.note.content": f"Kiln, {name}: {what}. Params, per-step metrics, datasets and artifacts; "
                "tags give the git commit, profile and Prefect flow run.",
            },
        )
    else:
        experiment_id = experiment.experiment_id
    default = client.get_experiment_by_name("Default")
    if default is not None and default.lifecycle_stage == "active":
        if not client.search_runs([default.experiment_id], max_results=1, run_view_type=3):
            client.delete_experiment(default.experiment_id)
    return experiment_id


class StageOutcomeLike(Protocol):
    """What `kiln run` knows of one stage (flows/pipeline.py's StageOutcome)."""

    stage: str
    status: str  # ran | up to date | failed | skipped
    seconds: float
    detail: str


# The metric a stage's row in the pipeline's `stages` table shows: the first of these the stage's run has
# (exact names first, then name endings such as `thundernet_AP`); metric names only, no feature import.
HEADLINE_METRICS = (
    "test_perplexity",
    "fid",
    "fid_baseline",
    "classifier_free_selected_test_fid",
    "reconstruction_fid",
    "test_accuracy",
    "val_ap50_final",
    "scale_factor",
    "unigram_test_perplexity",
    "test_tokens",
    "test_images",
)
HEADLINE_SUFFIXES = ("_map_onnx", "_AP")


def headline_metric(metrics: Mapping[str, float]) -> tuple[str, float] | None:
    for key in HEADLINE_METRICS:
        if key in metrics:
            return key, metrics[key]
    for suffix in HEADLINE_SUFFIXES:
        for key in sorted(metrics):
            if key.endswith(suffix):
                return key, metrics[key]
    return None


def kiln_experiment_ids(client: MlflowClient) -> list[str]:
    """The experiments Kiln created in this store (`pipeline` and one per family; see ensure_experiment)."""
    return sorted(
        e.experiment_id
        for e in client.search_experiments()
        if e.name == PIPELINE_EXPERIMENT or e.tags.get("mlflow.note.content", "").startswith("Kiln, ")
    )


def pipeline_view_route(experiment_ids: list[str]) -> str:
    """The MLflow UI route that shows several experiments' runs in one table, a child run nested under its
    parent even when the two are in different experiments: every `kiln run` with its stage runs."""
    import json

    return "#/compare-experiments/s?experiments=" + json.dumps(sorted(experiment_ids), separators=(",", ":"))


def pipeline_view_url(tracking_uri: str, ui_url: str) -> str | None:
    """`ui_url` + the route of the pipeline view for the store at `tracking_uri` (None: the store has no
    `kiln run` yet, or cannot be read now; an sqlite store that does not exist is not created)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return None
    try:
        check_tracking_server(tracking_uri)
        client = MlflowClient(tracking_uri)
        if client.get_experiment_by_name(PIPELINE_EXPERIMENT) is None:
            return None
        return f"{ui_url.rstrip('/')}/{pipeline_view_route(kiln_experiment_ids(client))}"
    except Exception:  # only a convenience line of `kiln ui`; the UI itself says what is wrong
        return None


def last_stage_seconds(tracking_uri: str, root: Path, profile: str) -> dict[str, float]:
    """Stage name -> `stage_seconds` of its newest finished run on `profile` in this store: what `kiln run`
    ranks parallel stages by. {} when the store has none (an sqlite store that does not exist stays so) or
    cannot be read: the ranking is a convenience, never a reason to fail a run."""
    uri = resolve_tracking_uri(tracking_uri, root)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return {}
    try:
        check_tracking_server(uri)  # seconds, not MLflow's minutes of HTTP retries
        client = MlflowClient(uri)
        ids = kiln_experiment_ids(client)
        query = f"attributes.status = 'FINISHED' and tags.`kiln.profile` = '{profile}' and metrics.stage_seconds >= 0"
        runs = client.search_runs(ids, query, order_by=["attributes.start_time DESC"], max_results=5000) if ids else []
    except Exception:
        return {}
    seconds: dict[str, float] = {}
    for run in runs:
        seconds.setdefault(run.data.tags.get("kiln.stage", run.info.run_name), run.data.metrics["stage_seconds"])
    return seconds


def stage_runs_of(client: MlflowClient, parent_run_id: str) -> dict[str, Any]:
    """Stage name -> the newest run nested under `parent_run_id` (a retried stage has one run per attempt)."""
    ids = kiln_experiment_ids(client)
    runs = client.search_runs(ids, f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000) if ids else []
    newest: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        newest[run.data.tags.get("kiln.stage", run.info.run_name)] = run
    return newest


def log_pipeline_stages(parent: StageRun, outcomes: list[StageOutcomeLike]) -> pd.DataFrame | None:
    """Put every stage of one `kiln run` on its parent run: the `stages` table (`stages.json`, MLflow's
    log_table format), the run's description (a Markdown table with a link per stage run, which the run
    page shows) and tags naming the stages by outcome. Returns the table (None: it could not be logged,
    which is printed and does not fail the run: the stage runs themselves are logged)."""
    try:
        return _log_pipeline_stages(parent, outcomes)
    except Exception as err:
        print(f"warning: the stages table of MLflow run {parent.run_id} was not logged: {type(err).__name__}: {err}")
        return None


def _log_pipeline_stages(parent: StageRun, outcomes: list[StageOutcomeLike]) -> pd.DataFrame:
    children = stage_runs_of(parent.client, parent.run_id)
    rows = []
    for o in outcomes:
        run = children.get(o.stage)
        headline = headline_metric(run.data.metrics) if run is not None else None
        rows.append(
            {
                "stage": o.stage,
                "family": run.data.tags.get("kiln.family", "") if run is not None else "",
                "status": o.status,
                "run_status": run.info.status if run is not None else "",
                "seconds": round(float(o.seconds), 2),
                "headline_metric": headline[0] if headline else "",
                "headline_value": float(headline[1]) if headline else float("nan"),
                "run_id": run.info.run_id if run is not None else "",
                "run_link": f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" if run is not None else "",
                "detail": o.detail[:300],
            }
        )
    table = pd.DataFrame(
        rows,
        columns=[
            "stage",
            "family",
            "status",
            "run_status",
            "seconds",
            "headline_metric",
            "headline_value",
            "run_id",
            "run_link",
            "detail",
        ],
    )
    parent.client.log_table(parent.run_id, data=table, artifact_file="stages.json")
    parent.set_tags(
        {
            "mlflow.note.content": stages_markdown(table),
            **{
                f"kiln.stages.{status.replace(' ', '_')}": ",".join(table.stage[table.status == status]) or "-"
                for status in ("ran", "up to date", "failed", "skipped")
            },
            "kiln.stage_runs": str(int((table.run_id != "").sum())),
        }
    )
    return table


def stages_markdown(table: pd.DataFrame) -> str:
    """The parent run's description: one row per stage, its name linking to its run (same UI, any host)."""

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [
        f"**kiln run**: {len(table)} stages; each stage's run is nested under this one in its family's experiment.",
        "",
        "| stage | family | status | seconds | headline metric |",
        "|---|---|---|---:|---|",
    ]
    for row in table.itertuples():
        name = f"[{cell(row.stage)}]({row.run_link})" if row.run_link else cell(row.stage)
        metric = f"{row.headline_metric} = {row.headline_value:.4g}" if row.headline_metric else ""
        status = row.status + (f" ({row.run_status})" if row.run_status and row.run_status != "FINISHED" else "")
        lines.append(f"| {name} | {cell(row.family)} | {cell(status)} | {row.seconds:.1f} | {cell(metric)} |")
    return "\n".join(lines) + "\n"


@contextmanager
def pipeline_run(root: Path, tracking_uri: str, profile: str, targets: list[str]) -> Iterator[StageRun]:
    """The parent run of one `kiln run`; stage runs started inside it are nested under it."""
    with stage_run(
        "kiln run",
        PIPELINE_EXPERIMENT,
        root,
        tracking_uri,
        profile,
        {"targets": ",".join(targets) or "all"},
        is_dvc_stage=False,
    ) as parent:
        previous = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = parent.run_id
        try:
            yield parent
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous
