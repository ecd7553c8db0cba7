"""The `tierserve` command: build the reference models, serve them with tritonserver, manage tier keys and
experiments."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from tierserve.experiment_spec import ExperimentsFile, ExperimentSpecError
from tierserve.signature import TIERS
from tierserve.state_store import STATE_ENV
from tierserve.tier_keys import TIER_KEY_HEADER, TIER_KEYS_ENV, TierKeyError, TierKeys, new_key
from tierserve.tools.build_models import build_all
from tierserve.tools.paths import DEFAULT_REPOSITORY, STATE_FILE, TIER_KEY_FILE, TIER_KEYS_FILE


def _build(args: argparse.Namespace) -> int:
    build_all(args.model_repository, force=args.force)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from tierserve.tools.serve import serve

    return serve(args)


def _demo(args: argparse.Namespace) -> int:
    from tierserve.tools.dataset import load_split
    from tierserve.tools.demo import build_workload, run_workload, summarize

    samples = build_workload(load_split(), args.count, args.seed)
    tier_key = args.tier_key_file.read_text().strip() if args.tier_key_file.exists() else None
    print(summarize(run_workload(args.url, args.protocol, samples, args.concurrency, tier_key)))
    return 0


def _admin_key() -> str:
    """The operator's admin key: $TIERSERVE_ADMIN_KEY, or the one `tierserve serve` wrote; "" (and says so) if none."""
    from tierserve.tools.paths import ADMIN_KEY_ENV, ADMIN_KEY_FILE

    key = os.environ.get(ADMIN_KEY_ENV) or (ADMIN_KEY_FILE.read_text().strip() if ADMIN_KEY_FILE.exists() else "")
    if not key:
        print(
            f"tierserve: no admin key: set ${ADMIN_KEY_ENV}, or run `tierserve serve`, which writes {ADMIN_KEY_FILE}",
            file=sys.stderr,
        )
    return key


def _fault(args: argparse.Namespace) -> int:
    from tierserve.faults import FaultSpec
    from tierserve.tools.model_control import AdminKeyRefused, ModelControl

    if not (key := _admin_key()):
        return 1
    spec = FaultSpec() if args.off else FaultSpec(args.latency_ms, args.error_rate, args.hard_failure)
    control = ModelControl(args.url, key)
    try:
        control.set_fault(args.model, spec)
    except AdminKeyRefused as error:
        print(f"tierserve: {error}", file=sys.stderr)
        return 1
    finally:
        control.close()
    print(f"{args.model}: reloaded with {'no faults' if not spec.active else spec}")
    return 0


def _serve_experiments(args: argparse.Namespace, spec: ExperimentsFile, refused: str) -> bool:
    """Reload the router of the server at --url with `spec`; False (and why, after `refused`) when not done."""
    from tritonclient.utils import InferenceServerException

    from tierserve.tools.experiment_admin import serve_experiments
    from tierserve.tools.model_control import AdminKeyRefused

    if not (key := _admin_key()):
        return False
    try:
        serve_experiments(args.url, key, spec)
    except (AdminKeyRefused, InferenceServerException) as error:
        print(f"tierserve: {refused}: {error}", file=sys.stderr)
        return False
    return True


def _experiment_apply(args: argparse.Namespace) -> int:
    from tierserve.tools.experiment_admin import describe, read_spec

    spec = read_spec(args.file, args.model_repository)  # a malformed file goes no further than here
    if not _serve_experiments(args, spec, "experiments not applied, the running ones keep serving"):
        return 1
    print(f"applied:\n{describe(spec)}")
    return 0


def _experiment_list(args: argparse.Namespace) -> int:
    from tierserve.state_store import open_store
    from tierserve.tools.experiment_admin import describe, served

    store = open_store(args.state)
    try:
        print(describe(served(store, args.model_repository)))
    finally:
        store.close()
    return 0


def _experiment_stop(args: argparse.Namespace) -> int:
    from tierserve.state_store import open_store
    from tierserve.tools.experiment_admin import describe, served, without

    store = open_store(args.state)
    try:
        spec = without(served(store, args.model_repository), args.name)
    except KeyError as error:
        print(f"tierserve: {error.args[0]}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if not _serve_experiments(args, spec, f"{args.name} not stopped"):
        return 1
    print(f"stopped {args.name}; its counts stay for `tierserve experiment report {args.name}`; running:")
    print(describe(spec))
    return 0


def _experiment_report(args: argparse.Namespace) -> int:
    from tierserve.state_store import open_store
    from tierserve.tools.experiment_report import report

    store = open_store(args.state)
    try:
        print(report(store, args.name, args.png))
    finally:
        store.close()
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierserve", description=__doc__)
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
    demo.add_argument("--url", default="localhost:8001", help="server address (gRPC port by default)")
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
    fault.add_argument("--url", default="localhost:8000", help="the server's HTTP address")
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
    server.add_argument("--url", default="localhost:8000", help="the server's HTTP address (admin key needed)")
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

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ExperimentSpecError as error:
        print(f"tierserve: {error}", file=sys.stderr)
        return 1
    except TierKeyError as error:
        print(f"tierserve: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
