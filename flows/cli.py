"""`kiln`: the command line of the pipeline.

kiln stage NAME          run one dvc.yaml stage as a Prefect flow run (what every dvc.yaml cmd calls)
kiln run [--target S] [--family F] [--dry-run] [--force]
                         the end-to-end flow: reproduce the stale stages in DVC's order
kiln score [SENTENCE..]  rank sentences by plausibility under the trained language model(s)
kiln sample STAGE --out DIR
                         PNG samples from a trained generator (diffusion@*, ldm_text, controlnet, guidance, nflow@*)
kiln detect IMAGE..      run the exported detector (ONNX) on images: print and draw what it finds
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
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: each command imports what it needs when it runs
    from flows.prefect_api import BootingAPI


def _enter_root() -> Path:
    from tasks.runtime import repo_root

    root = repo_root()
    os.chdir(root)  # DVC runs cmds at the root; MLflow's local artifact paths are relative to it too
    return root


def _targets(root: Path, args: argparse.Namespace) -> list[str] | None:
    """`--target` and `--family` as dvc.yaml stage names, checked before anything starts: an unknown name
    is one error line with the stage names and the closest one. A foreach name (`lm`) stands for all its
    items, as in `dvc repro lm`."""
    if not (args.target or getattr(args, "family", None)):
        return None
    from flows.dvc_graph import dvc_stage_names
    from flows.registry import all_specs, unknown_stage

    known = dvc_stage_names(root)  # kiln stages and any other command dvc.yaml runs
    targets = []
    for name in args.target or []:
        items = [k for k in known if k.startswith(name + "@")]
        if name not in known and not items:
            raise unknown_stage(name, known)
        targets += [name] if name in known else items
    if getattr(args, "family", None):
        families = sorted({s.family for s in all_specs()})
        if args.family not in families:
            raise unknown_stage(args.family, families, kind="family", kinds="families")
        targets += [n for s in all_specs() if s.family == args.family for n in s.stage_names() if n in known]
    return list(dict.fromkeys(targets))


def cmd_stage(args: argparse.Namespace) -> int:
    root = _enter_root()
    from flows.factory import stage_flow
    from flows.pipeline import require_tracking_server
    from flows.prefect_api import shared_prefect_api

    run = stage_flow(args.name)  # an unknown name fails here, before any server or tracking check
    require_tracking_server(root)
    with shared_prefect_api(root):  # inside `kiln run` its API; under `dvc repro` the project's shared one
        run()
    return 0


def _validate_params(root: Path, typed: bool) -> None:
    """Every params file through the strict loader before DVC reads any (DVC's own YAML parsing has no
    bound on alias expansion); `typed`: also every section against its config class."""
    from tasks.params import params_files, read_yaml

    for path in params_files(root / "params"):
        read_yaml(path)
    if typed:
        from flows.registry import load_all

        load_all(root / "params")


def cmd_run(args: argparse.Namespace) -> int:
    root = _enter_root()
    _validate_params(root, typed=False)
    targets = _targets(root, args)  # a mistyped name is refused first, in a second, not after the imports
    if args.dry_run:
        _validate_params(root, typed=True)
        return _dry_run(root, targets, args.force)
    from flows.prefect_api import booting_prefect_api

    # The run's Prefect server boots while the params sections are checked (their config classes are in
    # the stage modules, whose imports take as long as the server's start); an error stops it again.
    with booting_prefect_api() as prefect_api:
        _validate_params(root, typed=True)
        return _run(root, args, targets, prefect_api)


def _run(root: Path, args: argparse.Namespace, targets: list[str] | None, prefect_api: BootingAPI) -> int:
    from flows.dvc_graph import RepoBusy, hold_repo_lock
    from flows.pipeline import PipelineFailed, configured_pipeline_flow, require_tracking_server, summary_markdown
    from flows.run_lock import RunInProgress, exclusive_run
    from tasks.runtime import load_runtime

    require_tracking_server(root)  # before any stage: a run that cannot log does not start
    runtime = load_runtime(root / "params")
    pipeline_flow = configured_pipeline_flow(runtime)

    failure: PipelineFailed | None = None
    try:
        # DVC's own repo lock too, for the whole run (not with Dask, whose worker processes commit stages).
        dvc_lock = hold_repo_lock(root) if runtime.task_runner == "thread" else nullcontext()
        with exclusive_run(root), dvc_lock, prefect_api.serving():
            try:
                outcomes = pipeline_flow(targets=targets, force=args.force)
            except PipelineFailed as failed:
                # Caught inside, so the local API outlives the delivery of the failed run's logs: with
                # the server gone first, Prefect's log worker retries for a minute at exit.
                failure = failed
    except (RunInProgress, RepoBusy) as busy:
        print(f"kiln run: {busy}", file=sys.stderr)
        return 3
    if failure is not None:
        print(f"\nkiln run: {failure}\n\n{failure.summary}", file=sys.stderr)
        return 1
    print("\n" + summary_markdown(outcomes))
    return 0


def _dry_run(root: Path, targets: list[str] | None, force: bool) -> int:
    """What `kiln run` would do, in order, without running anything: a stage runs when it is stale, when
    a stage it depends on runs, or with --force."""
    from flows.dvc_graph import order_and_stale_reasons, stage_order

    if force:
        (order, upstream), stale = stage_order(root, targets), {}
    else:
        order, upstream, stale = order_and_stale_reasons(root, targets)
    runs: set[str] = set()
    for name in order:
        reasons = ["--force"] if force else stale[name]
        ran_upstream = [u for u in upstream[name] if u in runs]
        if reasons or ran_upstream:
            runs.add(name)
            why = "; ".join(reasons[:3]) if reasons else f"upstream {ran_upstream[0]} runs"
            print(f"would run  {name}  ({why})")
        else:
            print(f"up to date {name}")
    print(f"\nkiln run --dry-run: {len(runs)} of {len(order)} stages would run; nothing was run.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    root = _enter_root()
    _validate_params(root, typed=False)
    from flows.dvc_graph import order_and_stale_reasons

    order, _, all_reasons = order_and_stale_reasons(root, _targets(root, args))
    stale = 0
    for name in order:
        reasons = all_reasons[name]
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
        print("kiln score: error: no sentences (give them as arguments or one per line on stdin)", file=sys.stderr)
        return 2
    scores = score_sentences(root, sentences, args.model)
    if args.json:
        print(json.dumps([s.as_dict() for s in scores], indent=2))
    else:
        print(format_scores(scores))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    # Paths as the user typed them, before _enter_root moves to the project root.
    out = Path(args.out).resolve()
    edges = Path(args.edges).resolve() if args.edges else None
    root = _enter_root()
    from tasks.generative.sampling import SampleRequest, sample_stage, write_samples
    from tasks.runtime import load_runtime
    from tasks.training import resolve_device

    request = SampleRequest(args.stage, args.n, args.label, args.prompt, edges, args.steps, args.seed)
    samples = sample_stage(root, request, resolve_device(load_runtime(root / "params").device))
    paths = write_samples(samples, out)
    for path, condition in zip(paths, samples.conditions):
        print(f"{path}  {condition}")
    print(f"{paths[-1]}  grid")
    shape = "x".join(str(d) for d in samples.images.shape[1:])
    count = len(samples.conditions)
    print(f"kiln sample: {count} image(s) of {shape} from {args.stage} ({samples.how}; seed {args.seed})")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    # Paths as the user typed them, before _enter_root moves to the project root.
    images = [Path(p).resolve() for p in args.images]
    out = Path(args.out).resolve() if args.out else None
    root = _enter_root()
    from tasks.detection.inference import detect, draw_detections, format_detections, load_detector, output_paths
    from tasks.errors import InputError

    if not 0.0 <= args.score_threshold <= 1.0:
        raise InputError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    detector = load_detector(root, args.model)
    results = [detect(detector, path, args.score_threshold) for path in images]  # every image read before any output
    print(
        f"{detector.source}: {detector.input_size}x{detector.input_size} gray input, score >= {args.score_threshold:g}"
    )
    for result, target in zip(results, output_paths(images, out) if out else [None] * len(results)):
        print(format_detections(result))
        if target is not None:
            print(f"  drawn: {draw_detections(result, target)}")
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
    from tasks.tracking import redact_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(load_runtime(root / "params").tracking_uri(), root)
    print(f"MLflow UI for {redact_uri(uri)} on http://127.0.0.1:{args.port}")
    from tasks.tracking import pipeline_view_url

    view = pipeline_view_url(uri, f"http://127.0.0.1:{args.port}")
    if view:  # every experiment in one table: each `kiln run` with its stage runs nested under it
        print(f"every kiln run with its stage runs: {view}")
    mlflow = Path(sys.executable).parent / "mlflow"
    # The store URI (a PostgreSQL one carries its password) goes through the environment, which other
    # local users cannot read, not the command line, which `ps` shows them.
    os.environ["MLFLOW_BACKEND_STORE_URI"] = uri
    os.execv(str(mlflow), [str(mlflow), "ui", "--host", "127.0.0.1", "--port", str(args.port)])
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


def _stages_epilog() -> str:
    """The runnable stage names by family, and the profiles (imports the task modules: --help only)."""
    from flows.registry import all_specs

    lines = ["stages (kiln stage NAME, kiln run --target NAME):"]
    for family in dict.fromkeys(s.family for s in all_specs()):
        names = [n for s in all_specs() if s.family == family for n in s.stage_names()]
        lines.append(f"  {family}: {', '.join(names)}")
    from tasks.runtime import repo_root

    try:
        profiles = sorted(p.stem for p in (repo_root() / "params" / "profiles").glob("*.yaml"))
        lines.append(f"profiles (kiln profile NAME): {', '.join(profiles)}")
    except FileNotFoundError:
        pass
    return "\n".join(lines)


def build_parser(with_stages: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error too")
    sub = parser.add_subparsers(dest="command", required=True)

    listing = _stages_epilog() if with_stages else "kiln stage --help lists the stages."
    p = sub.add_parser(
        "stage",
        help="run one dvc.yaml stage as a Prefect flow run",
        epilog=listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="stage name as in dvc.yaml (e.g. ngram, lm@mamba)")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser(
        "run",
        help="reproduce the stale stages of the DAG, in order",
        epilog=listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--target",
        action="append",
        help="a stage to bring up to date with its upstream (repeatable); a foreach name (lm) means all its items",
    )
    p.add_argument("--family", help="every stage of one family (text, generative, detection, report)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, and why; run nothing")
    p.add_argument("--force", action="store_true", help="rerun the targeted stages even when up to date")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("score", help="score sentences under the trained language models")
    p.add_argument("sentences", nargs="*", help="sentences (default: one per line on stdin)")
    p.add_argument(
        "--model", action="append", default=None, help="model to score with (default: ngram); repeat to compare"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("sample", help="PNG samples from a trained generator")
    p.add_argument(
        "stage", help="diffusion@{ddpm,sde_vp,sde_ve,ldm,dit_rf}, ldm_text, controlnet, guidance, nflow@{realnvp,cnf}"
    )
    p.add_argument("--label", help="class name or index for a class-conditional model (default: the classes in turn)")
    p.add_argument("--prompt", help="the caption, for ldm_text")
    p.add_argument("--edges", help="PNG edge map the size of the training images, for controlnet")
    p.add_argument("-n", type=int, default=8, help="number of images (default: 8)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the most the stage scores)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (default: 0)")
    p.add_argument("--out", required=True, help="folder for 000.png, 001.png, ... and grid.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("detect", help="run the exported detector (ONNX) on images")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size and mode: converted to gray)")
    p.add_argument(
        "--model", help="detector name (default: the first; NAME.int8 for the int8 export) or a models:/ URI"
    )
    p.add_argument("--out", help="folder for each image with its boxes drawn (<stem>.detections.png)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="smallest score shown (default: 0.5)")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("status", help="which stages are stale, and why")
    p.add_argument("--target", action="append", help="only this stage and its upstream")
    p.add_argument("--family", help="only this family's stages and their upstream")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "profile",
        help="switch params/ to a profile (smoke, default, gpu)",
        epilog=listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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


# SIGTERM's hard deadline, counted from the signal's arrival: the process is gone by then even if a library
# thread holds it. The docs promise 10 s; unwinding gets the rest.
TERM_EXIT_AFTER_S = 7.0
_WATCHING = False  # the deadline's watcher thread is started


def _fail_runs_and_exit(signum: int, arrived: float) -> None:
    """The hard deadline: at `arrived + TERM_EXIT_AFTER_S`, end what is still open FAILED and exit."""
    import time

    from tasks.tracking import fail_open_runs

    time.sleep(max(0.0, arrived + TERM_EXIT_AFTER_S - time.monotonic()))
    fail_open_runs(f"terminated by signal {signum}")
    os._exit(128 + signum)


def _watch_for_sigterm() -> None:
    """Start the deadline the moment SIGTERM arrives. Inside a flow run, Prefect's own handler sees the signal
    first and unwinds its flow and task runs (one API call each, seconds on a loaded machine) before it hands
    the signal on to `_terminate`; a deadline started there would come too late. The interpreter writes every
    signal's number to the wakeup fd when it arrives, whichever Python handler runs later, so a thread reading
    it starts the clock on time."""
    import signal
    import threading
    import time

    global _WATCHING
    if _WATCHING or threading.current_thread() is not threading.main_thread():
        return  # once per process (tests call main() many times); only the main thread may set the fd
    _WATCHING = True
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch() -> None:
        while signal.SIGTERM not in os.read(read, 64):
            pass
        _fail_runs_and_exit(signal.SIGTERM, time.monotonic())

    threading.Thread(target=watch, name="kiln-sigterm-deadline", daemon=True).start()


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM: end the open MLflow runs FAILED now and unwind like Ctrl-C (run lock and Prefect API released).
    `_watch_for_sigterm`'s deadline ends the process if unwinding takes longer; its children die with it."""
    from tasks.tracking import fail_open_runs

    fail_open_runs(f"terminated by signal {signum}")
    raise KeyboardInterrupt(f"signal {signum}")


class _HideInputErrors:
    """A logging filter for Prefect's flow and task run loggers: their report of a run that failed on bad
    input (its traceback, and the "Finished in state Failed(... CorpusError: ...)" line) is dropped, since
    the CLI prints that error once, as one line; any other failure is logged as Prefect logs it."""

    def __init__(self) -> None:
        from flows.pipeline import PipelineFailed
        from tasks.errors import InputError

        # PipelineFailed's traceback says nothing the run's summary table does not, and each failed stage
        # has already logged its own.
        self.error_type = (InputError, PipelineFailed)

    def names(self) -> set[str]:
        """InputError's subclasses, read when a record comes: a stage's module defines its own on import."""

        def walk(cls: type) -> set[str]:
            return {cls.__name__}.union(*(walk(sub) for sub in cls.__subclasses__()))

        return walk(self.error_type[0])

    def filter(self, record) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.error_type):
            return False
        message = record.getMessage()  # e.g. the final state: "Finished in state Failed('... CorpusError: ...')"
        return not any(f"{name}: " in message for name in self.names())


def _quiet_input_errors() -> None:
    import logging

    import prefect.logging.configuration  # noqa: F401  Prefect's dictConfig first: it would drop a filter set before

    quiet = _HideInputErrors()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(quiet)


# The commands that run Prefect flows; the others (status, summary, score, ...) import neither Prefect nor
# MLflow, which would double `kiln status`'s time.
FLOW_COMMANDS = {"run", "stage", "serve"}


def _input_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the user's input, printed as one line with exit status 2. Evaluated when an
    error is raised: a tracking server can only be unreachable once tasks.tracking was imported."""
    from dvc.exceptions import DvcException

    from flows.registry import UnknownStage
    from tasks.errors import InputError

    tracking = sys.modules.get("tasks.tracking")
    unreachable = (tracking.TrackingServerUnreachable,) if tracking else ()
    return (InputError, UnknownStage, FileNotFoundError, KeyError, DvcException, *unreachable)


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    # SIGTERM (a scheduler's or systemd's stop): see _terminate.
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    _watch_for_sigterm()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(with_stages="-h" in argv or "--help" in argv).parse_args(argv)
    if not args.debug and args.command in FLOW_COMMANDS:
        _quiet_input_errors()
    try:
        return args.func(args)
    except _input_errors() as err:
        # Input errors: one clear line naming the file, key or record, not a traceback (unless --debug).
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        # DVC's messages about dvc.yaml (a YAML error, a bad field) may span lines: one line here.
        print(f"kiln {args.command}: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
