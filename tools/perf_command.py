"""`tierserve perf MODEL`: perf_analyzer against a running server, with the held-out test images `tierserve build`
wrote, a tier and request parameters, over gRPC or HTTP, with no environment to set by hand.

What perf_analyzer 2.51 itself can send decides how: over gRPC, request parameters (`--request-parameter`,
lowercased, name:value:type) and no headers; over HTTP, headers (`-H`) and no parameters, so there the tier and the
other parameters go as `tierserve-param-NAME` headers, which the server forwards as parameters
(tierserve.request_context), with the tier key as its header. A tier that needs a key is therefore load-tested over
HTTP: over gRPC the key could not be sent (and perf_analyzer would lowercase it)."""

from __future__ import annotations

import argparse
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierserve.request_context import PARAMETER_HEADER_PREFIX
from tierserve.signature import TIERS
from tierserve.tier_keys import KEYLESS_TIER, TIER_KEY_HEADER, read_key_file
from tierserve.tools.paths import DEFAULT_REPOSITORY, TIER_KEY_FILE
from tierserve.tools.perf_analyzer import (
    ANY_SPREAD,
    INPUT_DATA_8X8,
    INPUT_DATA_SIZES,
    PerfAnalyzerMissing,
    binary,
    environment,
)

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
WINDOWS = 3  # perf_analyzer reports the mean of its last 3 windows
IMAGE_INPUT = "PIXELS"
_CONCURRENCY = re.compile(r"[1-9]\d*(:[1-9]\d*(:[1-9]\d*)?)?")


class PerfError(ValueError):
    """A load test that cannot run as asked: which option, and what would work."""


@dataclass(frozen=True)
class PerfRun:
    """What `tierserve perf` was asked for."""

    model: str
    protocol: str = "grpc"
    url: str | None = None  # default: DEFAULT_URLS[protocol]
    tier: str | None = None  # None: the policy's default tier
    parameters: dict[str, str] = field(default_factory=dict)  # further request parameters (digits' attributes, ...)
    tier_key: str | None = None  # sent over HTTP as the tier key header (tiers above standard need one)
    concurrency: str = "1"  # perf_analyzer's --concurrency-range: N or START:END[:STEP]
    seconds: float = 3.0  # measured per concurrency level, in WINDOWS windows
    input_data: Path | None = None  # default: the model repository's file for the model's input
    model_repository: Path = DEFAULT_REPOSITORY
    csv: Path | None = None  # perf_analyzer's CSV report (-f)
    extra: tuple[str, ...] = ()  # passed to perf_analyzer last, so they override the options above

    @property
    def address(self) -> str:
        return self.url or DEFAULT_URLS[self.protocol]

    def request_parameters(self) -> dict[str, str]:
        """The request parameters to send, checked against what perf_analyzer can send (PerfError if not)."""
        sent = {"tier": self.tier} if self.tier else {}
        sent |= self.parameters
        if self.tier and TIERS.index(self.tier) < TIERS.index(KEYLESS_TIER):
            if self.protocol == "grpc":
                raise PerfError(
                    f"tier {self.tier!r} needs a tier key, which perf_analyzer cannot send over gRPC (it sends no "
                    "headers there): use --protocol http, which sends the key from --tier-key-file"
                )
            if self.tier_key is None:
                raise PerfError(
                    f"tier {self.tier!r} needs a tier key: --tier-key-file names no file (`tierserve serve` writes "
                    "the local one to .tierserve/tier_key; `tierserve tier-key add` makes others)"
                )
        return sent

    def sent_as(self) -> list[str]:
        """perf_analyzer's options that send the parameters (and over HTTP the tier key)."""
        if self.protocol == "grpc":  # the router reads every parameter as text
            return [
                o
                for name, value in self.request_parameters().items()
                for o in ("--request-parameter", f"{name}:{value}:string")
            ]
        headers = {
            f"{PARAMETER_HEADER_PREFIX}{name.replace('_', '-')}": v for name, v in self.request_parameters().items()
        }
        if self.tier_key is not None:
            headers[TIER_KEY_HEADER] = self.tier_key
        return [o for name, value in headers.items() for o in ("-H", f"{name}:{value}")]


def parameter(text: str) -> tuple[str, str]:
    """NAME=VALUE as perf_analyzer can send it: it splits name:value:type on ':' and lowercases all three."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"NAME=VALUE, e.g. deadline_ms=50 or region=eu; got {text!r}")
    if name == "tier":
        raise argparse.ArgumentTypeError("the tier has an option of its own: --tier")
    for part in (name, value):
        if ":" in part or part != part.lower():
            raise argparse.ArgumentTypeError(
                f"{part!r}: perf_analyzer lowercases request parameters and splits them on ':', so it cannot send "
                "this one as written"
            )
    return name, value


def concurrency(text: str) -> str:
    if not _CONCURRENCY.fullmatch(text):
        raise argparse.ArgumentTypeError(f"N or START:END[:STEP], whole numbers from 1, e.g. 4 or 1:8:1; got {text!r}")
    return text


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.3 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"seconds from 0.3 to 3600, got {text!r}")
    return value


def add_perf_options(parser: argparse.ArgumentParser) -> None:
    """The options of `tierserve perf`."""
    parser.add_argument("model", help="the model to load-test: digits, or any model taking PIXELS")
    parser.add_argument("--protocol", choices=sorted(DEFAULT_URLS), default="grpc")
    parser.add_argument("--url", default=None, help="server address (default: localhost:8001 gRPC, :8000 HTTP)")
    parser.add_argument(
        "--tier",
        choices=TIERS,
        default=None,
        help=f"the request's tier (default: the policy's); tiers above {KEYLESS_TIER} need a tier key, which "
        "perf_analyzer sends over HTTP only: --protocol http",
    )
    parser.add_argument(
        "--parameter",
        type=parameter,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another request parameter, e.g. deadline_ms=50, region=eu; repeat for more",
    )
    parser.add_argument(
        "--tier-key-file",
        type=Path,
        default=TIER_KEY_FILE,
        help="the tier key sent over HTTP, when the file exists (default: the local key `tierserve serve` made)",
    )
    parser.add_argument(
        "--concurrency", type=concurrency, default="1", help="requests in flight: N, or START:END[:STEP] (default 1)"
    )
    parser.add_argument(
        "--seconds",
        type=positive_seconds,
        default=3.0,
        help=f"measured per concurrency level, in {WINDOWS} windows whatever their spread (default 3)",
    )
    parser.add_argument(
        "--input-data",
        type=Path,
        default=None,
        help=f"a perf_analyzer --input-data file (default: {INPUT_DATA_8X8} or, for models taking any image size, "
        f"{INPUT_DATA_SIZES}, from the model repository: the held-out test images `tierserve build` wrote)",
    )
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="where the files are")
    parser.add_argument("--csv", type=Path, default=None, help="write perf_analyzer's CSV report here (its -f)")
    parser.add_argument(
        "extra",
        nargs="*",
        metavar="-- PERF_ANALYZER_ARGS",
        help="passed to perf_analyzer after the others, e.g. -- --percentile 99 (options of tierserve perf go "
        "before MODEL then)",
    )


def perf_run(args: argparse.Namespace) -> PerfRun:
    return PerfRun(
        args.model,
        protocol=args.protocol,
        url=args.url,
        tier=args.tier,
        parameters=dict(args.parameter),
        tier_key=read_key_file(args.tier_key_file) if args.protocol == "http" else None,
        concurrency=args.concurrency,
        seconds=args.seconds,
        input_data=args.input_data,
        model_repository=args.model_repository,
        csv=args.csv,
        extra=tuple(args.extra),
    )


def perf_analyzer_command(run: PerfRun, input_data: Path) -> list[str]:
    """The perf_analyzer command line for `run`, sending `input_data`."""
    command = [str(binary()), "-m", run.model, "-u", run.address, "-i", run.protocol, "--input-data", str(input_data)]
    command += run.sent_as()
    command += [
        "--concurrency-range",
        run.concurrency,
        "--measurement-interval",
        str(max(1, round(run.seconds * 1000 / WINDOWS))),
        "--stability-percentage",
        str(ANY_SPREAD),
    ]
    if run.csv is not None:
        command += ["-f", str(run.csv)]
    return command + list(run.extra)


def model_inputs(run: PerfRun) -> list[dict[str, Any]]:
    """The model's inputs as the server describes them (name, datatype, shape with -1 for any size). What the server
    says when it has no such model, or what a server that does not answer raises, goes to the CLI as it is: its
    error handling knows them (an unknown model, an unreachable server)."""
    if run.protocol == "grpc":
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module
    try:
        client = client_module.InferenceServerClient(run.address)
    except ValueError as error:
        raise PerfError(f"--url {run.address!r}: {error}") from None
    try:
        metadata = client.get_model_metadata(run.model, **({"as_json": True} if run.protocol == "grpc" else {}))
    finally:
        client.close()
    return [{**i, "shape": [int(d) for d in i["shape"]]} for i in metadata.get("inputs", [])]


def default_input_data(run: PerfRun, inputs: list[dict[str, Any]]) -> Path:
    """The built input-data file that fits the model's input; PerfError when none does or it was never built."""
    shapes = {i["name"]: i["shape"][-2:] for i in inputs if i.get("datatype") == "FP32"}  # an image's, past the batch
    names = ", ".join(i["name"] for i in inputs) or "nothing"
    files = {(8, 8): INPUT_DATA_8X8, (-1, -1): INPUT_DATA_SIZES}
    name = files.get(tuple(shapes.get(IMAGE_INPUT, ())))
    if len(inputs) != 1 or name is None:
        raise PerfError(
            f"{run.model} takes {names}, not one {IMAGE_INPUT} FP32 [8, 8] or [any, any] input: the built images do "
            "not fit it; pass --input-data FILE (perf_analyzer's format)"
        )
    path = run.model_repository / name
    if not path.is_file():
        raise PerfError(f"no input data at {path}: run `tierserve build --model-repository {run.model_repository}`")
    return path


def run_perf(run: PerfRun) -> int:
    """Run perf_analyzer for `run`, its summary on this process's stdout; its exit status (0: measured)."""
    run.request_parameters()  # what perf_analyzer cannot send is refused before anything reaches the server
    input_data = run.input_data or default_input_data(run, model_inputs(run))
    if not input_data.is_file():
        raise PerfError(f"--input-data {input_data}: no such file")
    try:
        command = perf_analyzer_command(run, input_data)
    except PerfAnalyzerMissing as error:
        raise PerfError(str(error)) from None
    return subprocess.run(command, env=environment(), check=False).returncode


def add_perf_command(commands: argparse._SubParsersAction) -> None:
    """Register `tierserve perf` among the CLI's commands."""
    parser = commands.add_parser(
        "perf",
        help="load-test a model of a running server with perf_analyzer, sending the held-out test images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_perf_options(parser)
    parser.set_defaults(run=lambda args: run_perf(perf_run(args)))
