"""`kiln`: the command line of the pipeline.

kiln stage NAME          run one dvc.yaml stage as a Prefect flow run (what every dvc.yaml cmd calls)
kiln run [--target S]    the end-to-end flow: reproduce the stale stages in DVC's order
kiln score [SENTENCE..]  rank sentences by plausibility under the trained language model(s)
kiln status              which stages are stale, and why
kiln profile NAME        switch params/ to the smoke, default or gpu profile
kiln check               dvc.yaml against the stage specs: cmds, params, code deps (import closure)
kiln summary             the headline metrics of the last run
kiln ui                  the MLflow UI for this project's tracking store, on loopback
kiln serve --cron EXPR   serve the end-to-end run on a cron schedule (needs a Prefect server)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _enter_root() -> Path:
    from tasks.runtime import repo_root

    root = repo_root()
    os.chdir(root)  # DVC runs cmds at the root; MLflow's local artifact paths are relative to it too
    return root


def cmd_stage(args: argparse.Namespace) -> int:
    root = _enter_root()
    from flows.pipeline import require_tracking_server

    require_tracking_server(root)
    from flows.factory import stage_flow

    stage_flow(args.name)()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    root = _enter_root()
    from flows.pipeline import PipelineFailed, configured_pipeline_flow, require_tracking_server, summary_markdown

    require_tracking_server(root)
    from flows.prefect_api import local_prefect_api
    from flows.run_lock import RunInProgress, exclusive_run
    from tasks.runtime import load_runtime

    pipeline_flow = configured_pipeline_flow(load_runtime(root / "params"))

    failure: PipelineFailed | None = None
    try:
        with exclusive_run(root), local_prefect_api():
            try:
                outcomes = pipeline_flow(targets=args.target or None)
            except PipelineFailed as failed:
                # Caught inside, so the local API outlives the delivery of the failed run's logs: with
                # the server gone first, Prefect's log worker retries for a minute at exit.
                failure = failed
    except RunInProgress as busy:
        print(f"kiln run: {busy}", file=sys.stderr)
        return 3
    if failure is not None:
        print(f"\nkiln run: {failure}\n\n{failure.summary}", file=sys.stderr)
        return 1
    print("\n" + summary_markdown(outcomes))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    root = _enter_root()
    from flows.pipeline import stage_order, stale_reasons

    order, _ = stage_order(root, args.target or None)
    stale = 0
    for name in order:
        reasons = stale_reasons(root, name)
        stale += bool(reasons)
        print(f"{name}: {'stale' if reasons else 'up to date'}")
        for reason in reasons:
            print(f"    {reason}")
    print(f"\n{stale} of {len(order)} stages stale (a stage downstream of a stale one reruns too).")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    root = _enter_root()
    from flows.registry import load_all
    from tasks.params import apply_profile

    changed = apply_profile(root / "params", args.name)
    load_all(root / "params")  # the switched params must still load strictly
    print(f"profile {args.name}: {len(changed)} value(s) changed")
    for key in changed:
        print(f"    {key}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    root = _enter_root()
    from tasks.text.scoring import format_scores, score_sentences

    sentences = args.sentences or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not sentences:
        print("kiln score: no sentences (give them as arguments or one per line on stdin)", file=sys.stderr)
        return 2
    scores = score_sentences(root, sentences, args.model)
    if args.json:
        print(json.dumps([s.as_dict() for s in scores], indent=2))
    else:
        print(format_scores(scores))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    root = _enter_root()
    from flows.check import check

    problems = check(root)
    for line in problems:
        print(line)
    if problems:
        print(
            f"\nkiln check: {len(problems)} disagreement(s) between dvc.yaml, the stage specs and the code",
            file=sys.stderr,
        )
        return 1
    print("kiln check: dvc.yaml, the stage specs and the code agree")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    root = _enter_root()
    from tasks.report.summary import headline

    print(headline(root))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    root = _enter_root()
    from tasks.runtime import load_runtime
    from tasks.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(load_runtime(root / "params").tracking_uri(), root)
    print(f"MLflow UI for {uri} on http://127.0.0.1:{args.port}")
    mlflow = Path(sys.executable).parent / "mlflow"
    os.execv(
        str(mlflow), [str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    )
    return 0  # not reached


def cmd_serve(args: argparse.Namespace) -> int:
    root = _enter_root()
    from flows.pipeline import require_tracking_server
    from flows.schedule import NoPrefectServer, serve

    require_tracking_server(root)
    try:
        serve(args.cron, args.target, root, args.name)
    except NoPrefectServer as err:
        print(f"kiln serve: error: {err}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stage", help="run one dvc.yaml stage as a Prefect flow run")
    p.add_argument("name", help="stage name as in dvc.yaml (e.g. ngram, lm@mamba)")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("run", help="reproduce the stale stages of the DAG, in order")
    p.add_argument("--target", action="append", help="a stage to bring up to date with its upstream (repeatable)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("score", help="score sentences under the trained language models")
    p.add_argument("sentences", nargs="*", help="sentences (default: one per line on stdin)")
    p.add_argument(
        "--model", action="append", default=None, help="model to score with (default: ngram); repeat to compare"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("status", help="which stages are stale, and why")
    p.add_argument("--target", action="append", help="only this stage and its upstream")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("profile", help="switch params/ to a profile (smoke, default, gpu)")
    p.add_argument("name")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("check", help="dvc.yaml against the stage specs: params, code deps (import closure)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("summary", help="the headline metrics of the last run")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("serve", help="serve the end-to-end run on a cron schedule from a Prefect server")
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *" (03:00 every day)')
    p.add_argument("--target", action="append", help="as for kiln run (repeatable)")
    p.add_argument("--name", default="kiln-cron", help="deployment name (default: kiln-cron)")
    p.set_defaults(func=cmd_serve)
    return parser


# Nothing phones home: the tools' usage reports would be the only traffic beyond the registries.
QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    from flows.registry import UnknownStage
    from tasks.errors import InputError
    from tasks.tracking import TrackingServerUnreachable

    try:
        return args.func(args)
    except (InputError, UnknownStage, TrackingServerUnreachable, FileNotFoundError, KeyError) as err:
        # Input errors: one clear line naming the file, key or record, not a traceback.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"kiln {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
