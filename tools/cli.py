"""The `tierserve` command: build the reference models and serve them with tritonserver."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tierserve.tools.build_models import build_all
from tierserve.tools.paths import DEFAULT_REPOSITORY


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
    print(summarize(run_workload(args.url, args.protocol, samples, args.concurrency)))
    return 0


def _fault(args: argparse.Namespace) -> int:
    import os

    from tierserve.faults import FaultSpec
    from tierserve.tools.model_control import ModelControl
    from tierserve.tools.paths import ADMIN_KEY_ENV, ADMIN_KEY_FILE

    key = os.environ.get(ADMIN_KEY_ENV) or ADMIN_KEY_FILE.read_text().strip()
    spec = FaultSpec() if args.off else FaultSpec(args.latency_ms, args.error_rate, args.hard_failure)
    control = ModelControl(args.url, key)
    control.set_fault(args.model, spec)
    control.close()
    print(f"{args.model}: reloaded with {'no faults' if not spec.active else spec}")
    return 0


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
    serve.add_argument("--tritonserver", type=Path, default=None,
                       help="tritonserver binary to run (default: the one shipped in nvidia-pytriton)")
    serve.add_argument("--no-build", action="store_true", help="serve the repository as it is")
    serve.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="send a seeded mixed workload to a running server; print routes")
    demo.add_argument("--url", default="localhost:8001", help="server address (gRPC port by default)")
    demo.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    demo.add_argument("--count", type=int, default=400)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--concurrency", type=int, default=4)
    demo.set_defaults(run=_demo)

    fault = commands.add_parser("fault", help="switch fault injection of a model on or off on a running server")
    fault.add_argument("model")
    fault.add_argument("--latency-ms", type=float, default=0.0, help="added to every batch")
    fault.add_argument("--error-rate", type=float, default=0.0, help="share of batches that fail, 0-1")
    fault.add_argument("--hard-failure", action="store_true", help="every batch fails")
    fault.add_argument("--off", action="store_true", help="remove all faults")
    fault.add_argument("--url", default="localhost:8000", help="the server's HTTP address")
    fault.set_defaults(run=_fault)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
