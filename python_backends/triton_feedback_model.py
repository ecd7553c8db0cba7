"""Triton glue for `feedback`: REQUEST_ID and LABEL per row in, ACCEPTED out; the logic is tierserve.feedback's."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tierserve.experiment_stats import ExperimentStats
from tierserve.faults import refuse_faults
from tierserve.feedback import FeedbackBook, FeedbackRefused, Learned, Refusal
from tierserve.guarded_store import GuardedStore
from tierserve.inference_log import LOG_DIR_ENV, FeedbackRecord, load_settings
from tierserve.policy import Policy
from tierserve.request_ids import RequestIds
from tierserve.router_files import POLICY_FILE, ROUTER_MODEL
from tierserve.state_store import STATE_ENV, default_location, open_store, shared_secret
from tierserve.triton_router_metrics import LabelledFamily, MetricBatch, StateStoreMetrics, open_inference_log
from tierserve.user_adaptation import UserStates
from tierserve.warmup import WarmUp

STORE_RETRY_S = 1.0  # while the state store fails, feedback tries it again at most this often


def _store_changed(up: bool, why: str) -> None:
    if up:
        pb_utils.Logger.log_info(f"feedback: the state store {why}")
    else:
        pb_utils.Logger.log_error(f"feedback: the state store failed ({why}); feedback is refused until it answers")


def _error(message: str, code: int) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    """Takes feedback request by request: a refused request is answered alone, never its batch."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        refuse_faults(args["model_name"], config)
        # for the Python backend, model_repository is this model's own folder: the router's policy is beside it
        router_dir = Path(args["model_repository"]).parent / ROUTER_MODEL
        policy = Policy.load(router_dir / POLICY_FILE)
        # feedback taken is recorded beside the answers, for `tierserve log query` to join by REQUEST_ID
        log_settings = load_settings(router_dir, os.environ.get(LOG_DIR_ENV))
        self.inference_log = open_inference_log(log_settings, "feedback")
        # tried again at most once per STORE_RETRY_S while it fails: feedback is refused UNAVAILABLE meanwhile
        self.store = GuardedStore(
            open_store(os.environ.get(STATE_ENV) or default_location()),
            retry_after_s=STORE_RETRY_S,
            on_change=_store_changed,
        )
        self.book = FeedbackBook(
            self.store,
            RequestIds(shared_secret(self.store)),
            ExperimentStats(self.store),
            UserStates(self.store, policy.adaptation.max_users),
        )
        self.warm_up = WarmUp(config)
        accepted = pb_utils.get_output_config_by_name(config, "ACCEPTED")
        self.accepted_dtype = pb_utils.triton_string_to_numpy(accepted["data_type"])
        instance, counter = args["model_instance_name"], pb_utils.MetricFamily.COUNTER
        self.metrics = MetricBatch()  # sent at the end of each execute (feedback is not on the inference path)
        self.learned = LabelledFamily(
            "tierserve_feedback_total",
            "Fed-back rows per experiment arm, by whether its answer was correct",
            counter,
            instance,
            self.metrics,
        )
        self.refused = LabelledFamily(
            "tierserve_feedback_refused_total",
            "Feedback requests refused, by why: unknown or expired REQUEST_ID, duplicate feedback, LABEL not 0-9, "
            "state store unavailable",
            counter,
            instance,
            self.metrics,
        )
        self.store_metrics = StateStoreMetrics(instance, self.metrics)

    def finalize(self) -> None:
        self.store.close()
        if self.inference_log is not None:
            self.inference_log.close()

    def execute(self, requests: list) -> list:
        if self.warm_up.take():  # Triton's samples: answered without reading them or touching the store
            return [self._accepted(request) for request in requests]
        responses = []
        learned: Counter[Learned] = Counter()
        for index, request in enumerate(requests):
            try:  # one request's problem is answered for that request alone, never for its batch
                ids = pb_utils.get_input_tensor_by_name(request, "REQUEST_ID").as_numpy().ravel()
                labels = pb_utils.get_input_tensor_by_name(request, "LABEL").as_numpy().ravel()
                texts = [i.decode("utf-8", "replace") if isinstance(i, bytes) else str(i) for i in ids]
                received = time.time()
                learned.update(self.book.accept(texts, [int(label) for label in labels], received))
                responses.append(self._accepted(request))
                if self.inference_log is not None:
                    self.inference_log.offer(
                        [FeedbackRecord(text, int(label), received) for text, label in zip(texts, labels, strict=True)]
                    )
            except FeedbackRefused as error:
                learned.update(error.learned)
                self.refused(why=error.why.value).increment(1)
                # not the client's fault when the store is busy or gone: UNAVAILABLE says send it again
                code = pb_utils.TritonError.UNAVAILABLE if error.why is Refusal.UNAVAILABLE else None
                responses.append(_error(f"feedback: {error}", code or pb_utils.TritonError.INVALID_ARG))
            except Exception as error:  # logged here, never sent to the client with a traceback
                pb_utils.Logger.log_error(f"feedback: request {index} could not be read: {error!r}")
                responses.append(_error("feedback: the request could not be read", pb_utils.TritonError.INVALID_ARG))
        for arm, count in learned.items():  # one metric update per series: each is a message to tritonserver
            self.learned(experiment=arm.experiment, arm=arm.arm, correct=str(arm.correct).lower()).increment(count)
        self.store_metrics.update(self.store)
        self.metrics.flush()
        return responses

    def _accepted(self, request) -> pb_utils.InferenceResponse:
        rows = len(pb_utils.get_input_tensor_by_name(request, "LABEL").as_numpy())
        accepted = np.ones((rows, 1), self.accepted_dtype)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("ACCEPTED", accepted)])
