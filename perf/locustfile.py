"""Load test of `digits` with locust: users of each tier in a configurable mix, each with its own user id and
request attributes, send real test-split digits and perturbed ones (`tierserve demo`'s mix) over HTTP, as the SDK
builds and decodes a `digits` call, on tritonclient.http (geventhttpclient, on locust's own gevent). Locust's
statistics have one row per tier and route (type `digits critical`, name the ROUTE that answered, e.g.
`digits_heavy_critical:3`, or with --name-by path its PATH) and one per tier and kind of failure (`shed`,
`timed out`, `unavailable`, `refused`).

    .venv/bin/locust -f perf/locustfile.py --host http://127.0.0.1:8000 --headless -u 20 -r 5 --run-time 1m \\
        --tier-mix critical=1,standard=6,best_effort=3 --csv /tmp/tierserve-locust

Without --headless, locust serves its web UI (--web-host 127.0.0.1 --web-port 8089), where these options can be
changed before each run. README.md, "Load testing with locust", says more.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import tritonclient.http as triton_http
from geventhttpclient.response import HTTPParseError
from locust import User, events, task
from locust.env import Environment
from pydantic import ValidationError
from tier_load import (
    NAMES_BY,
    Failure,
    LoadSettings,
    ShedError,
    http_address,
    needs_key,
    option_problems,
    parse_tier_mix,
    request_type,
    row_name,
    tier_key_from,
    user_attributes,
)

from tierserve.client import Classification, TierserveError
from tierserve.client.classification import MODEL, OUTPUTS, as_pixels, decode, request_parameters
from tierserve.client.clients import DEFAULT_TIMEOUT_S
from tierserve.client.errors import call_errors
from tierserve.policy import Attribute
from tierserve.router_files import router_policy
from tierserve.signature import triton_priority
from tierserve.tier_keys import TIER_KEY_HEADER
from tierserve.tools.dataset import load_split
from tierserve.tools.demo import Sample, build_workload
from tierserve.tools.paths import DEFAULT_REPOSITORY

DEFAULT_TIER_MIX = "critical=1,standard=6,best_effort=3"
TIER_KEY_ENV = "TIERSERVE_TIER_KEY"


def _help(name: str) -> str:
    return LoadSettings.model_fields[name].description or ""


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--tier-mix", default=DEFAULT_TIER_MIX, help=f"{_help('tier_mix')}: tier=users,...")
    parser.add_argument(
        "--tier-key",
        default="",  # a string: the web UI converts what it is given to the default's type
        env_var=TIER_KEY_ENV,
        is_secret=True,
        help=f"{_help('tier_key')}; default: ${TIER_KEY_ENV}, else the key `tierserve serve` wrote",
    )
    parser.add_argument("--images", type=int, default=LoadSettings.model_fields["images"].default, help=_help("images"))
    parser.add_argument("--seed", type=int, default=LoadSettings.model_fields["seed"].default, help=_help("seed"))
    parser.add_argument(
        "--think-ms", type=float, default=LoadSettings.model_fields["think_ms"].default, help=_help("think_ms")
    )
    parser.add_argument(
        "--name-by", default=LoadSettings.model_fields["name_by"].default, choices=NAMES_BY, help=_help("name_by")
    )


@dataclass
class LoadRun:
    """What one run's users share: the settings, the server's address, the images and the declared attributes."""

    settings: LoadSettings
    address: str
    samples: list[Sample]
    attributes: dict[str, Attribute]
    user_numbers: itertools.count = field(default_factory=itertools.count)

    @classmethod
    def from_options(cls, options: Any, host: str | None) -> LoadRun:
        """The run of locust's parsed options (ValueError or pydantic's ValidationError names a bad one)."""
        settings = LoadSettings(
            tier_mix=parse_tier_mix(options.tier_mix),
            tier_key=tier_key_from(options.tier_key),
            images=options.images,
            seed=options.seed,
            think_ms=options.think_ms,
            name_by=options.name_by,
        )
        if not host:
            raise ValueError("--host: the server's HTTP address is needed, http://host:port or host:port")
        samples = build_workload(load_split(), settings.images, settings.seed)
        return cls(settings, http_address(host), samples, dict(router_policy(DEFAULT_REPOSITORY).attributes))


run: LoadRun | None = None  # the current run's, set when it starts


class DigitsUser(User):
    """One client of `digits` at its class's tier: its own connection, user id and attributes."""

    abstract = True
    tier: ClassVar[str]

    def on_start(self) -> None:
        assert run is not None, "test_start sets the run before any user starts"
        self.run = run
        number = next(run.user_numbers)
        self.user_id = f"locust-{self.tier}-{number}"
        self.rng = np.random.default_rng([run.settings.seed, number])
        self.attributes = user_attributes(run.attributes, self.rng)
        tier_key = run.settings.tier_key if needs_key(self.tier) else None
        self.headers = {TIER_KEY_HEADER: tier_key} if tier_key else None
        self.triton = self._connect()

    def on_stop(self) -> None:
        self.triton.close()

    def _connect(self) -> triton_http.InferenceServerClient:
        return triton_http.InferenceServerClient(
            self.run.address, connection_timeout=DEFAULT_TIMEOUT_S, network_timeout=DEFAULT_TIMEOUT_S
        )

    def wait_time(self) -> float:
        return float(self.rng.uniform(0, self.run.settings.think_ms)) / 1000

    @task
    def classify(self) -> None:
        sample = self.run.samples[self.rng.integers(len(self.run.samples))]
        context = {"user_id": self.user_id, "kind": sample.kind}
        start = time.perf_counter()
        try:
            answer = self._classify(sample.image)
        except TierserveError as error:
            failure = Failure.of(error, self.tier)
            if failure in (Failure.TIMED_OUT, Failure.UNAVAILABLE):  # the connection may be mid-request: a new one
                self.triton.close()
                self.triton = self._connect()
            self._report(failure.value, start, ShedError(self.tier) if failure is Failure.SHED else error, context)
        else:
            self._report(row_name(answer, self.run.settings.name_by), start, None, context)

    def _classify(self, image: np.ndarray) -> Classification:
        """One image at the user's tier, as TierserveClient.classify sends it (whose HTTP client runs its calls on
        threads of its own, which locust's gevent patching replaces); failures are TierserveErrors."""
        pixels = as_pixels(image)
        tensor = triton_http.InferInput("PIXELS", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        with call_errors("http", self.run.address, DEFAULT_TIMEOUT_S, (HTTPParseError, OSError)):
            result = self.triton.infer(
                MODEL,
                [tensor],
                outputs=[triton_http.InferRequestedOutput(name) for name in OUTPUTS],
                parameters=request_parameters(self.tier, self.user_id, None, self.attributes),
                priority=triton_priority(self.tier),
                headers=self.headers,
            )
        (answer,) = decode(result)
        return answer

    def _report(self, name: str, start: float, exception: Exception | None, context: dict[str, Any]) -> None:
        self.environment.events.request.fire(
            request_type=request_type(self.tier),
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=0,
            exception=exception,
            context=context,
        )


class CriticalUser(DigitsUser):
    tier = "critical"


class StandardUser(DigitsUser):
    tier = "standard"


class BestEffortUser(DigitsUser):
    tier = "best_effort"


TIER_USERS = (CriticalUser, StandardUser, BestEffortUser)


@events.init.add_listener
def _check_options(environment: Environment, **_: Any) -> None:
    """Bad options end locust before it starts, with the reason."""
    try:
        LoadRun.from_options(environment.parsed_options, environment.host)
    except ValidationError as error:
        sys.exit(f"perf/locustfile.py: {option_problems(error)}")
    except ValueError as error:
        sys.exit(f"perf/locustfile.py: {error}")


@events.test_start.add_listener
def _start_run(environment: Environment, **_: Any) -> None:
    """Each run reads the options again (the web UI may have changed them) and spawns users in the tier mix."""
    global run
    run = LoadRun.from_options(environment.parsed_options, environment.host)
    for user_class in TIER_USERS:
        user_class.weight = run.settings.tier_mix.get(user_class.tier, 0)
    environment.user_classes[:] = [user_class for user_class in TIER_USERS if user_class.weight > 0]
