"""Supervision of one tritonserver: restart it when it dies, reload a model when one of its Python stubs dies.

Triton 2.51 does neither. A crashed server stays down. A dead stub leaves its model READY (and
`/v2/health/ready` at 200) while every request that lands on that instance fails after about a second
with "Stub process '...' is not healthy", until the model is reloaded. The router reloads the models it
calls once a call to them has failed; the supervisor watches /proc instead, so a death is healed without
waiting for traffic, whichever model it hits (the router included).
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from tierserve.healing import ReloadLog
from tierserve.repository_api import READY, ready_versions, reload_config
from tierserve.server_scratch import server_scratch
from tierserve.tools.server import ServerError, Stub, TritonServer

POLL_S = 0.25  # how often /proc and the server process are looked at
# A model the supervisor reloaded is not reloaded again sooner than this, whoever noticed the next death.
RELOAD_MIN_INTERVAL_S = 1.0


class EventKind(Enum):
    SERVER_DIED = "tritonserver died"
    SERVER_RESTARTED = "tritonserver restarted"
    RESTART_FAILED = "restart failed"
    GAVE_UP = "gave up"
    STUB_DIED = "stub died"
    MODEL_RELOADED = "model reloaded"
    RELOAD_FAILED = "reload failed"
    CHECK_FAILED = "check failed"


@dataclass(frozen=True)
class Event:
    """One thing the supervisor saw or did; `detail` is for people, the other fields for code."""

    kind: EventKind
    detail: str
    model: str = ""
    took_s: float = 0.0  # restart: from the death being seen to ready; reload: the load call
    at: float = field(default_factory=time.monotonic)  # when it was reported (CLOCK_MONOTONIC)

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}"


@dataclass(frozen=True)
class InstanceKey:
    """A model instance, which keeps its name when a reload gives it a new stub process."""

    model: str
    version: str
    instance: str

    @classmethod
    def of(cls, stub: Stub) -> InstanceKey:
        return cls(stub.model, stub.version, stub.instance)


def exit_description(code: int) -> str:
    """How a process ended, as a Popen return code says it (negative: killed by that signal)."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:  # a real-time signal has no name of its own
        name = str(-code)
    return f"was killed by signal {name} (exit code {code})"


class Supervisor:
    """Owns `server` and a background thread that keeps it serving.

    - tritonserver dies (not by stop()): the death is reported, its stubs, shared memory and scratch space
      are swept, and it is started again on the same ports with the same admin key. More than
      `max_restarts` deaths within `restart_window_s` is a crash loop: the supervisor gives up, wait()
      returns 1.
    - A stub dies: a model instance seen running has no process any more while the repository index still
      lists its model READY (loaded). The model is reloaded with the configuration it runs, so injected
      faults stay as they were. An instance that vanished because its model was unloaded, or was replaced
      by someone else's reload, is not a death. The claim on the server's shared ReloadLog keeps the
      supervisor and a router from both reloading a model for one death.

    `restarts` and `reloads` (per model) count what was done; `events` lists everything reported."""

    def __init__(
        self,
        server: TritonServer,
        *,
        report: Callable[[Event], None] = lambda event: None,
        max_restarts: int = 5,
        restart_window_s: float = 60.0,
        ready_timeout_s: float = 180.0,
        on_ready: Callable[[], None] = lambda: None,
    ) -> None:
        self.server = server
        self._on_ready = on_ready  # after every start and restart, once the server is ready
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.ready_timeout_s = ready_timeout_s
        self.restarts = 0
        self.reloads: Counter[str] = Counter()
        self.events: list[Event] = []
        self._report = report
        self._deaths: list[float] = []  # when each recent server death was seen (monotonic)
        self._seen: dict[InstanceKey, float] = {}  # each known instance: when its stub was last seen alive
        self._lock = threading.Lock()  # one of: a check, or stop()
        self._stopping = threading.Event()
        self._gave_up = threading.Event()
        self._exit_code: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start tritonserver, wait until it is ready, then supervise it (ServerError if it never gets ready)."""
        self.server.start()
        self.server.wait_ready(self.ready_timeout_s)
        self._on_ready()
        self._learn_stubs()
        # Daemon: if the launcher ends without stop(), tritonserver goes with it (its parent-death signal).
        self._thread = threading.Thread(target=self._run, name="tritonserver-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop supervising and stop tritonserver, leaving no process, shared memory or scratch space behind."""
        self._stopping.set()
        with self._lock:  # waits for a restart or reload in progress
            self.server.stop()
        # Joined only after the server is down: a server the thread restarted gets SIGTERM when its parent
        # thread ends (PR_SET_PDEATHSIG follows the thread), which must not race the drain above.
        if self._thread is not None:
            self._thread.join()

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until supervision gave up (the exit code for the launcher) or `timeout_s` passed (None)."""
        return self._exit_code if self._gave_up.wait(timeout_s) else None

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopping.wait(POLL_S) and not self._gave_up.is_set():
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._check()
                except Exception as error:  # the thread must outlive any one failed check
                    self._emit(Event(EventKind.CHECK_FAILED, f"{type(error).__name__}: {error}"))

    def _check(self) -> None:
        code = self.server.returncode
        if code is None:
            self._check_stubs()
        else:
            self._restart_after(code)

    def _ready_again(self) -> None:
        """`on_ready` after a restart; its failure is reported, never the end of supervision."""
        try:
            self._on_ready()
        except Exception as error:
            self._emit(Event(EventKind.RESTART_FAILED, f"after the restart: {error}"))

    def _restart_after(self, code: int) -> None:
        seen_at = time.monotonic()
        self._emit(Event(EventKind.SERVER_DIED, f"tritonserver (pid {self.server.pid}) {exit_description(code)}"))
        self.server.stop()  # sweeps the dead server's stubs, shared memory and scratch space
        self._deaths = [t for t in self._deaths if seen_at - t < self.restart_window_s] + [seen_at]
        if len(self._deaths) > self.max_restarts:
            self._exit_code = 1
            self._emit(
                Event(
                    EventKind.GAVE_UP,
                    f"tritonserver died {len(self._deaths)} times within "
                    f"{self.restart_window_s:.0f} s; not restarting it again",
                )
            )
            self._gave_up.set()
            return
        try:
            self.server.start()
            self.server.wait_ready(self.ready_timeout_s)
        except ServerError as error:  # the dead server is seen on the next check and counts as one more death
            self.server.stop()
            self._emit(Event(EventKind.RESTART_FAILED, str(error)))
            return
        self.restarts += 1
        self._ready_again()
        self._learn_stubs()
        took_s = time.monotonic() - seen_at
        self._emit(
            Event(
                EventKind.SERVER_RESTARTED,
                f"pid {self.server.pid} on the same ports, ready "
                f"{took_s:.1f} s after the death was seen "
                f"(restart {self.restarts})",
                took_s=took_s,
            )
        )

    def _learn_stubs(self) -> None:
        now = time.monotonic()
        self._seen = {InstanceKey.of(stub): now for stub in self.server.stubs()}

    def _check_stubs(self) -> None:
        now = time.monotonic()
        alive = {InstanceKey.of(stub): stub for stub in self.server.stubs()}
        missing: dict[str, dict[InstanceKey, float]] = defaultdict(dict)
        for key, seen_at in self._seen.items():
            if key not in alive:
                missing[key.model][key] = seen_at
        self._seen.update(dict.fromkeys(alive, now))
        if not missing:
            return
        # The repository index gives each version's lifecycle state. /v2/models/<m>/ready would not do: from
        # Triton 2.64 on it turns false when a stub dies, which would read like an unload.
        try:
            index = self.server.models()
        except ServerError:
            return  # the server did not answer: look again on the next check
        loaded = {(m["name"], m.get("version")) for m in index if m.get("state") == READY}
        for model, keys in missing.items():
            # A version unloaded, or being reloaded by unload and load, lost its stubs to that, not to a death.
            # Judged per version: one retired as another's stub dies (in one look) must not hide that death.
            dead = {key: seen_at for key, seen_at in keys.items() if (model, key.version) in loaded}
            self._forget(key for key in keys if key not in dead)
            if dead:
                self._heal(model, dead, ready_versions(index, model))

    def _heal(self, model: str, keys: dict[InstanceKey, float], serving: set[int]) -> None:
        """Reload `model`, whose instances `keys` (with when each was last seen alive) lost their stubs, serving the
        versions `serving` it serves now."""
        now = time.monotonic()
        reloads = ReloadLog(server_scratch(self.server.pid))
        claim = reloads.claim(model, max(keys.values()), now, RELOAD_MIN_INTERVAL_S)
        if claim == "stale":  # a router began reloading it after the death: wait for that reload
            self._seen.update(dict.fromkeys(keys, now))
            return
        if claim == "recent":
            return  # reloaded less than RELOAD_MIN_INTERVAL_S ago; looked at again on the next check
        names = ", ".join(sorted(f"{key.instance} (version {key.version})" for key in keys))
        self._emit(Event(EventKind.STUB_DIED, f"{model}: no stub process for {names}; reloading {model}", model=model))
        started = time.monotonic()
        try:
            self._reload(model, serving)
        except ServerError as error:  # kept as missing: retried once RELOAD_MIN_INTERVAL_S has passed
            self._emit(Event(EventKind.RELOAD_FAILED, f"{model}: {error}", model=model))
            return
        finally:
            reloads.finish(model, time.monotonic())  # routers holding their breakers for it probe the model now
        took_s = time.monotonic() - started
        self.reloads[model] += 1
        self._forget(keys)  # the reloaded instances are learned on the next check
        self._emit(
            Event(
                EventKind.MODEL_RELOADED,
                f"{model} reloaded in {took_s:.2f} s (heal {self.reloads[model]} of {model})",
                model=model,
                took_s=took_s,
            )
        )

    def _reload(self, model: str, serving: set[int]) -> None:
        """Load `model` again with the configuration it runs now and the versions `serving`, marked so that Triton
        does not skip it."""
        self.server.load(model, reload_config(self.server.model_config(model), serving))

    def _forget(self, keys: Iterable[InstanceKey]) -> None:
        for key in keys:
            self._seen.pop(key, None)

    def _emit(self, event: Event) -> None:
        self.events.append(event)
        self._report(event)
