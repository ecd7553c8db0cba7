"""`tierserve replay`: send logged rows again and say how many answers come back the same.

Against `digits` (the default target) each logged row goes as a request of one image with the parameters it was
sent with (tier, deadline_ms, attributes) and a replay token (tierserve.replay_tokens) carrying its logged seed and
user hash, signed with the server's state secret. The router then draws the row's bandit arm, shadow sampling and
buckets from them as it did the first time, counts the row for no experiment, mirrors nothing and does not log it
again. So against the same model versions, policy and experiments every row comes back with its logged route and
label. What is not logged is read at replay time: the bandits' posteriors and the per-user adaptation records (which
feedback moves), and time (a deadline's budget: an escalation skipped, a call timed out; breakers; load shedding and
degrading). A policy rule on `user_id` sees no user (the log keeps only its hash). The rows not reproduced are listed
with both paths, which show such a difference.

Against one model (`MODEL[:VERSION]`) the logged pixels are resized as the router resizes them and sent straight to
it: how often it agrees with what was answered, and how accurate it is where feedback exists.

Replay changes nothing on the server and only reads the log. Everything that can be checked is checked before the
first row is sent (the target's name, the log, the state secret, the tier key, the server, the target model); a
server that goes away midway ends the replay with ServerUnreachable. Latency is measured per row as the client's
round trip; the logged latency is the router's own (from preprocess to the answer).
"""

from __future__ import annotations

import contextlib
import importlib
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.utils import InferenceServerException

from tierserve.client import TierserveClient, TierserveError
from tierserve.client.classification import MODEL
from tierserve.client.errors import TIMED_OUT, UNREACHABLE, call_errors, status_from
from tierserve.inference_log import InferenceRecord, hops
from tierserve.replay_tokens import REPLAY_PARAMETER, ReplayRow, replay_token
from tierserve.resize import resize_to_native
from tierserve.routing import Hop, path_text
from tierserve.signature import TIERS
from tierserve.state_store import REDIS_SCHEMES, SECRET_KEY, StateStoreError, open_store
from tierserve.tier_keys import KEYLESS_TIER
from tierserve.tools.log_admin import query, read_rows
from tierserve.tools.progress import ProgressCallback, no_progress

TIMEOUT_S = 10.0  # per row: far above any answer the router gives, far below "hung"
SHOWN_DIFFERENCES = 20  # rows listed under the summary when they were not reproduced
INVALID = (grpc.StatusCode.INVALID_ARGUMENT, HTTPStatus.BAD_REQUEST)  # a refusal of the request itself
_TARGET = re.compile(r"^(?P<model>[A-Za-z0-9_][A-Za-z0-9_.-]*)(?::(?P<version>[0-9]+))?$")


class ReplayError(RuntimeError):
    """The replay cannot run as asked; the message names the problem. Nothing was changed."""


class ReplayTargetError(ReplayError):
    """The target is not a `MODEL[:VERSION]` that replay can send rows to."""


class NoRowsToReplay(ReplayError):
    """The log holds no row that matches."""


class ReplaySecretError(ReplayError):
    """The state store that signs replay tokens is missing or holds no secret."""


class TierKeyNeeded(ReplayError):
    """Rows of a tier above standard are to be replayed and no tier key was given."""


class ServerUnreachable(ReplayError):
    """No server answers at the URL, or it went away during the replay."""


class ModelNotReady(ReplayError):
    """The target model, or its version, is not loaded and ready on the server."""


class ReplayRefused(ReplayError):
    """The server refused the replay tokens: they are not signed with the state it runs with."""


@dataclass(frozen=True)
class Target:
    """What rows are replayed against: `digits` (through the router) or one model, at one version or the one the
    server serves to unversioned requests."""

    model: str
    version: str = ""

    @property
    def through_router(self) -> bool:
        return self.model == MODEL

    def __str__(self) -> str:
        return f"{self.model}:{self.version}" if self.version else self.model


def parse_target(text: str | None) -> Target:
    """`digits` for None; ReplayTargetError for anything but MODEL or MODEL:VERSION (and for digits:VERSION)."""
    if text is None:
        return Target(MODEL)
    match = _TARGET.match(text)
    if match is None:
        raise ReplayTargetError(f"replay target {text!r}: expected MODEL or MODEL:VERSION, e.g. digits_heavy:1")
    target = Target(match["model"], match["version"] or "")
    if target.through_router and target.version:
        raise ReplayTargetError(
            f"replay target {text!r}: digits is replayed through its router, whose policy picks the versions; "
            "name no version, or name a model version to replay against it directly"
        )
    return target


@dataclass(frozen=True)
class Agreement:
    """How many of some rows agree."""

    agree: int
    rows: int

    @property
    def share(self) -> float | None:
        return self.agree / self.rows if self.rows else None


@dataclass(frozen=True)
class ReplayedRow:
    """One logged row and what its replay answered (`label` None: the call failed, `error` says why)."""

    request_id: str
    tier: str
    logged_label: int
    logged_route: str
    logged_arms: Mapping[str, str]
    logged_path: tuple[Hop, ...]  # every model tried, with its outcome
    logged_latency_ms: float  # the router's own measure
    feedback_label: int | None  # the true label, where feedback was given
    label: int | None
    route: str | None  # None against a model directly, or when the call failed
    arms: Mapping[str, str] | None  # as route
    path: tuple[Hop, ...] | None  # as route
    latency_ms: float | None  # the client's round trip; None when the call failed
    error: str | None = None

    @property
    def label_agrees(self) -> bool:
        return self.label == self.logged_label

    @property
    def route_agrees(self) -> bool:
        return self.route == self.logged_route

    @property
    def arms_agree(self) -> bool:
        return self.arms is not None and dict(self.arms) == dict(self.logged_arms)


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float


def _latency(values: Sequence[float]) -> Latency | None:
    if not values:
        return None
    return Latency(float(np.percentile(values, 50)), float(np.percentile(values, 99)))


def _accuracy(pairs: Sequence[tuple[int | None, int]]) -> float | None:
    return sum(label == truth for label, truth in pairs) / len(pairs) if pairs else None


@dataclass(frozen=True)
class ReplayReport:
    """Every replayed row, in log order, and the totals over them."""

    target: Target
    url: str
    protocol: str
    rows: tuple[ReplayedRow, ...]
    skipped: tuple[tuple[Path, str], ...] = ()  # corrupt log files left out (skip_corrupt), with what is wrong

    def _count(self, agrees: Callable[[ReplayedRow], bool]) -> Agreement:
        return Agreement(sum(agrees(row) for row in self.rows), len(self.rows))

    @property
    def label_agreement(self) -> Agreement:
        return self._count(lambda row: row.label_agrees)

    @property
    def route_agreement(self) -> Agreement | None:
        """Through the router only: a model called directly has no route."""
        return self._count(lambda row: row.route_agrees) if self.target.through_router else None

    @property
    def arms_agreement(self) -> Agreement | None:
        return self._count(lambda row: row.arms_agree) if self.target.through_router else None

    @property
    def reproduced(self) -> Agreement:
        """Rows answered as logged: label and (through the router) route."""
        if self.target.through_router:
            return self._count(lambda row: row.label_agrees and row.route_agrees)
        return self.label_agreement

    @property
    def errors(self) -> int:
        return sum(row.error is not None for row in self.rows)

    @property
    def feedback_rows(self) -> int:
        return sum(row.feedback_label is not None for row in self.rows)

    @property
    def logged_accuracy(self) -> float | None:
        """Of the logged answers, over the rows with feedback."""
        return _accuracy([(r.logged_label, r.feedback_label) for r in self.rows if r.feedback_label is not None])

    @property
    def replayed_accuracy(self) -> float | None:
        """Of the replayed answers, over the rows with feedback (a failed call is not a right answer)."""
        return _accuracy([(r.label, r.feedback_label) for r in self.rows if r.feedback_label is not None])

    @property
    def logged_latency(self) -> Latency | None:
        return _latency([row.logged_latency_ms for row in self.rows])

    @property
    def replayed_latency(self) -> Latency | None:
        return _latency([row.latency_ms for row in self.rows if row.latency_ms is not None])

    @property
    def differences(self) -> list[ReplayedRow]:
        """The rows not reproduced, or whose arms differ."""
        reproduced = (
            (lambda r: r.label_agrees and r.route_agrees and r.arms_agree)
            if self.target.through_router
            else (lambda r: r.label_agrees)
        )
        return [row for row in self.rows if not reproduced(row)]


# ---------------------------------------------------------------------------------------------------------- replay


def replay(
    log_dir: Path,
    *,
    url: str,
    protocol: str = "grpc",
    state_path: str | Path | None = None,
    target: str | None = None,
    where: str | None = None,
    limit: int | None = None,
    tier_key: str | None = None,
    concurrency: int = 1,
    skip_corrupt: bool = False,
    progress: ProgressCallback = no_progress,
) -> ReplayReport:
    """Replay the rows of the log in `log_dir` (those `where`, a DuckDB condition over log_admin's `answers` view,
    selects; the oldest `limit`) against `target` on the server at `url`, `concurrency` rows at a time, calling
    `progress(done, total)` as rows finish. Through `digits`, `state_path` is the state store the server runs with
    (its secret signs the replay tokens) and `tier_key` is needed for rows of tiers above standard.

    Raises log_admin's LogAdminError subclasses for the log (LogDirectoryError, CorruptLogFile, LogQueryError) and
    ReplayError subclasses for the rest, each before any row is sent except ServerUnreachable (the server went away
    midway) and ReplayRefused (the server does not take the tokens)."""
    parsed = parse_target(target)
    if protocol not in ("grpc", "http"):
        raise ReplayError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    if concurrency < 1:
        raise ReplayError(f"concurrency must be at least 1, got {concurrency}")
    if limit is not None and limit < 1:
        raise ReplayError(f"limit must be at least 1, got {limit}")
    records = read_rows(log_dir, where, limit=limit, skip_corrupt=skip_corrupt)
    if not records:
        raise NoRowsToReplay(f"no logged rows in {log_dir}" + (f" where {where}" if where else ""))
    truths, skipped = _feedback(log_dir, where, skip_corrupt)
    if parsed.through_router:
        secret = _replay_secret(state_path)
        _check_tier_key(records, tier_key)
        opener = _router_sender(url, protocol, secret, tier_key, concurrency)
    else:
        opener = _direct_sender(url, protocol, parsed)
    _check_server(url, protocol, parsed)
    with opener as open_sender:
        replayed = _send_all(
            records,
            truths,
            open_sender,
            lambda: _live(url, protocol),
            concurrency,
            progress,
        )
    return ReplayReport(parsed, url, protocol, tuple(replayed), skipped)


def _feedback(log_dir: Path, where: str | None, skip_corrupt: bool) -> tuple[dict[str, int], tuple]:
    """The feedback label of each row `where` selects that has one, and the corrupt files skipped."""
    sql = "SELECT request_id, feedback_label FROM answers WHERE feedback_label IS NOT NULL"
    if where:
        sql += f" AND ({where})"
    result = query(log_dir, sql, skip_corrupt=skip_corrupt)
    return {request_id: int(label) for request_id, label in result.rows}, result.skipped


def _replay_secret(state_path: str | Path | None) -> bytes:
    """The state store's secret, read without creating a store or a secret where there is none."""
    where = "the state store the server runs with ($TIERSERVE_STATE; `tierserve serve`: .tierserve/state.db)"
    if state_path is None or str(state_path) == "memory:":
        raise ReplaySecretError(f"replay signs each row with the secret of {where}: name it with --state")
    location = str(state_path)
    path = location if location.startswith(REDIS_SCHEMES) else Path(location.removeprefix("sqlite://")).expanduser()
    if isinstance(path, Path) and not (path := path.resolve()).is_file():
        raise ReplaySecretError(f"no state store at {path}: replay signs each row with the secret of {where}")
    try:
        store = open_store(str(path))
        try:
            secret = store.get(SECRET_KEY)
        finally:
            store.close()
    except (StateStoreError, sqlite3.Error, OSError) as error:
        raise ReplaySecretError(f"the state store at {path} cannot be read: {error}") from None
    if secret is None:
        raise ReplaySecretError(f"the state store at {path} holds no secret: no server has run with it")
    return secret


def _check_tier_key(records: Sequence[InferenceRecord], tier_key: str | None) -> None:
    keyed = Counter(r.tier for r in records if r.tier in TIERS and TIERS.index(r.tier) < TIERS.index(KEYLESS_TIER))
    if keyed and tier_key is None:
        tiers = ", ".join(f"{count} {tier}" for tier, count in sorted(keyed.items()))
        raise TierKeyNeeded(
            f"{tiers} row(s) to replay: tiers above {KEYLESS_TIER} need a tier key (--tier-key-file, default "
            f".tierserve/tier_key), or leave them out with --where \"tier = '{KEYLESS_TIER}'\""
        )


def _check_server(url: str, protocol: str, target: Target) -> None:
    """ServerUnreachable unless a server answers at `url`; ModelNotReady unless `target` is ready there;
    ReplayTargetError unless a model replayed directly takes PIXELS and answers PROBS."""
    client = importlib.import_module(f"tritonclient.{protocol}").InferenceServerClient(url)
    try:
        try:
            live = client.is_server_live()
        except (InferenceServerException, OSError) as error:
            raise ServerUnreachable(f"no server answers at {url} ({protocol}): {error}") from None
        if not live:
            raise ServerUnreachable(f"the server at {url} ({protocol}) is not live")
        try:
            ready = client.is_model_ready(target.model, target.version)
        except InferenceServerException:
            ready = False
        metadata = _metadata(client, protocol, target.model)
        if not ready:
            if versions := ", ".join(sorted(metadata.get("versions", []), key=int)):
                raise ModelNotReady(
                    f"{target} is not loaded and ready on the server at {url} (ready versions of {target.model}: "
                    f"{versions})"
                )
            raise ModelNotReady(f"{target.model} is not loaded on the server at {url}")
        if not target.through_router:
            inputs = [i["name"] for i in metadata.get("inputs", [])]
            outputs = [o["name"] for o in metadata.get("outputs", [])]
            if "PIXELS" not in inputs or "PROBS" not in outputs:
                raise ReplayTargetError(
                    f"{target} takes {inputs} and answers {outputs}: replay sends PIXELS and reads PROBS"
                )
            _probe(client, protocol, target)
    finally:
        client.close()


def _probe(client: Any, protocol: str, target: Target) -> None:
    """ReplayTargetError when `target` refuses a blank 8x8 image as an invalid request: it takes no direct calls (a
    lane: capacity kept for the router's critical rows), so it would refuse every row. Other failures (an injected
    fault) are left to the rows."""
    module = importlib.import_module(f"tritonclient.{protocol}")
    blank = module.InferInput("PIXELS", [1, 8, 8], "FP32")
    blank.set_data_from_numpy(np.zeros((1, 8, 8), np.float32))
    try:
        client.infer(target.model, [blank], model_version=target.version)
    except InferenceServerException as error:
        if status_from(protocol, error.status()) in INVALID:
            raise ReplayTargetError(f"{target} refuses direct calls: {error.message()}") from None


def _metadata(client: Any, protocol: str, model: str) -> dict:
    """The model's metadata (ready versions, inputs, outputs); {} when the server has no such model loaded."""
    try:
        return (
            client.get_model_metadata(model, as_json=True) if protocol == "grpc" else client.get_model_metadata(model)
        )
    except InferenceServerException:
        return {}


def _live(url: str, protocol: str) -> bool:
    client = importlib.import_module(f"tritonclient.{protocol}").InferenceServerClient(url)
    try:
        return bool(client.is_server_live())
    except (InferenceServerException, OSError):
        return False
    finally:
        client.close()


# --------------------------------------------------------------------------------------------------------- senders


@dataclass(frozen=True)
class Replayed:
    """What one row's replay answered: through the router the route, arms and path too."""

    label: int
    route: str | None = None
    arms: Mapping[str, str] | None = None
    path: tuple[Hop, ...] | None = None


Send = Callable[[InferenceRecord], Replayed]
OpenSender = Callable[[], contextlib.AbstractContextManager[Send]]  # one per worker thread


@contextlib.contextmanager
def _router_sender(
    url: str, protocol: str, secret: bytes, tier_key: str | None, concurrency: int
) -> Iterator[OpenSender]:
    """Rows through `digits`, with their replay tokens, on one SDK client shared by every worker."""
    try:
        client = TierserveClient(url, protocol, timeout_s=TIMEOUT_S, tier_key=tier_key, max_connections=concurrency)
    except ValueError as error:
        raise ReplayError(str(error)) from None

    def send(record: InferenceRecord) -> Replayed:
        token = replay_token(secret, ReplayRow(record.seed, record.user_hash or ""))
        # the token travels as one more request parameter, beside the attributes the row was sent with
        (answer,) = client.classify(
            record.pixels,
            tier=record.tier,
            deadline_ms=record.deadline_ms,
            attributes={**record.attributes, REPLAY_PARAMETER: token},
        )
        return Replayed(answer.label, answer.route, dict(answer.arms), hops(answer.path))

    @contextlib.contextmanager
    def shared() -> Iterator[Send]:
        yield send

    try:
        yield shared
    finally:
        client.close()


@contextlib.contextmanager
def _direct_sender(url: str, protocol: str, target: Target) -> Iterator[OpenSender]:
    """Rows resized as the router resizes them, straight to the target model, on a client per worker thread (a
    tritonclient.http client must stay on the thread that made it)."""
    module = importlib.import_module(f"tritonclient.{protocol}")
    timeouts = {"client_timeout": TIMEOUT_S} if protocol == "grpc" else {}
    connection_errors = () if protocol == "grpc" else (OSError,)

    @contextlib.contextmanager
    def per_thread() -> Iterator[Send]:
        client = (
            module.InferenceServerClient(url)
            if protocol == "grpc"
            else module.InferenceServerClient(url, connection_timeout=TIMEOUT_S, network_timeout=TIMEOUT_S)
        )

        def send(record: InferenceRecord) -> Replayed:
            pixels = resize_to_native(np.asarray(record.pixels, np.float32)[None])
            tensor = module.InferInput("PIXELS", list(pixels.shape), "FP32")
            tensor.set_data_from_numpy(pixels)
            with call_errors(protocol, url, TIMEOUT_S, connection_errors):
                result = client.infer(
                    target.model,
                    [tensor],
                    model_version=target.version,
                    outputs=[module.InferRequestedOutput("PROBS")],
                    **timeouts,
                )
            return Replayed(int(np.argmax(result.as_numpy("PROBS")[0])))

        try:
            yield send
        finally:
            client.close()
            if protocol == "http":  # the gevent hub tritonclient.http made for this thread
                import gevent

                gevent.get_hub().destroy(destroy_loop=True)

    yield per_thread


def _send_all(
    records: Sequence[InferenceRecord],
    truths: Mapping[str, int],
    open_sender: OpenSender,
    alive: Callable[[], bool],
    concurrency: int,
    progress: ProgressCallback,
) -> list[ReplayedRow]:
    """Every record sent, `concurrency` at a time, the results in the records' order. A ReplayError from a row
    stops the others (no further row is sent) and is raised."""
    total = len(records)
    results: list[ReplayedRow | None] = [None] * total
    pending = iter(range(total))
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[BaseException] = []
    done = 0

    def work() -> None:
        nonlocal done
        with open_sender() as send:
            while not stop.is_set():
                with lock:
                    index = next(pending, None)
                if index is None:
                    return
                try:
                    results[index] = _replayed(records[index], truths.get(records[index].request_id), send, alive)
                except BaseException as error:  # a ReplayError, or a bug: no further row is sent
                    with lock:
                        failures.append(error)
                    stop.set()
                    return
                with lock:
                    done += 1
                    progress(done, total)

    progress(0, total)
    with ThreadPoolExecutor(min(concurrency, total), thread_name_prefix="tierserve-replay") as pool:
        for worker in [pool.submit(work) for _ in range(min(concurrency, total))]:
            worker.result()
    if failures:
        raise failures[0]
    return [row for row in results if row is not None]


def _replayed(record: InferenceRecord, truth: int | None, send: Send, alive: Callable[[], bool]) -> ReplayedRow:
    """One record sent and compared. A refusal of this row alone is recorded in the row; one that is not about the
    row (the server is gone: `alive()` says no; the tokens are not the server's) is raised."""
    logged = dict(
        request_id=record.request_id,
        tier=record.tier,
        logged_label=record.label,
        logged_route=record.route,
        logged_arms=dict(record.arms),
        logged_path=record.path,
        logged_latency_ms=record.latency_ms,
        feedback_label=truth,
    )
    started = time.perf_counter()
    try:
        answer = send(record)
    except TierserveError as error:
        if error.status in INVALID and REPLAY_PARAMETER in error.message:  # the router names what it refused
            raise ReplayRefused(
                f"the server refused the replay token of row {record.request_id}: {error.message}; the state "
                "store given must be the one the server runs with"
            ) from None
        if error.status in (*UNREACHABLE.values(), *TIMED_OUT.values()) and not alive():
            raise ServerUnreachable(f"the server went away during the replay: {error}") from None
        return ReplayedRow(**logged, label=None, route=None, arms=None, path=None, latency_ms=None, error=str(error))
    latency_ms = (time.perf_counter() - started) * 1000
    return ReplayedRow(
        **logged, label=answer.label, route=answer.route, arms=answer.arms, path=answer.path, latency_ms=latency_ms
    )


# ---------------------------------------------------------------------------------------------------------- output


def _share(agreement: Agreement) -> str:
    share = agreement.share
    return f"{agreement.agree:>6} / {agreement.rows:<6} {'-' if share is None else f'{100 * share:.1f}%':>6}"


def _ms(latency: Latency | None) -> tuple[str, str]:
    return ("-", "-") if latency is None else (f"{latency.p50_ms:.2f}", f"{latency.p99_ms:.2f}")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _answer(label: int | None, route: str | None) -> str:
    return "-" if label is None else f"{label} by {route}" if route else str(label)


def _arms(arms: Mapping[str, str] | None) -> str:
    return "-" if arms is None else ",".join(f"{e}={a}" for e, a in arms.items()) or "none"


def _path(path: tuple[Hop, ...] | None) -> str:
    return "-" if path is None else path_text(path)


def _difference(row: ReplayedRow, router: bool, width: int) -> list[str]:
    """A row not reproduced: what was logged and what the replay answered (through the router with each one's
    path and arms, which say what changed: a timeout, another arm, another model)."""
    logged = _answer(row.logged_label, row.logged_route)
    lines = [f"  {row.request_id}  {row.tier}"]
    if router:
        lines.append(f"    logged    {logged:<{width}}  path {_path(row.logged_path)}  arms {_arms(row.logged_arms)}")
    else:
        lines.append(f"    logged    {logged}")
    if row.error is not None:
        return [*lines, f"    replayed  {row.error}"]
    replayed = _answer(row.label, row.route)
    if router:
        return [*lines, f"    replayed  {replayed:<{width}}  path {_path(row.path)}  arms {_arms(row.arms)}"]
    return [*lines, f"    replayed  {replayed}"]


def report_table(report: ReplayReport) -> str:
    """The summary (agreement, accuracy from feedback, latency) and the rows not reproduced (the first
    SHOWN_DIFFERENCES), as text."""
    router = report.target.through_router
    against = "digits (through the router)" if router else f"{report.target} (directly)"
    measures = [
        ("reproduced (route and label)" if router else "label agrees with the logged answer", report.reproduced)
    ]
    if router:
        assert report.route_agreement is not None and report.arms_agreement is not None
        measures += [
            ("label agrees", report.label_agreement),
            ("route agrees", report.route_agreement),
            ("arms agree", report.arms_agreement),
        ]
    width = max(len(name) for name, _ in measures)
    lines = [f"replay of {len(report.rows)} logged rows against {against} at {report.url} ({report.protocol})"]
    lines += [f"  {name:<{width}}  {_share(agreement)}" for name, agreement in measures]
    lines.append(f"  {'not answered':<{width}}  {report.errors:>6}")
    unanswered = sum(row.feedback_label is not None and row.error is not None for row in report.rows)
    lines.append(
        f"accuracy from feedback ({report.feedback_rows} rows): logged {_rate(report.logged_accuracy)}, "
        f"replayed {_rate(report.replayed_accuracy)}"
        + (f" ({unanswered} not answered, counted wrong)" if unanswered else "")
    )
    (logged_p50, logged_p99), (replayed_p50, replayed_p99) = _ms(report.logged_latency), _ms(report.replayed_latency)
    lines += [
        f"  {'latency (ms)':<24}  {'p50':>8}  {'p99':>8}",
        f"  {'logged (router)':<24}  {logged_p50:>8}  {logged_p99:>8}",
        f"  {'replayed (round trip)':<24}  {replayed_p50:>8}  {replayed_p99:>8}",
    ]
    if differences := report.differences:
        shown = differences[:SHOWN_DIFFERENCES]
        more = f"; the first {len(shown)} shown" if len(shown) < len(differences) else ""
        lines += ["", f"rows not reproduced ({len(differences)} of {len(report.rows)}{more}):"]
        width = max(len(_answer(row.logged_label, row.logged_route)) for row in shown)
        for row in shown:
            lines += _difference(row, router, width)
    lines += [f"warning: skipped corrupt file {path}: {why}" for path, why in report.skipped]
    return "\n".join(lines)


def report_png(report: ReplayReport, path: Path) -> None:
    """Two panels: agreement and accuracy (logged vs replayed) as bars, and the latency distributions (the logged
    router latency and the replayed round trip). ReplayError when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReplayError("no plot: matplotlib is not installed (pip install matplotlib)") from None
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    shares, latency = figure.subplots(1, 2)
    bars = {"reproduced" if report.target.through_router else "agrees with\nlogged label": report.reproduced.share}
    if report.target.through_router:
        bars |= {
            "label": report.label_agreement.share,
            "route": report.route_agreement.share if report.route_agreement else None,
            "arms": report.arms_agreement.share if report.arms_agreement else None,
        }
    bars |= {"accuracy\nlogged": report.logged_accuracy, "accuracy\nreplayed": report.replayed_accuracy}
    names = list(bars)
    values = [bars[name] or 0.0 for name in names]
    drawn = shares.bar(names, values, color=["C0"] * (len(names) - 2) + ["C1", "C2"])
    shares.bar_label(drawn, labels=["-" if bars[n] is None else f"{bars[n]:.3f}" for n in names])
    shares.set(
        ylim=(0, 1.1),
        ylabel="share of rows",
        title=f"{len(report.rows)} rows replayed against {report.target} ({report.feedback_rows} with feedback)",
    )
    for name, values_ms in (
        ("logged (router)", [row.logged_latency_ms for row in report.rows]),
        ("replayed (round trip)", [row.latency_ms for row in report.rows if row.latency_ms is not None]),
    ):
        if values_ms:
            ordered = np.sort(values_ms)
            latency.step(ordered, np.arange(1, len(ordered) + 1) / len(ordered), where="post", label=name)
    latency.set(xlabel="latency (ms)", ylabel="share of rows at or below", title="latency", xscale="log")
    for panel in (shares, latency):
        panel.grid(alpha=0.3)
    if latency.has_data():
        latency.legend()
    figure.savefig(path, dpi=100)
