"""TierserveError: every way a call can fail, as one exception whose status is typed per protocol."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from http import HTTPStatus

import grpc
from tritonclient.utils import InferenceServerException

Status = grpc.StatusCode | int  # an HTTP code is an http.HTTPStatus where the code is a standard one

# what a server that cannot be reached, or does not answer in time, reports as over each protocol: gRPC's own
# codes for these cases, and for HTTP the codes a gateway would answer with
UNREACHABLE: dict[str, Status] = {"grpc": grpc.StatusCode.UNAVAILABLE, "http": HTTPStatus.SERVICE_UNAVAILABLE}
TIMED_OUT: dict[str, Status] = {"grpc": grpc.StatusCode.DEADLINE_EXCEEDED, "http": HTTPStatus.GATEWAY_TIMEOUT}
# a gateway (nginx in front of several servers) that lost the server's answer: over gRPC nginx says UNAVAILABLE
LOST_BY_GATEWAY = HTTPStatus.BAD_GATEWAY
RETRYABLE = frozenset({*UNREACHABLE.values(), *TIMED_OUT.values(), LOST_BY_GATEWAY})
# tritonclient's words for an HTTP error whose body is not Triton's JSON (a proxy's HTML page, say)
UNDECODED = "an exception occurred in the client while decoding the response"
# How Triton (2.51 to 2.64) words a refusal of a call to an API restricted by --http-restricted-api (403) or
# --grpc-restricted-protocol (UNAVAILABLE, as if the server were down).
RESTRICTED_REFUSALS = ("This API is restricted, expecting header", "This protocol is restricted, expecting header")


def is_restricted_refusal(message: str) -> bool:
    """Whether a server's error message refuses a call for want of the header a restricted API requires."""
    return message.startswith(RESTRICTED_REFUSALS)


class TierserveError(RuntimeError):
    """A call failed: the server refused it, did not answer within the timeout, or could not be reached.

    `status` is a `grpc.StatusCode` over gRPC and an int HTTP code (`http.HTTPStatus`) over HTTP, so a caller
    branches on one value whatever went wrong; None only when the client library failed without one.
    """

    def __init__(self, status: Status | None, message: str) -> None:
        super().__init__(status, message)  # both in args: a pickled error (another process's) comes back whole
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"{_name(self.status)}: {self.message}"

    @property
    def retryable(self) -> bool:
        """True when the same request may succeed later: the server was unreachable, shed it or timed out, or a
        gateway in between lost its answer."""
        return self.status in RETRYABLE


def _name(status: Status | None) -> str:
    if isinstance(status, grpc.StatusCode):
        return status.name
    if isinstance(status, HTTPStatus):
        return f"{status.value} {status.phrase}"
    return str(status)


def status_from(protocol: str, status: str | None) -> Status | None:
    """tritonclient's status string ('StatusCode.INVALID_ARGUMENT', '400') as a typed value."""
    if status is None:
        return None
    if protocol == "grpc":
        return grpc.StatusCode[status.removeprefix("StatusCode.")]
    try:
        return HTTPStatus(int(status))
    except ValueError:
        return int(status)


@contextlib.contextmanager
def call_errors(
    protocol: str, url: str, timeout_s: float, connection_errors: tuple[type[BaseException], ...]
) -> Iterator[None]:
    """Turn whatever one call raises into a TierserveError: refusals keep the server's status, a call that ran
    out of time gets TIMED_OUT, and `connection_errors` (the transport's own, raw) get UNREACHABLE."""
    try:
        yield
    except InferenceServerException as error:
        status, message = status_from(protocol, error.status()), error.message() or str(error)
        if status is grpc.StatusCode.DEADLINE_EXCEEDED:  # gRPC's own words for its client-side deadline
            message = f"no answer from {url} within {timeout_s:g} s ({message})"
        elif status is grpc.StatusCode.UNAVAILABLE and is_restricted_refusal(message):
            status = grpc.StatusCode.PERMISSION_DENIED  # not retryable, whatever Triton's code says
        elif protocol == "http" and message.startswith(UNDECODED):  # say what answered, not how parsing it failed
            body = " ".join((error.debug_details() or "").split())
            message = f"{url} answered with a body that is not Triton's (a proxy in between?): {body[:200]!r}"
        raise TierserveError(status, message) from None
    except (TimeoutError, asyncio.TimeoutError) as error:
        raise TierserveError(TIMED_OUT[protocol], f"no answer from {url} within {timeout_s:g} s") from error
    except connection_errors as error:
        raise TierserveError(UNREACHABLE[protocol], f"cannot reach {url}: {type(error).__name__}: {error}") from error
