"""Triton glue for `digits`, the router: each request's PIXELS resized to 8x8, BLS calls to the policy's models,
answers with route, reason, path, REQUEST_ID and ARMS; experiments' shadow calls after the answers."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tierserve.batching import Rejected, infer_rows
from tierserve.experiment_spec import EXPERIMENTS_FILE, ExperimentSpecError
from tierserve.experiment_stats import ShadowOutcome
from tierserve.experimenter import (
    EXPERIMENTS_PARAMETER,
    Experimenter,
    ExperimentsFollower,
    RowPlan,
    served_experiments,
)
from tierserve.faults import refuse_faults
from tierserve.guarded_store import GuardedStore
from tierserve.healing import RELOAD_WAIT_S, Healer, ReloadLog
from tierserve.inference_log import LOG_DIR_ENV, inference_record, load_settings
from tierserve.load_shedding import SHED, shed_message
from tierserve.model_states import DRILL_POLL_S, POLL_S, TritonStateProbe
from tierserve.pixels import NUM_CLASSES, infinity_problem
from tierserve.promotions import describe, served_promotions
from tierserve.queue_wait import QueueProbe, QueueWaitMeter
from tierserve.replay_tokens import REPLAY_PARAMETER, ReplayRow, ReplayTokenError, parse_replay
from tierserve.repository_api import NotLoaded, RepositoryApi, RepositoryError
from tierserve.request_context import ParameterError, parse_context
from tierserve.resize import resize_to_native, size_problem, source_stats
from tierserve.router_files import in_process_runners, load_router
from tierserve.routing import (
    Answer,
    ModelCallError,
    ModelDown,
    ModelRefused,
    ModelTimeout,
    RowResult,
    Shed,
    Unanswered,
)
from tierserve.server_scratch import LANE_TOKEN_PARAMETER, lane_token, server_scratch, server_secret
from tierserve.shadow import BATCH_ROWS, GATHER_S, Mirror, ShadowQueue, outcomes
from tierserve.signature import RequestContext, signatures
from tierserve.state_store import STATE_ENV, StateStoreError, default_location, open_store
from tierserve.thread_names import ROUTER_EXECUTE, NamedThread, name_os_thread
from tierserve.tier_keys import TIER_KEYS_ENV, TierKeyError, TierKeys, presented_key
from tierserve.triton_router_metrics import RouterMetrics, open_inference_log
from tierserve.warmup import WarmUp

IDLE_S = 0.25  # an instance without an execute for this long, and nothing dispatched, reports no queue wait
QUEUE_POLL_S = 0.05  # how often an instance reads Triton's queue statistics of this model (its load signal)
# ... and how often once it has had no execute for IDLE_POLL_AFTER_S (its gauge is at zero by then): idle, 20
# readings a second cost the two instances and tritonserver ~5% of two cores. Its next execute wakes it at once.
IDLE_POLL_S = 1.0
IDLE_POLL_AFTER_S = 2.0
FAULT_HOLD_S = 1.0  # readings this soon after a stuck downstream call are not load (the queue it left drains)
STATS_GRACE_S = 10.0  # unreadable statistics are an error after this long (the HTTP endpoint starts last)
FLUSH_S = 0.5  # how often experiment counts are written to the state store (off the hot path)
RELOAD_POLL_S = 0.1  # how often an instance looks whether someone else's reload it waits on has ended
METRICS_FLUSH_S = 0.1  # how often the metrics executes recorded are sent to tritonserver (scrapes see them this late)


def _store_changed(up: bool, why: str) -> None:
    if up:
        pb_utils.Logger.log_info(f"router: the state store {why}; experiment counts catch up")
    else:
        pb_utils.Logger.log_error(
            f"router: the state store failed ({why}); answering from the state read last (bandits frozen, "
            "experiment counts kept for later) until it answers again"
        )


def _error(message: str, code: int) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _text(values: list[str]) -> np.ndarray:
    return np.array([[v.encode()] for v in values], dtype=np.object_)


class TritonPythonModel:
    """Routes every row of a dynamic batch; one BLS call per model per round, all models concurrently."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        refuse_faults(args["model_name"], config)
        # a store that fails is no outage: executes answer from what was read last; _flush probes until it is back
        self.store = GuardedStore(open_store(os.environ.get(STATE_ENV) or default_location()), on_change=_store_changed)
        # promoted versions: as the tools reloaded this model (config parameter), else as the state store says
        promotions = served_promotions(self.store, config)
        self.router, self.stats = load_router(Path(args["model_repository"]), args["model_version"], promotions)
        pb_utils.Logger.log_info(f"router: promotions: {describe(promotions)}")
        self.policy = self.router.policy
        # the models the router answers for itself while Triton has them READY and unfaulted (tierserve.model_states)
        self.in_process = in_process_runners(Path(args["model_repository"]), self.policy)
        for runner in self.in_process.values():  # warm: a cold first call took ~20 ms
            for _ in range(2):
                runner.infer(np.zeros((1, 8, 8), np.float32))
        # shared by this server's router instances (their parent process is tritonserver)
        scratch = server_scratch(os.getppid())
        self.reload_log = ReloadLog(scratch)
        self._holding: set[str] = set()  # models whose breakers are held while a reload runs (_hold_while)
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop executes run on, once one ran
        self.lane_token = lane_token(server_secret(scratch))
        self.lanes = set(self.policy.callable_models) - set(self.policy.models)
        # the load signal: Triton's own count of how long requests queued for this model (tierserve.queue_wait)
        self.queue = QueueProbe(args["model_name"], args["model_version"])
        try:  # reloads go over HTTP: pb_utils would stop every thread of this stub until the load is done
            self.repository: RepositoryApi | None = RepositoryApi(os.getppid())
        except OSError as error:
            pb_utils.Logger.log_warn(f"router: tritonserver's command line unreadable ({error}); reloads use pb_utils")
            self.repository = None
        self.healer = Healer(
            self.policy.reload_min_interval_s,
            self.reload_log,
            trip=lambda model, why: self.router.breakers[model].trip(why),
            reload=self._reload,
            await_reload=self._await_reload,
        )
        self.metrics = RouterMetrics(self.policy.callable_models, self.policy.tiers, args["model_instance_name"])
        self.metrics.in_process_state(self.router.states)
        self.warm_up = WarmUp(config)
        # experiments: applied with the config (tierserve experiment apply), else as the state store or the file says
        applied = config.get("parameters", {}).get(EXPERIMENTS_PARAMETER, {}).get("string_value")
        spec, source = served_experiments(
            self.store, self.policy, Path(args["model_repository"]) / EXPERIMENTS_FILE, applied
        )
        self.experimenter = Experimenter(spec, self.policy, self.store)
        # what another server's apply writes to the shared store: taken whole from the next flush on
        self.follower = ExperimentsFollower(self.store, self.policy, spec)
        self.replay_secret = self.experimenter.secret  # replay tokens are signed with the state's secret
        log_settings = load_settings(Path(args["model_repository"]), os.environ.get(LOG_DIR_ENV))
        self.inference_log = open_inference_log(log_settings, "router")
        self.shadow = ShadowQueue()
        self._mirroring: asyncio.Future | None = None  # the shadow sender task, while one runs
        pb_utils.Logger.log_info(
            f"router: {len(spec.experiments)} experiment(s) from {source}: "
            f"{', '.join(e.name for e in spec.experiments) or 'none'}"
        )
        # tiers above standard need a tier key; without a keys file (tritonserver run by hand) none is granted
        self._keys_path = Path(path) if (path := os.environ.get(TIER_KEYS_ENV)) else None
        self._keys, self._keys_mtime, self._keys_checked = TierKeys(), None, float("-inf")
        self._tier_keys()
        self._healing_until = float("-inf")  # until when this instance's model reload keeps readings out of the gauge
        self._last_execute: float | None = time.monotonic()  # when the latest execute ended; None during one
        self._stopping = threading.Event()
        self._queue_wake = threading.Event()  # set by an execute after idling: read the load signal now
        # named for the OS as well (top -H, py-spy, perf/bench_stub_cpu.py tell their CPU apart)
        NamedThread(self._watch_queue, "router-queue").start()
        NamedThread(self._watch_models, "router-states").start()
        self._flusher = NamedThread(self._flush, "router-counts")
        self._flusher.start()
        NamedThread(self._send_metrics, "router-metrics").start()

    def _flush(self) -> None:
        """Experiment counts go to the state store from here, never from an execute; while the store is down they
        wait here (bounded) and this thread probes it. A store that answers without the shared secret lost its data
        (a Redis restarted empty): what the servers must agree on is written back first."""
        reported = 0
        while not self._stopping.wait(FLUSH_S):
            try:
                if self.store.probe() is None:
                    self.experimenter.restore_shared()
                self.experimenter.flush()
                self._follow_experiments()
            except StateStoreError:
                pass  # kept for the next flush; the guard logged the outage and counts it in the metrics
            except Exception as error:  # a bug here costs counts, never answers
                pb_utils.Logger.log_error(f"router: experiment counts not written: {error!r}")
            self.metrics.state_store.update(self.store)
            if (dropped := self.experimenter.dropped_rows) > reported:
                pb_utils.Logger.log_warn(f"router: {dropped} experiment rows not counted (the state store fell behind)")
                reported = dropped
            if self.inference_log is not None:
                self.metrics.inference_log(self.inference_log.dropped, self.inference_log.lost)

    def _follow_experiments(self) -> None:
        """Serve the experiments a newer revision in the state store holds (applied on any server sharing it)."""
        try:
            spec = self.follower.newer()
        except ExperimentSpecError as error:  # said once per stored value; the served experiments stay
            pb_utils.Logger.log_error(f"router: the experiments in the state store are not served here: {error}")
            return
        if spec is not None:
            self.experimenter.serve(spec)
            pb_utils.Logger.log_info(
                f"router: experiments revision {spec.revision} from the state store: "
                f"{', '.join(e.name for e in spec.experiments) or 'none'}"
            )

    def _send_metrics(self) -> None:
        """What executes recorded in the metrics goes to tritonserver from here (tierserve.triton_router_metrics)."""
        while not self._stopping.wait(METRICS_FLUSH_S):
            self.metrics.batch.flush()

    def _watch_queue(self) -> None:
        """Feed the load gauge from Triton's queue statistics: the mean wait of the requests dispatched since the
        last reading, unless this instance was stuck on a failing downstream call meanwhile (a fault is not
        overload: such a reading is left out). An instance that has had nothing for IDLE_S while nothing was
        dispatched has nobody waiting for it: its gauge falls to zero instead of showing the last flood's wait. One
        idle for IDLE_POLL_AFTER_S reads them every IDLE_POLL_S, until its next execute wakes it."""
        meter, said, unreadable_since = QueueWaitMeter(), False, time.monotonic()  # HTTP starts after the models
        interval = QUEUE_POLL_S
        while not self._stopping.is_set():
            self._queue_wake.wait(interval)
            self._queue_wake.clear()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            idle = self._last_execute is not None and now - self._last_execute >= IDLE_POLL_AFTER_S
            interval = IDLE_POLL_S if idle else QUEUE_POLL_S
            try:
                wait_ms = meter.mean_wait_ms(self.queue.read())
            except (OSError, ValueError) as error:  # no statistics: no load signal; said once until it returns
                if not said and now - unreadable_since >= STATS_GRACE_S:
                    pb_utils.Logger.log_error(f"router: no load signal, so no shedding: {error}")
                    said = True
                wait_ms = None
            else:
                if said:
                    pb_utils.Logger.log_info("router: Triton's queue statistics are readable again")
                said, unreadable_since = False, now
            if wait_ms is None:
                if self._last_execute is None or now - self._last_execute < IDLE_S:
                    continue  # busy, and nothing new was dispatched: the gauge stays as it is
                wait_ms = 0.0
            if self.router.stalls.overlap(now - wait_ms / 1000 - FAULT_HOLD_S, now) > 0 or now < self._healing_until:
                continue  # they waited while this instance was stuck on failing calls or healing a model: a fault
            self.metrics.state(self.router.breakers, self.router.load.observe(wait_ms))

    def _watch_models(self) -> None:
        """Keep the router's view of its in-process and optional models as Triton has them (readiness, injected
        faults), and of which models it calls are under a fault drill; a reading that fails leaves the view as it
        is."""
        probe, states, drills_read = TritonStateProbe(), self.router.states, float("-inf")
        while not self._stopping.wait(POLL_S):
            for model in states.watched:
                try:
                    states.update(model, probe.read(model))
                except OSError:
                    continue
            self.metrics.in_process_state(states)
            self._notice_reloads()
            if (now := time.monotonic()) - drills_read >= DRILL_POLL_S:
                drills_read = now
                for name in states.called_names:
                    try:
                        states.update_drill(name, probe.drilled(name))
                    except OSError:
                        continue

    def finalize(self) -> None:
        self._stopping.set()
        self._queue_wake.set()
        self._flusher.join(timeout=5)
        self.metrics.batch.flush()  # after the flusher's last inference-log counts
        try:
            self.experimenter.flush()
        except StateStoreError as error:
            pb_utils.Logger.log_error(f"router: experiment counts lost at unload: {error}")
        self.store.close()
        if self.inference_log is not None:
            self.inference_log.close()

    async def _warm(self, requests: list) -> list:
        """A warm-up execute: the whole decision path on the samples, answered as the safe default would be
        without calling it (models may still be loading); neither the load gauge nor metrics move."""

        async def uniform(model: str, images: np.ndarray, parameters: dict[str, str], *, timeout_s: float):
            return np.full((len(images), NUM_CLASSES), 1.0 / NUM_CLASSES, np.float32)

        scratch_router = self.router.scratch_copy()  # not self.router: the warm-up moves none of its state
        responses = []
        for request in requests:
            pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS").as_numpy()
            image, source = resize_to_native(pixels), source_stats(pixels)
            rows = signatures(image, source, [RequestContext(self.policy.default_tier)] * len(image), self.stats)
            answers = await scratch_router.route(image, rows, uniform)
            blank = [""] * len(answers)
            responses.append(self._response(self.policy.default_tier, answers, blank, blank))
        return responses

    def _first_execute(self) -> None:
        """Keep the event loop executes run on (Triton's stub runs an async execute on a thread of its own), and
        name that thread for the OS; never the main thread, whose name is the process's."""
        self._loop = asyncio.get_running_loop()
        if threading.get_native_id() != os.getpid():
            name_os_thread(ROUTER_EXECUTE)

    async def execute(self, requests: list) -> list:
        if self._loop is None:
            self._first_execute()
        if self.warm_up.take():
            return await self._warm(requests)
        idle_since, self._last_execute = self._last_execute, None  # busy: not idle, however long this execute takes
        started = time.monotonic()  # deadlines and SLO latencies count from here; Triton bounds the queue before
        if idle_since is not None and started - idle_since >= IDLE_POLL_AFTER_S:
            self._queue_wake.set()  # the load signal is read slowly while idle: read it at once
        gauge = self.router.load.wait_ms  # the load signal (Triton's queue wait, see _watch_queue), for this execute
        responses: list[pb_utils.InferenceResponse | None] = [None] * len(requests)
        images, sources, row_contexts, owners, contexts = [], [], [], [], {}
        sent: list[np.ndarray] = []  # per row: its image as sent, for the inference log
        replays: list[ReplayRow | None] = []  # per row: its logged seed and user, when `tierserve replay` sent it
        downgrades: dict[int, str] = {}  # per request: why it is served below the tier it asked for, or ""
        # per request: (tier, answers, budget_ms, seconds since it was received)
        outcomes: list[tuple[str, list[RowResult], float, float]] = []
        for index, request in enumerate(requests):
            try:  # one request's problem is answered for that request alone, never for its batch
                parameters = json.loads(request.parameters())
                replay = parameters.pop(REPLAY_PARAMETER, None)
                context = parse_context(parameters, self.policy.default_tier, self.policy.attributes)
                context, downgrades[index] = self._verified(context, parameters)
                pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS").as_numpy()
                action, why = self.router.load.action(context.tier, gauge)
                if action == SHED:  # refused before any work on its images: shedding must cost little
                    responses[index] = self._response(context.tier, [Shed(why)], [], [])
                    outcomes.append((context.tier, [Shed(why)] * len(pixels), 0.0, 0.0))
                    continue
                if problem := size_problem(pixels.shape) or infinity_problem(pixels):
                    raise ParameterError(problem)
                replayed = (
                    [None] * len(pixels) if replay is None else parse_replay(self.replay_secret, replay, len(pixels))
                )
                images.append(resize_to_native(pixels))
                sources.append(source_stats(pixels))
            except (ParameterError, ReplayTokenError) as error:
                responses[index] = _error(f"digits: {error}", pb_utils.TritonError.INVALID_ARG)
                continue
            except Exception as error:  # logged here, never sent to the client with a traceback
                pb_utils.Logger.log_error(f"router: request {index} could not be read: {error!r}")
                responses[index] = _error("digits: the request could not be read", pb_utils.TritonError.INVALID_ARG)
                continue
            row_contexts.extend([context] * len(pixels))
            replays.extend(replayed)
            sent.extend(pixels)
            owners.extend([index] * len(pixels))
            contexts[index] = context
        if images:
            adapt = gauge < self.policy.shedding.degrade_best_effort_at_ms  # under load the global policy answers
            try:
                plans = self.experimenter.plan(row_contexts, adapt, replays)
                answers, cues = await self._route(images, sources, row_contexts, [gauge] * len(owners), plans)
            except Exception as error:  # a bug must not show a traceback to clients
                pb_utils.Logger.log_error(f"router: routing failed: {error!r}")
                plans, answers = [], [Unanswered("the router failed on this batch (see the server log)")] * len(owners)
            owners_arr = np.asarray(owners)
            finished, answered_at = time.monotonic(), time.time()
            batch = np.concatenate(images)
            mirrors: list[Mirror] = []
            for index, context in contexts.items():
                rows = np.flatnonzero(owners_arr == index)
                mine = [answers[i] for i in rows]
                if downgrades.get(index):
                    mine = [
                        replace(a, reason=f"{downgrades[index]}; {a.reason}") if isinstance(a, Answer) else a
                        for a in mine
                    ]
                ids, arms = self._identify([plans[i] for i in rows] if plans else [], mine, context, finished - started)
                responses[index] = self._response(context.tier, mine, ids, arms)
                if ids:
                    mirrors += [
                        Mirror(experiment, candidate, batch[i], int(answers[i].probs.argmax()))
                        for i in rows
                        if not plans[i].replayed
                        for experiment, candidate in plans[i].shadow_to
                    ]
                    if self.inference_log is not None and not plans[rows[0]].replayed:
                        self.inference_log.offer(
                            [
                                inference_record(
                                    answered_at=answered_at,
                                    request_id=request_id,
                                    plan=plans[i],
                                    context=context,
                                    signature=cues[i],
                                    pixels=sent[i],
                                    answer=answers[i],
                                    latency_s=finished - started,
                                )
                                for i, request_id in zip(rows, ids, strict=True)
                            ]
                        )
                outcomes.append(
                    (
                        context.tier,
                        mine,
                        context.deadline_ms or self.policy.tiers[context.tier].slo_ms,
                        finished - started,
                    )
                )
        if outcomes:
            self.metrics.requests(outcomes)
            self.metrics.state(self.router.breakers, self.router.load.wait_ms)
        if images and mirrors:
            self._mirror(mirrors, under_load=gauge >= self.policy.shedding.degrade_best_effort_at_ms)
        self._last_execute = time.monotonic()
        return responses

    def _identify(
        self, plans: list[RowPlan], answers: list, context: RequestContext, latency_s: float
    ) -> tuple[list[str], list[str]]:
        """REQUEST_ID and ARMS of a request whose rows were all answered ([] and [] otherwise: it gets an error)."""
        if not plans or not all(isinstance(a, Answer) for a in answers):
            return [], []
        ids = self.experimenter.finish(plans, answers, [context] * len(plans), [latency_s] * len(plans))
        self.metrics.experiments(plans, latency_s)
        return ids, [plan.arms for plan in plans]

    def _mirror(self, mirrors: list[Mirror], under_load: bool) -> None:
        """Queue rows for their shadow candidates (after their answers were built); one sender per instance."""
        dropped: dict[str, list[ShadowOutcome]] = {}
        for mirror in self.shadow.offer(mirrors, under_load):
            dropped.setdefault(mirror.experiment, []).append(ShadowOutcome.DROPPED)
        for experiment, results in dropped.items():
            self.experimenter.shadowed(experiment, results, None)
            self.metrics.shadowed(experiment, results, None)
        if len(self.shadow) and self._mirroring is None:
            self._mirroring = asyncio.ensure_future(self._send_mirrors())

    async def _send_mirrors(self) -> None:
        """Send what the shadow queue holds, a call's worth per candidate at a time, gathering rows for GATHER_S
        before each call, until it is empty."""
        try:
            while len(self.shadow):
                if len(self.shadow) < BATCH_ROWS:
                    await asyncio.sleep(GATHER_S)
                queued = self.shadow.take()
                for candidate, mirrors in queued.items():
                    probs, started = None, time.monotonic()
                    try:
                        probs = await self._infer(
                            candidate,
                            np.stack([m.image for m in mirrors]),
                            {},
                            timeout_s=self.policy.call_timeout_ms / 1000,
                        )
                    except Exception as error:  # a shadow failure is counted, never seen by a client
                        pb_utils.Logger.log_verbose(f"router: shadow call to {candidate} failed: {error!r}")
                    latency = time.monotonic() - started if probs is not None else None
                    by_experiment: dict[str, list[ShadowOutcome]] = {}
                    for mirror, outcome in zip(mirrors, outcomes(mirrors, probs), strict=True):
                        by_experiment.setdefault(mirror.experiment, []).append(outcome)
                    for experiment, results in by_experiment.items():
                        self.experimenter.shadowed(experiment, results, latency)
                        self.metrics.shadowed(experiment, results, latency)
        finally:
            self._mirroring = None

    def _verified(self, context: RequestContext, parameters: dict) -> tuple[RequestContext, str]:
        """The context with the tier its tier key allows, and why it was downgraded ("" when it was not);
        ParameterError when the tier is refused."""
        try:
            verdict = self._tier_keys().verdict(context.tier, presented_key(parameters))
        except TierKeyError as error:
            raise ParameterError(str(error)) from None
        if verdict.refused:
            raise ParameterError(verdict.message)
        if verdict.downgraded:
            return replace(context, tier=verdict.tier), verdict.message
        return context, ""

    def _tier_keys(self) -> TierKeys:
        """The operator's tier keys, read again when the file changes (looked at once a second at most)."""
        now = time.monotonic()
        if self._keys_path is None or now - self._keys_checked < 1.0:
            return self._keys
        self._keys_checked = now
        try:
            if (mtime := self._keys_path.stat().st_mtime_ns) != self._keys_mtime:
                self._keys, self._keys_mtime = TierKeys.load(self._keys_path), mtime
        except (OSError, TierKeyError) as error:  # keep the keys in force; say why the new file was not taken
            pb_utils.Logger.log_error(f"router: tier keys not reloaded: {error}")
        return self._keys

    async def _route(
        self,
        images: list[np.ndarray],
        sources: list[np.ndarray],
        contexts: list,
        waits: list[float],
        plans: list[RowPlan],
    ):
        batch = np.concatenate(images)
        rows = signatures(batch, np.concatenate(sources), contexts, self.stats)
        variants = [plan.variant for plan in plans]
        return await self.router.route(batch, rows, self._infer, waits_ms=waits, variants=variants), rows

    async def _infer(
        self, model: str, images: np.ndarray, parameters: dict[str, str], *, timeout_s: float
    ) -> np.ndarray:
        if (runner := self.in_process.get(model)) is not None and self.router.states.in_process(model):
            try:
                result = infer_rows(runner, images)
            except Exception as error:  # the Triton model is the in-process copy's fallback
                pb_utils.Logger.log_error(f"router: {model} failed in-process, calling it through Triton: {error!r}")
                self.metrics.in_process_rows(model, "error", len(images))
            else:
                if isinstance(result, Rejected):
                    raise ModelRefused(f"{model}: {result.message}")
                self.metrics.in_process_rows(model, "ok", len(images))
                return result
        name, version = model.split(":")
        request = pb_utils.InferenceRequest(
            model_name=name,
            model_version=int(version),
            requested_output_names=["PROBS"],
            inputs=[pb_utils.Tensor("PIXELS", images)],
            parameters={**parameters, LANE_TOKEN_PARAMETER: self.lane_token} if model in self.lanes else parameters,
            timeout=max(int(timeout_s * 1e6), 1),  # rejects the call if it is still queued by then
        )
        sent_at = time.monotonic()
        call = asyncio.ensure_future(request.async_exec())
        try:
            # shield: a call we stop waiting for still completes inside the backend
            response = await asyncio.wait_for(asyncio.shield(call), timeout_s)
        except asyncio.TimeoutError:
            # a dead stub answers only after ~1 s: its late answer still ejects the model and reloads it
            call.add_done_callback(lambda late: self._failure(model, late.result(), sent_at))
            raise ModelTimeout(f"{model} did not answer within {timeout_s * 1000:.0f} ms") from None
        if failure := self._failure(model, response, sent_at):
            raise failure
        return pb_utils.get_output_tensor_by_name(response, "PROBS").as_numpy()

    def _failure(self, model: str, response: pb_utils.InferenceResponse, sent_at: float) -> ModelCallError | None:
        """What a response's error means for the router, or None when the call succeeded."""
        if not response.has_error():
            return None
        error = response.error()
        message = error.message()
        if error.code() == pb_utils.TritonError.INVALID_ARG:
            return ModelRefused(message)
        return (ModelDown if self.healer.model_down(model, message, sent_at) else ModelCallError)(message)

    def _reload(self, name: str) -> None:
        """Reload a model whose stub died (Triton does not), off the hot path, its breakers held open meanwhile."""
        pb_utils.Logger.log_warn(f"router: {name} has a dead stub; reloading it")
        self._hold_while(name, f"{name} is being reloaded", self._heal)

    def _await_reload(self, name: str) -> None:
        """Another router instance or the supervisor reloads `name`: its breakers stay open until that ends. Called
        on the event loop, when a call met the dead stub or when _watch_models saw the reload in the log."""
        if name not in self._holding:
            self._hold_while(name, f"{name} is being reloaded elsewhere", self._wait_for_reload)

    def _wait_for_reload(self, name: str) -> None:
        while self.reload_log.in_progress(name, time.monotonic(), RELOAD_WAIT_S):
            time.sleep(RELOAD_POLL_S)

    def _notice_reloads(self) -> None:
        """From _watch_models: a reload of a model this instance calls, which began elsewhere, holds its breakers
        here too (an instance whose calls to a dead stub only timed out never reads the stub's death)."""
        if (loop := self._loop) is None:
            return
        now = time.monotonic()
        for name in self.router.states.called_names:
            if name not in self._holding and self.reload_log.in_progress(name, now, RELOAD_WAIT_S):
                loop.call_soon_threadsafe(self._await_reload, name)

    def _hold_while(self, name: str, why: str, work: Callable[[str], None]) -> None:
        """Hold the breakers of every version of `name` open while `work(name)` runs in a thread of its own, then
        release them on the event loop, as every other use of the breakers (their next call probes at once).
        Called on the event loop (from a call's failure)."""
        held = [breaker for model, breaker in self.router.breakers.items() if model.split(":")[0] == name]
        for breaker in held:
            breaker.hold(why)
        self._holding.add(name)
        loop = asyncio.get_running_loop()

        def release() -> None:
            for breaker in held:
                breaker.release()
            self._holding.discard(name)

        def run() -> None:
            try:
                work(name)
            finally:
                loop.call_soon_threadsafe(release)

        threading.Thread(target=run, name=f"heal-{name}", daemon=True).start()

    def _heal(self, name: str) -> None:
        """Reload `name` (its breakers held meanwhile, _hold_while), then tell the reload log, the metrics and the
        log; the load it causes is kept out of the gauge."""
        self._healing_until = float("inf")  # a reload takes the CPU: the queue it builds is the fault's, not load
        try:
            how, ready = self._reload_model(name)
        except NotLoaded as error:
            pb_utils.Logger.log_info(f"router: not reloading {name}: {error}")
            return
        except Exception as error:  # a failed reload is logged; a later failure retries it (after a probe)
            pb_utils.Logger.log_error(f"router: reloading {name} failed: {error}")
            return
        finally:
            self._healing_until = time.monotonic() + FAULT_HOLD_S
            self.reload_log.finish(name, time.monotonic())  # other instances waiting on it probe the model now
        self.metrics.reloaded(name)
        pb_utils.Logger.log_info(f"router: reloaded {name} {how}; ready={ready}")

    def _reload_model(self, name: str) -> tuple[str, bool]:
        """Load `name` again, and whether it is ready then: through the model repository API with the
        configuration it runs with, while this instance goes on answering; when that endpoint does not answer,
        unloaded and loaded from its config.pbtxt with pb_utils, which stops every thread of this stub until it is
        done. NotLoaded when it was unloaded meanwhile."""
        if self.repository is not None:
            try:
                self.repository.reload(name)
                return "through the model repository API", self.repository.ready(name)
            except RepositoryError:
                raise  # the server answered: its refusal is logged, and config.pbtxt is not loaded in its place
            except OSError as error:  # the server's HTTP endpoint did not answer
                pb_utils.Logger.log_warn(
                    f"router: reloading {name} over HTTP failed ({error}); reloading it from its config.pbtxt with "
                    "pb_utils, which stops this router instance until the load is done"
                )
        pb_utils.unload_model(name)
        pb_utils.load_model(name)
        return "with pb_utils", pb_utils.is_model_ready(name)

    def _response(
        self, tier: str, answers: list[RowResult], ids: list[str], arms: list[str]
    ) -> pb_utils.InferenceResponse:
        if shed := [a for a in answers if isinstance(a, Shed)]:
            return _error(shed_message(tier, shed[0].reason), pb_utils.TritonError.UNAVAILABLE)
        if failures := [a for a in answers if isinstance(a, Unanswered)]:
            return _error(f"digits: {failures[0]}", pb_utils.TritonError.INTERNAL)
        probs = np.stack([a.probs for a in answers]).astype(np.float32)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("LABEL", probs.argmax(axis=1).astype(np.int64)[:, None]),
                pb_utils.Tensor("PROBS", probs),
                pb_utils.Tensor("CONFIDENCE", np.array([[a.confidence] for a in answers], np.float32)),
                pb_utils.Tensor("ROUTE", _text([a.route for a in answers])),
                pb_utils.Tensor("REASON", _text([a.reason for a in answers])),
                pb_utils.Tensor("PATH", _text([a.path for a in answers])),
                pb_utils.Tensor("REQUEST_ID", _text(ids)),
                pb_utils.Tensor("ARMS", _text(arms)),
            ]
        )
