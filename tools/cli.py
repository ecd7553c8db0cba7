"""The `tierserve` command: build the reference models, serve them with tritonserver, manage tier keys,
experiments and model versions, and show the audit trail and the provenance of what is served."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import sys
import textwrap
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from tierserve.experiment_spec import ExperimentsFile, ExperimentSpecError
from tierserve.faults import FaultConfigError, FaultSpec
from tierserve.inference_log import LOG_DIR_ENV, REPLICA_ENV
from tierserve.operator_lock import ChangeRefused, one_change_at_a_time
from tierserve.operator_unloads import UnloadsError
from tierserve.policy import PolicyError
from tierserve.promotions import PromotionError
from tierserve.signature import TIERS
from tierserve.state_store import STATE_ENV, StateStore, StateStoreError
from tierserve.tier_keys import TIER_KEY_HEADER, TIER_KEYS_ENV, TierKeyError, TierKeys, new_key, read_key_file
from tierserve.tools.audit import Action, AuditError, audited
from tierserve.tools.build_models import build_all
from tierserve.tools.canary import add_canary_options
from tierserve.tools.exit_codes import MEANINGS, UNREACHABLE_ERRORS, ExitCode, failure
from tierserve.tools.log_admin import LogAdminError
from tierserve.tools.paths import (
    AUDIT_ENV,
    AUDIT_FILE,
    DEFAULT_REPOSITORY,
    LOG_DIR,
    STATE_FILE,
    TIER_KEY_FILE,
    TIER_KEYS_FILE,
)
from tierserve.tools.perf_command import add_perf_command
from tierserve.tools.progress import progress_bar


class NoAdminKey(PermissionError):
    """The operator has no admin key to send."""


def _build(args: argparse.Namespace) -> int:
    with progress_bar("models") as progress:
        build_all(args.model_repository, force=args.force, progress=progress)
    return ExitCode.OK


def _serve(args: argparse.Namespace) -> int:
    from tierserve.tools.serve import serve

    return serve(args)


def _demo(args: argparse.Namespace) -> int:
    from tierserve.tools.dataset import load_split
    from tierserve.tools.demo import build_workload, run_workload, summarize

    samples = build_workload(load_split(), args.count, args.seed)
    tier_key = read_key_file(args.tier_key_file)
    with progress_bar("requests") as progress:
        outcomes = run_workload(args.url, args.protocol, samples, args.concurrency, tier_key, progress)
    print(summarize(outcomes))
    return ExitCode.OK


def _admin_key() -> str:
    """The operator's admin key: $TIERSERVE_ADMIN_KEY, or the one `tierserve serve` wrote; NoAdminKey if none."""
    from tierserve.tools.paths import ADMIN_KEY_ENV, ADMIN_KEY_FILE

    key = os.environ.get(ADMIN_KEY_ENV) or (ADMIN_KEY_FILE.read_text().strip() if ADMIN_KEY_FILE.exists() else "")
    if not key:
        raise NoAdminKey(f"no admin key: set ${ADMIN_KEY_ENV}, or run `tierserve serve`, which writes {ADMIN_KEY_FILE}")
    return key


def _refusals() -> tuple[type[BaseException], ...]:
    """What an operator action raises when it refused, having changed nothing (the audit trail's 'refused')."""
    from tierserve.tools.experiment_admin import ExperimentNotRunning
    from tierserve.tools.lifecycle import Refused
    from tierserve.tools.model_control import AdminKeyRefused

    return (
        Refused,
        NoAdminKey,
        AdminKeyRefused,
        ExperimentSpecError,
        ExperimentNotRunning,
        FaultConfigError,
        PromotionError,
        UnloadsError,
        ChangeRefused,
    )


@contextlib.contextmanager
def _control(args: argparse.Namespace) -> Iterator:
    """A ModelControl for the server at --url, with the operator's admin key."""
    from tierserve.tools.model_control import ModelControl

    control = ModelControl(args.url, _admin_key())
    try:
        yield control
    finally:
        control.close()


@contextlib.contextmanager
def _store(args: argparse.Namespace) -> Iterator[StateStore]:
    from tierserve.state_store import open_store

    store = open_store(args.state)
    try:
        yield store
    finally:
        store.close()


@contextlib.contextmanager
def _lifecycle(args: argparse.Namespace) -> Iterator:
    from tierserve.tools.lifecycle import Lifecycle

    with _control(args) as control, _store(args) as store:
        yield Lifecycle(control, store, args.model_repository)


def _fault_text(spec: FaultSpec) -> str:
    if not spec.active:
        return "no faults"
    parts = [f"latency {spec.latency_ms:g} ms"] if spec.latency_ms else []
    parts += [f"error rate {spec.error_rate:g}"] if spec.error_rate else []
    return ", ".join(parts + (["hard failure"] if spec.hard_failure else []))


def _fault(args: argparse.Namespace) -> int:
    spec = FaultSpec() if args.off else FaultSpec(args.latency_ms, args.error_rate, args.hard_failure)
    with audited(Action.FAULT, args.model, _refusals()) as step, _control(args) as control:
        running = {k: v["string_value"] for k, v in control.config(args.model).get("parameters", {}).items()}
        step.before = _fault_text(FaultSpec.from_parameters(running))
        FaultSpec.from_parameters(spec.to_parameters())  # a bad value is refused here, not by the model's load
        control.set_fault(args.model, spec)
        step.after = step.message = _fault_text(spec)
    print(f"{args.model}: reloaded with {step.after}")
    return 0


def _names(spec: ExperimentsFile) -> str:
    return ", ".join(e.name for e in spec.experiments) or "none"


def _experiment_apply(args: argparse.Namespace) -> int:
    from tierserve.tools.experiment_admin import apply, check_served, describe, read_spec, served

    with (
        audited(Action.EXPERIMENT_APPLY, str(args.file), _refusals()) as step,
        _store(args) as store,
        one_change_at_a_time(store, f"experiment apply {args.file}"),
    ):
        step.before = _names(served(store, args.model_repository))
        spec = read_spec(args.file, args.model_repository, store)  # a malformed file goes no further than here
        with _control(args) as control:
            check_served(control, spec)
            apply(control, spec)
        step.after = _names(spec)
        step.message = f"experiments applied from {args.file}"
    print(f"applied:\n{describe(spec)}")
    return 0


def _experiment_list(args: argparse.Namespace) -> int:
    from tierserve.tools.experiment_admin import describe, served

    with _store(args) as store:
        print(describe(served(store, args.model_repository)))
    return 0


def _experiment_stop(args: argparse.Namespace) -> int:
    from tierserve.tools.experiment_admin import apply, describe, served, without

    with (
        audited(Action.EXPERIMENT_STOP, args.name, _refusals()) as step,
        _store(args) as store,
        one_change_at_a_time(store, f"experiment stop {args.name}"),
    ):
        running = served(store, args.model_repository)
        step.before = _names(running)
        spec = without(running, args.name)
        with _control(args) as control:
            apply(control, spec)
        step.after = _names(spec)
        step.message = f"stopped {args.name}"
    print(f"stopped {args.name}; its counts stay for `tierserve experiment report {args.name}`; running:")
    print(describe(spec))
    return 0


def _experiment_report(args: argparse.Namespace) -> int:
    from tierserve.tools.experiment_report import report

    with _store(args) as store:
        print(report(store, args.name, args.png))
    return 0


def _lifecycle_action(action: Action, method: str):
    """A command that runs one Lifecycle action on args.target, audited, and prints what it did."""

    def run(args: argparse.Namespace) -> int:
        with audited(action, args.target, _refusals()) as step, _lifecycle(args) as lifecycle:
            getattr(lifecycle, method)(args.target, step)
        print(f"{action.value} {args.target}: {step.message} ({step.before} -> {step.after})")
        return 0

    return run


def _models(args: argparse.Namespace) -> int:
    """Exits with why the server was not asked (unreachable, no admin key, ...) when the listing is from the disk."""
    from tierserve.tools.provenance import disk_provenance, provenance_text, server_provenance

    status = ExitCode.OK
    with _store(args) as store:
        try:
            with _lifecycle(args) as lifecycle:
                found = server_provenance(lifecycle, f"the server at {args.url}")
        except _operator_errors() as error:
            why = failure(error)
            found = disk_provenance(args.model_repository, store, f"server at {args.url} not asked: {why.message}")
            print(f"tierserve: {why.message}; listed the repository on disk instead", file=sys.stderr)
            status = why.code
    print(found.as_json() if args.json else provenance_text(found))
    return status


def _audit(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tierserve.tools.audit import audit_json, audit_table, read_audit

    log = read_audit(args.log)
    entries = log.entries[-args.last :] if args.last else log.entries
    if args.json:
        print(audit_json(entries))
    elif entries:
        Console(width=max(Console().width, 160)).print(audit_table(entries))
    else:
        print(f"no actions recorded in {args.log}")
    for problem in log.problems:
        print(f"tierserve: {problem}; the line was skipped", file=sys.stderr)
    return ExitCode.FAILED if log.problems else ExitCode.OK


def _canary(args: argparse.Namespace) -> int:
    from tierserve.tools.audit import Outcome, record
    from tierserve.tools.canary import CanaryOutcome, canary_settings, run_canary
    from tierserve.tools.lifecycle import Refused

    try:  # refusals before the canary's own checks, which record theirs: a bad option, no admin key
        settings = canary_settings(vars(args))
        _admin_key()
    except (Refused, NoAdminKey) as error:
        record(Action.CANARY_STEP, args.target, outcome=Outcome.REFUSED, message=str(error))
        raise
    with _lifecycle(args) as lifecycle:
        result = run_canary(args.target, lifecycle, args.metrics_url, settings)
    exits = {
        CanaryOutcome.PROMOTED: ExitCode.OK,
        CanaryOutcome.INTERRUPTED: ExitCode.INTERRUPTED,
        CanaryOutcome.SERVER_LOST: ExitCode.UNREACHABLE,
    }
    return exits.get(result.outcome, ExitCode.FAILED)  # rolled back, or a step the server did not take


def _log_query(args: argparse.Namespace) -> int:
    from tierserve.tools.log_admin import query, render_table

    print(render_table(query(args.log, args.sql, skip_corrupt=args.skip_corrupt)))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from tierserve.tools.replay import replay, report_png, report_table

    tier_key = read_key_file(args.tier_key_file)
    with progress_bar("replaying") as progress:
        report = replay(
            args.log,
            url=args.url,
            protocol=args.protocol,
            state_path=args.state,
            target=args.model,
            where=args.where,
            limit=args.limit,
            tier_key=tier_key,
            concurrency=args.concurrency,
            skip_corrupt=args.skip_corrupt,
            progress=progress,
        )
    print(report_table(report))
    if args.png is not None:
        report_png(report, args.png)
        print(f"plot: {args.png}")
    return 0


def _keys_file(args: argparse.Namespace) -> Path:
    return args.keys_file or Path(os.environ.get(TIER_KEYS_ENV) or TIER_KEYS_FILE)


def _tier_key_add(args: argparse.Namespace) -> int:
    """Generate a key, store only its hash, print the key once."""
    path = _keys_file(args)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = TierKeys.load(path) if path.exists() else TierKeys(source=str(path))
    keys.add(args.name, key := new_key(), args.max_tier).save(path)
    print(key)
    print(
        f"tierserve: tier key {args.name!r} (up to {args.max_tier!r}) added to {path}; the line above is the key "
        f"itself, shown only now (only its SHA-256 is stored). Clients send it as the {TIER_KEY_HEADER} header "
        "(SDK: tier_key=...).",
        file=sys.stderr,
    )
    return 0


def _tier_key_list(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    keys = TierKeys.load(path)
    print(f"{path}: on_missing {keys.on_missing.value}, {len(keys.keys)} key(s)")
    for key in keys.keys:
        print(f"  {key.name}  max_tier {key.max_tier}  sha256 {key.sha256[:12]}...")
    return 0


def _tier_key_remove(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    TierKeys.load(path).remove(args.name).save(path)
    print(f"tierserve: tier key {args.name!r} removed from {path}", file=sys.stderr)
    return 0


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"an IPv4 address (127.0.0.1, 0.0.0.0 for every interface), got {text!r}"
        ) from None


def _address(text: str) -> str:
    """A server address as tritonclient takes it: host:port, no scheme."""
    host, _, port = text.rpartition(":")
    if "/" in text or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"host:port without a scheme, such as localhost:8000, got {text!r}")
    return text


def _exit_codes() -> str:
    """The exit statuses, for `tierserve --help`."""
    lines = (
        textwrap.fill(f"{code.value:>3}  {meaning}", 100, subsequent_indent=" " * 5)
        for code, meaning in MEANINGS.items()
    )
    return "exit status:\n" + textwrap.indent("\n".join(lines), "  ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tierserve",
        description=__doc__,
        epilog=_exit_codes(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tierserve {metadata.version('tierserve')}")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="train and export the reference models that are missing or stale")
    build.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    build.add_argument("--force", action="store_true", help="rebuild every model, current or not")
    build.set_defaults(run=_build)

    serve = commands.add_parser("serve", help="build missing models, then run tritonserver in the foreground")
    serve.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument(
        "--tritonserver",
        type=Path,
        default=None,
        help="tritonserver binary to run (default: the one shipped in nvidia-pytriton)",
    )
    serve.add_argument("--no-build", action="store_true", help="serve the repository as it is")
    serve.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    serve.add_argument(
        "--state", help=f"redis://host:port/db (servers share it) or a SQLite file; default ${STATE_ENV}"
    )
    serve.add_argument(
        "--log-dir",
        type=Path,
        default=Path(os.environ.get(LOG_DIR_ENV) or LOG_DIR),
        help=f"the inference log's directory, or the root several servers share (default: ${LOG_DIR_ENV}, else "
        f"{LOG_DIR})",
    )
    serve.add_argument(
        "--replica",
        default=os.environ.get(REPLICA_ENV),
        help=f"this server's name among several sharing one log root: it writes LOG_DIR/replica=NAME/, which "
        f"`tierserve log query` reads with the others' (default: ${REPLICA_ENV})",
    )
    serve.add_argument(
        "--address",
        type=_ipv4,
        default="127.0.0.1",
        help="IPv4 address HTTP, gRPC and metrics bind to (default: this machine only; 0.0.0.0: every interface)",
    )
    serve.add_argument(
        "--tier-keys",
        type=Path,
        default=None,
        help=f"tier keys file (default: ${TIER_KEYS_ENV}, else {TIER_KEYS_FILE}, created on first "
        "start with a key for critical)",
    )
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="send a seeded mixed workload to a running server; print routes")
    demo.add_argument("--url", type=_address, default="localhost:8001", help="server address (gRPC port by default)")
    demo.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    demo.add_argument("--count", type=int, default=400)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--concurrency", type=int, default=4)
    demo.add_argument(
        "--tier-key-file",
        type=Path,
        default=TIER_KEY_FILE,
        help="the tier key sent with every request, when the file exists (default: the local key "
        "`tierserve serve` made)",
    )
    demo.set_defaults(run=_demo)

    fault = commands.add_parser("fault", help="switch fault injection of a model on or off on a running server")
    fault.add_argument("model")
    fault.add_argument("--latency-ms", type=float, default=0.0, help="added to every batch")
    fault.add_argument("--error-rate", type=float, default=0.0, help="share of batches that fail, 0-1")
    fault.add_argument("--hard-failure", action="store_true", help="every batch fails")
    fault.add_argument("--off", action="store_true", help="remove all faults")
    fault.add_argument("--url", type=_address, default="localhost:8000", help="the server's HTTP address")
    fault.set_defaults(run=_fault)

    tier_key = commands.add_parser("tier-key", help="add, list or remove the keys that may claim tiers above standard")
    keys_file = argparse.ArgumentParser(add_help=False)
    keys_file.add_argument(
        "--keys-file", type=Path, default=None, help=f"default: ${TIER_KEYS_ENV}, else {TIER_KEYS_FILE}"
    )
    actions = tier_key.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", parents=[keys_file], help="generate a key, print it once, store its hash")
    add.add_argument("name", help="who holds the key, e.g. alice-app")
    add.add_argument("--max-tier", choices=TIERS, default=TIERS[0], help="the most urgent tier it may claim")
    add.set_defaults(run=_tier_key_add)
    actions.add_parser("list", parents=[keys_file], help="the keys' names, tiers and hash prefixes").set_defaults(
        run=_tier_key_list
    )
    remove = actions.add_parser("remove", parents=[keys_file], help="remove a key by name")
    remove.add_argument("name")
    remove.set_defaults(run=_tier_key_remove)

    experiment = commands.add_parser("experiment", help="apply, list, stop and report experiments on a running server")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="for the policy")
    where.add_argument(
        "--state",
        default=os.environ.get(STATE_ENV) or str(STATE_FILE),
        help=f"default: ${STATE_ENV}, else {STATE_FILE}",
    )
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--url", type=_address, default="localhost:8000", help="the server's HTTP address (admin key needed)"
    )
    steps = experiment.add_subparsers(dest="action", required=True)
    apply = steps.add_parser(
        "apply", parents=[where, server], help="validate FILE and serve its experiments (replaces the running ones)"
    )
    apply.add_argument("file", type=Path)
    apply.set_defaults(run=_experiment_apply)
    steps.add_parser("list", parents=[where], help="the experiments the routers serve").set_defaults(
        run=_experiment_list
    )
    stop = steps.add_parser("stop", parents=[where, server], help="stop one experiment; the others keep running")
    stop.add_argument("name")
    stop.set_defaults(run=_experiment_stop)
    report = steps.add_parser("report", parents=[where], help="per arm: users, rows, accuracy, latency, significance")
    report.add_argument("name")
    report.add_argument("--png", type=Path, default=None, help="plot accuracy and latency per arm over time here")
    report.set_defaults(run=_experiment_report)

    for name, action, method, target, summary in (
        ("promote", Action.PROMOTE, "promote", "MODEL:VERSION", "route the policy to this version (live)"),
        ("rollback", Action.ROLLBACK, "rollback", "MODEL", "route MODEL back to the version before its promotion"),
        ("retire", Action.RETIRE, "retire", "MODEL:VERSION", "unload a version nothing routes to"),
    ):
        command = commands.add_parser(name, parents=[where, server], help=summary)
        command.add_argument("target", metavar=target)
        command.set_defaults(run=_lifecycle_action(action, method))
    canary = commands.add_parser(
        "canary",
        parents=[where, server],
        help="raise a candidate version's share of traffic step by step while the server's metrics pass the gates, "
        "then promote it; back to the baseline at once when a gate fails",
    )
    canary.add_argument("target", metavar="MODEL:CANDIDATE")
    add_canary_options(canary)
    canary.set_defaults(run=_canary)
    model = commands.add_parser("model", help="load or unload a model, or one version of it, on a running server")
    model_actions = model.add_subparsers(dest="action", required=True)
    load = model_actions.add_parser("load", parents=[where, server], help="load MODEL, or one more VERSION of it")
    load.add_argument("target", metavar="MODEL[:VERSION]")
    load.set_defaults(run=_lifecycle_action(Action.LOAD, "load"))
    unload = model_actions.add_parser("unload", parents=[where, server], help="unload MODEL (refused while used)")
    unload.add_argument("target", metavar="MODEL")
    unload.set_defaults(run=_lifecycle_action(Action.UNLOAD, "unload"))

    models = commands.add_parser(
        "models", parents=[where, server], help="every served model version: manifest and where it is routed"
    )
    models.add_argument("--json", action="store_true", help="everything, as JSON")
    models.set_defaults(run=_models)

    audit = commands.add_parser("audit", help="the audit trail of operator actions, oldest first")
    audit.add_argument(
        "--log",
        type=Path,
        default=Path(os.environ.get(AUDIT_ENV) or AUDIT_FILE),
        help=f"default: ${AUDIT_ENV}, else {AUDIT_FILE}",
    )
    audit.add_argument("--last", type=int, default=0, help="only the last N actions")
    audit.add_argument("--json", action="store_true", help="as a JSON array")
    audit.set_defaults(run=_audit)

    log = commands.add_parser("log", help="the inference log: every answered row and feedback, as Parquet files")
    log_actions = log.add_subparsers(dest="log_action", required=True)
    log_query = log_actions.add_parser(
        "query", help="run SQL (DuckDB) over the views inferences, feedback and answers (the two joined)"
    )
    log_query.add_argument("sql", help='e.g. "SELECT route, count(*) FROM answers GROUP BY route"')
    log_query.add_argument(
        "--log",
        type=Path,
        default=Path(os.environ.get(LOG_DIR_ENV) or LOG_DIR),
        help=f"the log directory (default: ${LOG_DIR_ENV}, else {LOG_DIR})",
    )
    log_query.add_argument(
        "--skip-corrupt", action="store_true", help="answer from the readable files and list the corrupt ones"
    )
    log_query.set_defaults(run=_log_query)

    replay = commands.add_parser(
        "replay",
        help="send logged rows again to a running server (digits, or one model version directly) and report "
        "agreement with the logged answers, accuracy where feedback exists, and latency",
    )
    replay.add_argument(
        "--log",
        type=Path,
        default=Path(os.environ.get(LOG_DIR_ENV) or LOG_DIR),
        help=f"the log directory (default: ${LOG_DIR_ENV}, else {LOG_DIR})",
    )
    replay.add_argument(
        "--where",
        default=None,
        help="only the rows this DuckDB condition over the answers view selects, e.g. \"tier = 'standard'\"",
    )
    replay.add_argument("--limit", type=int, default=None, help="only the oldest N rows")
    replay.add_argument(
        "--model",
        default=None,
        metavar="MODEL[:VERSION]",
        help="replay against this model (version) directly, the pixels resized as the router does (default: "
        "digits, through the router, reproducing each row's decisions from its logged seed)",
    )
    replay.add_argument("--url", type=_address, default="localhost:8001", help="server address (gRPC port by default)")
    replay.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    replay.add_argument(
        "--state",
        default=os.environ.get(STATE_ENV) or str(STATE_FILE),
        help=f"the state store the server runs with, whose secret signs the replayed rows (default: ${STATE_ENV}, "
        f"else {STATE_FILE})",
    )
    replay.add_argument(
        "--tier-key-file",
        type=Path,
        default=TIER_KEY_FILE,
        help="the tier key sent with every row, when the file exists; rows above standard need it (default: the "
        "local key `tierserve serve` made)",
    )
    replay.add_argument("--concurrency", type=int, default=1, help="rows in flight at once")
    replay.add_argument("--png", type=Path, default=None, help="plot agreement, accuracy and latency here")
    replay.add_argument(
        "--skip-corrupt", action="store_true", help="replay the rows of the readable files and list the corrupt ones"
    )
    replay.set_defaults(run=_replay)

    add_perf_command(commands)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("tierserve: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except _operator_errors() as error:  # anything else is unexpected: its traceback is shown
        known = failure(error, getattr(args, "url", None))
        print(f"tierserve: {known.message}", file=sys.stderr)
        return known.code


def _operator_errors() -> tuple[type[BaseException], ...]:
    """What a command may raise that is the operator's to act on: a line on stderr, an exit code, no traceback."""
    from tritonclient.utils import InferenceServerException

    from tierserve.client import TierserveError
    from tierserve.tools.lifecycle import Failed
    from tierserve.tools.perf_command import PerfError
    from tierserve.tools.replay import ReplayError

    return (
        *_refusals(),
        Failed,
        ReplayError,
        PerfError,
        InferenceServerException,
        TierKeyError,
        PolicyError,
        AuditError,
        LogAdminError,
        StateStoreError,
        TierserveError,
        *UNREACHABLE_ERRORS,
    )


if __name__ == "__main__":
    sys.exit(main())
