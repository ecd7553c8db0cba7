"""What `tierserve` exits with, so that a script can branch on it, and how an expected failure (one the command line
knows as the operator's to act on) is reported: one line on stderr and its exit code, no traceback."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from enum import IntEnum
from http import HTTPStatus
from http.client import HTTPException

import grpc
from tritonclient.utils import InferenceServerException

from tierserve.client.errors import Status, TierserveError, is_restricted_refusal, status_from


class ExitCode(IntEnum):
    """`tierserve`'s exit status (MEANINGS says what each means; `tierserve --help` and the README list them)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    UNAUTHORIZED = 4
    NOT_FOUND = 5
    INTERRUPTED = 130


MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "done; a canary promoted its candidate",
    ExitCode.FAILED: "any other expected failure: a check or gate failed, an action was refused (nothing changed) or "
    "failed, a file is malformed",
    ExitCode.USAGE: "a malformed command line (argparse's own status)",
    ExitCode.UNREACHABLE: "no server answered at --url (refused, unknown host, not Triton's port, no answer in time), "
    "or it answered that it is unavailable",
    ExitCode.UNAUTHORIZED: "no admin key, or not the one the server runs with; replay tokens signed with another state "
    "store",
    ExitCode.NOT_FOUND: "an unknown model, version or experiment",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}

# Triton's statuses (gRPC, and HTTP as tritonclient and the SDK report them) that name one of the failures above.
_STATUS_CODES: dict[Status, ExitCode] = {
    grpc.StatusCode.UNAVAILABLE: ExitCode.UNREACHABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: ExitCode.UNREACHABLE,
    HTTPStatus.SERVICE_UNAVAILABLE: ExitCode.UNREACHABLE,
    HTTPStatus.GATEWAY_TIMEOUT: ExitCode.UNREACHABLE,
    grpc.StatusCode.PERMISSION_DENIED: ExitCode.UNAUTHORIZED,
    grpc.StatusCode.UNAUTHENTICATED: ExitCode.UNAUTHORIZED,
    HTTPStatus.UNAUTHORIZED: ExitCode.UNAUTHORIZED,
    HTTPStatus.FORBIDDEN: ExitCode.UNAUTHORIZED,
    grpc.StatusCode.NOT_FOUND: ExitCode.NOT_FOUND,
    HTTPStatus.NOT_FOUND: ExitCode.NOT_FOUND,
}
# What a connection that reached no Triton server raises: refused or reset, an unknown host, no answer in time, or an
# answer that is not HTTP (a gRPC port given to an HTTP client).
UNREACHABLE_ERRORS = (ConnectionError, TimeoutError, socket.gaierror, HTTPException)


@dataclass(frozen=True)
class Failure:
    """An expected failure as the command line reports it."""

    code: ExitCode
    message: str  # one line, without the "tierserve: " prefix


def failure(error: BaseException, url: str | None = None) -> Failure:
    """How the command line reports an expected failure (`url`: the server the command was given)."""
    lines = [line.strip() for line in _text(error).splitlines() if line.strip()]
    text = "; ".join(lines) or type(error).__name__
    code = _code(error)
    if code == ExitCode.UNREACHABLE and url and url not in text:
        text = f"cannot reach the server at {url}: {text}"
    return Failure(code, text)


def _code(error: BaseException) -> ExitCode:
    from tierserve.tools.experiment_admin import ExperimentNotRunning
    from tierserve.tools.lifecycle import Problem, Refused
    from tierserve.tools.replay import ModelNotReady, ReplayRefused, ServerUnreachable

    if isinstance(error, Refused):
        unknown = error.problem in (Problem.UNKNOWN_MODEL, Problem.UNKNOWN_VERSION)
        return ExitCode.NOT_FOUND if unknown else ExitCode.FAILED
    if isinstance(error, (ExperimentNotRunning, ModelNotReady)):
        return ExitCode.NOT_FOUND
    if isinstance(error, (PermissionError, ReplayRefused)):  # NoAdminKey and AdminKeyRefused are PermissionErrors
        return ExitCode.UNAUTHORIZED
    if isinstance(error, (*UNREACHABLE_ERRORS, ServerUnreachable)):
        return ExitCode.UNREACHABLE
    if isinstance(error, InferenceServerException):
        if is_restricted_refusal(error.message() or ""):  # over gRPC Triton 2.51 says UNAVAILABLE for it
            return ExitCode.UNAUTHORIZED
        return _STATUS_CODES.get(_status(error.status()), ExitCode.FAILED)
    if isinstance(error, TierserveError) and error.status is not None:
        return _STATUS_CODES.get(error.status, ExitCode.FAILED)
    return ExitCode.FAILED


def _status(status: str | None) -> Status | None:
    """tritonclient's status string ('StatusCode.NOT_FOUND' over gRPC, '404' over HTTP) as a typed value."""
    if status is None or not (status.startswith("StatusCode.") or status.isdigit()):
        return None
    return status_from("grpc" if status.startswith("StatusCode.") else "http", status)


def _text(error: BaseException) -> str:
    from tierserve.operator_lock import ChangeRefused
    from tierserve.tools.lifecycle import Refused

    if isinstance(error, InferenceServerException):
        return f"the server did not take it: {error.message()}"
    if isinstance(error, (Refused, ChangeRefused)):
        return f"refused, nothing changed: {error}"
    if isinstance(error, HTTPException):  # e.g. the gRPC port given to an HTTP client
        return f"its answer is not HTTP ({type(error).__name__}: {error}); is that the server's HTTP port?"
    if isinstance(error, KeyError) and error.args:  # ExperimentNotRunning: str() would quote the message
        return str(error.args[0])
    return str(error)
