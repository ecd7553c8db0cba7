"""A tritonserver child process serving one model repository: started, awaited, stopped without leftovers."""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tierserve.inference_log import LOG_DIR_ENV, REPLICA_ENV
from tierserve.queue_wait import STATS_URL_ENV
from tierserve.request_context import PARAMETER_HEADER_PREFIX
from tierserve.server_scratch import server_scratch
from tierserve.state_store import STATE_ENV
from tierserve.tier_keys import TIER_KEY_HEADER, TIER_KEYS_ENV, TierKeys, new_key
from tierserve.tools.paths import ADMIN_KEY_ENV
from tierserve.tools.triton_install import assemble_backend_directory, embedded_install, server_environment

SHM_DIR = Path("/dev/shm")
EXIT_TIMEOUT_S = 10  # how long tritonserver lets in-flight requests finish after SIGTERM
ADMIN_HEADER = "tierserve-admin-key"  # the HTTP header every admin API requires
# Over gRPC Triton looks for the restricted-protocol key with this prefix (Triton 2.51 to 2.64 at least).
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
FORWARDED_HEADERS = f"^({TIER_KEY_HEADER}|{PARAMETER_HEADER_PREFIX}[a-z0-9-]+)$"  # never the admin key
# Every API that changes server state needs the admin key (Triton's names, the same for HTTP and gRPC). Open:
# inference, health, metadata, model-config and statistics (read-only; the same numbers as the metrics port).
ADMIN_APIS = ("model-repository", "logging", "trace", "shared-memory")
DEFAULT_ADDRESS = "127.0.0.1"  # the embedded default serves this machine only; a container passes 0.0.0.0
LOCAL_TIER_KEY_NAME = "local"  # the key a server with no keys file of the operator's makes for itself
LOAD_TIMEOUT_S = 120  # a model load returns once every instance has initialized
STUB_EXECUTABLE = b"/triton_python_backend_stub"  # the program of every Python backend stub process


class ServerError(RuntimeError):
    """tritonserver could not be started, did not become ready, or refused a model repository request."""


def admin_headers(protocol: str, admin_key: str) -> dict[str, str]:
    """The header (HTTP) or metadata (gRPC) that carries the admin key on a call to an admin API."""
    return {GRPC_ADMIN_HEADER if protocol == "grpc" else ADMIN_HEADER: admin_key}


def connect_host(address: str) -> str:
    """Where a client on this machine reaches a server bound to `address` (all interfaces: loopback)."""
    return "127.0.0.1" if ipaddress.IPv4Address(address).is_unspecified else address


def cmdline_hidden_from_other_users(mounts: Path = Path("/proc/mounts")) -> bool:
    """Whether /proc is mounted with hidepid (1/noaccess, 2/invisible or 4/ptraceable), so other users cannot
    read a process's command line; tritonserver takes its admin key only as a flag."""
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1] == "/proc" and fields[2] == "proc":
            options = dict(option.partition("=")[::2] for option in fields[3].split(","))
            return options.get("hidepid", "0") not in ("0", "off")
    return False


@dataclass(frozen=True)
class Ports:
    """The three ports a tritonserver listens on."""

    http: int
    grpc: int
    metrics: int

    @classmethod
    def free(cls) -> Ports:
        """Three ports nothing listens on now (the kernel picks them)."""
        sockets = [socket.socket() for _ in range(3)]
        try:
            for sock in sockets:
                sock.bind(("127.0.0.1", 0))
            return cls(*(sock.getsockname()[1] for sock in sockets))
        finally:
            for sock in sockets:
                sock.close()

    def busy(self, host: str = "127.0.0.1") -> list[int]:
        """The ports among these that something already listens on at `host`."""
        taken = []
        for port in (self.http, self.grpc, self.metrics):
            with socket.socket() as sock:
                if sock.connect_ex((host, port)) == 0:
                    taken.append(port)
        return taken


@dataclass(frozen=True)
class Stub:
    """One Python backend stub process: the model instance it runs, as its command line names it."""

    pid: int
    model: str
    version: str
    instance: str  # Triton's instance name, e.g. "router_0_1"

    @classmethod
    def from_argv(cls, pid: int, argv: list[str]) -> Stub | None:
        """Read `<stub> <repository>/<model>/<version>/model.py <shm region> ... <instance> <runtime dir>`
        (the Python backend's launch line, the same from Triton 2.51 to 2.64); None for another layout."""
        if len(argv) < 4 or not argv[1].endswith("/model.py"):
            return None
        version_dir = Path(argv[1]).parent
        return cls(pid, version_dir.parent.name, version_dir.name, argv[-2])


def _proc_net_address(field: str) -> tuple[str, int]:
    """`0100007F:1F40` (a /proc/net/tcp{,6} local address: 32-bit words in host order, here little-endian) as
    ("127.0.0.1", 8000)."""
    hex_address, hex_port = field.split(":")
    raw = b"".join(bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(hex_port, 16)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the launcher dies, so no tritonserver is orphaned."""
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, signal.SIGTERM)


class TritonServer:
    """tritonserver serving `repository` on `ports` of `address`; use as a context manager or start()/stop().

    `tier_keys` is the operator's tier keys file; without one, start() writes `workdir/tier_keys.json` with one
    key for `critical`, kept in `tier_key` (the same across restarts)."""

    def __init__(
        self,
        repository: Path,
        ports: Ports,
        workdir: Path,
        *,
        tritonserver: Path | None = None,
        log_verbose: int = 0,
        output: IO[bytes] | None = None,
        admin_key: str | None = None,
        address: str = DEFAULT_ADDRESS,
        tier_keys: Path | None = None,
        state: str | None = None,
        inference_log: Path | None = None,
        replica: str | None = None,
    ) -> None:
        self.repository = repository.resolve()
        self.ports = ports
        self.workdir = workdir
        self.tritonserver = tritonserver
        self.log_verbose = log_verbose
        self.output = output  # where tritonserver's log goes; None inherits the launcher's stdout
        # the admin APIs (ADMIN_APIS) are the operator's alone: over HTTP/gRPC they need this key
        self.admin_key = admin_key or secrets.token_hex(16)
        connect_host(address)  # an IPv4 address or ValueError: Triton 2.51 joins address and port with ':'
        self.address = address
        self.tier_keys = tier_keys or workdir / "tier_keys.json"
        self.tier_key = None if tier_keys else new_key()
        # state that outlives a request (experiments, posteriors, feedback, per-user records): kept across restarts
        self.state = state or str(workdir.resolve() / "state.db")
        # where the routers write the inference log (model_repository/router/inference_log.yaml may name another)
        self.inference_log = (inference_log or workdir / "inference_log").resolve()
        # this server's name among several sharing one log root: it writes inference_log/replica=NAME/
        self.replica = replica
        # Python backend shared-memory regions get a prefix of their own so stop() can sweep leftovers.
        self.shm_prefix = f"tierserve_{os.getpid()}_{ports.http}_"
        self._process: subprocess.Popen[bytes] | None = None
        self.swept_shm_regions: list[Path] = []  # regions tritonserver left behind and stop() removed

    @property
    def pid(self) -> int | None:
        """tritonserver's process id (of the latest start), None before the first start."""
        return None if self._process is None else self._process.pid

    @property
    def http_url(self) -> str:
        return f"{connect_host(self.address)}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{connect_host(self.address)}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{connect_host(self.address)}:{self.ports.metrics}/metrics"

    def command(self) -> list[str]:
        if self.tritonserver is None:
            install = embedded_install()
            binary = install.tritonserver
            backend_args = [f"--backend-directory={assemble_backend_directory(install, self.workdir / 'backends')}"]
        else:
            binary, backend_args = self.tritonserver, []  # a full installation brings its own backends
        return [
            str(binary),
            f"--model-repository={self.repository}",
            f"--http-address={self.address}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.ports.metrics}",
            *backend_args,
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            # explicit control lets the router reload a model whose stub died; all models load at start
            "--model-control-mode=explicit",
            "--load-model=*",
            # Triton 2.51 takes the key only here, so it is on the command line (README: Trust boundary)
            f"--http-restricted-api={','.join(ADMIN_APIS)}:{ADMIN_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol={','.join(ADMIN_APIS)}:{ADMIN_HEADER}={self.admin_key}",
            # the tier key and tierserve-param-* headers reach the router as request parameters (Triton adds (?i):
            # any case matches; tierserve.request_context)
            f"--http-header-forward-pattern={FORWARDED_HEADERS}",
            f"--grpc-header-forward-pattern={FORWARDED_HEADERS}",
            "--disable-auto-complete-config",  # config.pbtxt is the whole truth about each model
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--log-verbose={self.log_verbose}",
        ]

    def start(self) -> None:
        if busy := self.ports.busy(connect_host(self.address)):
            raise ServerError(
                f"port(s) {', '.join(map(str, busy))} already in use: stop what listens there "
                "or choose other ports with --http-port/--grpc-port/--metrics-port"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tier_key is not None:
            TierKeys().add(LOCAL_TIER_KEY_NAME, self.tier_key, "critical").save(self.tier_keys)
        environment = server_environment()
        environment.pop(ADMIN_KEY_ENV, None)  # the server has it as a flag; its stubs need not see it
        environment[TIER_KEYS_ENV] = str(self.tier_keys.resolve())
        environment[STATE_ENV] = self.state
        environment[STATS_URL_ENV] = self.http_url  # the routers read their own queue statistics there
        environment[LOG_DIR_ENV] = str(self.inference_log)
        if self.replica is not None:
            environment[REPLICA_ENV] = self.replica
        else:
            environment.pop(REPLICA_ENV, None)
        self._process = subprocess.Popen(
            self.command(),
            env=environment,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the launcher, which stops the server in order
            preexec_fn=_die_with_parent,
        )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Block until every model is loaded and the server says ready; raise if it exits first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.returncode} before it was ready; its log says why"
                    + self._log_tail()
                )
            if self.is_ready():
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver was not ready within {timeout_s:.0f} s")

    def _log_tail(self, errors: int = 20, lines: int = 10) -> str:
        """tritonserver's first error lines and its last lines, when its log goes to a file, for an error message;
        empty otherwise."""
        name = getattr(self.output, "name", None)
        if not isinstance(name, str) or not Path(name).is_file():
            return ""
        self.output.flush()
        log = Path(name).read_text(errors="replace").splitlines()
        failures = [line for line in log if re.match(r"E\d{4} ", line)][:errors]  # glog's error lines
        return f"\n--- errors in {name} ---\n" + "\n".join(failures) + "\n--- its end ---\n" + "\n".join(log[-lines:])

    def is_ready(self) -> bool:
        """Whether /v2/health/ready answers 200 now: the server is up and calls every model READY (from NGC 26.04
        also every model's own readiness, so a dead Python stub makes it false)."""
        return self._get("/v2/health/ready") == 200

    def models(self) -> list[dict[str, str]]:
        """The repository index as the server reports it: name, version, state of each model."""
        return self._call("/v2/repository/index", {}, timeout_s=5)

    def model_ready(self, model: str, version: str) -> bool | None:
        """Whether /v2/models/<model>/versions/<version>/ready answers 200; None when the server did not answer.
        Triton 2.51 answers 200 for a model whose stub died; 2.64 (NGC 25.12) and later do not."""
        status = self._get(f"/v2/models/{model}/versions/{version}/ready")
        return None if status is None else status == 200

    def model_config(self, model: str) -> dict:
        """The configuration the server runs `model` with (model_config.proto as JSON)."""
        return self._call(f"/v2/models/{model}/config", timeout_s=5)

    def load(self, model: str, config: dict) -> None:
        """Load `model` with this configuration in place of its config.pbtxt; if that fails, the loaded version
        keeps serving and ServerError carries the server's reason."""
        self._call(
            f"/v2/repository/models/{model}/load",
            {"parameters": {"config": json.dumps(config)}},
            timeout_s=LOAD_TIMEOUT_S,
        )

    def wait(self) -> int:
        assert self._process is not None, "start() first"
        return self._process.wait()

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def stop(self) -> None:
        """SIGTERM, let in-flight work drain, SIGKILL the process group if it hangs, then end the stubs a crashed
        server left running and sweep its shared memory and scratch space. Safe to call on a dead server."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=EXIT_TIMEOUT_S + 20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._end_orphaned_stubs()
        self.swept_shm_regions = sorted(SHM_DIR.glob(f"{self.shm_prefix}*"))
        for region in self.swept_shm_regions:
            region.unlink(missing_ok=True)
        if process is not None:  # the stubs' shared reload log and load board
            shutil.rmtree(server_scratch(process.pid), ignore_errors=True)

    def listening(self) -> dict[int, list[str]]:
        """What tritonserver really listens on, read from /proc: the addresses of its listening sockets by port
        (an IPv4-mapped IPv6 address as IPv4). Empty when it is not running."""
        if self._process is None or self.returncode is not None:
            return {}
        pid = self._process.pid
        inodes = set()
        for descriptor in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if (target := os.readlink(descriptor)).startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        found: dict[int, list[str]] = {}
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    address, port = _proc_net_address(fields[1])
                    found.setdefault(port, []).append(address)
        return {port: sorted(set(addresses)) for port, addresses in sorted(found.items())}

    def live_processes(self) -> list[int]:
        """PIDs of this server's processes still running: tritonserver and its Python stubs."""
        own = [] if self.returncode is not None or self._process is None else [self._process.pid]
        return own + self.stub_pids()

    def stub_pids(self, model: str = "") -> list[int]:
        """PIDs of this server's Python stub processes, of one model ("preprocess"), one version
        ("digits_heavy/2") or of all."""
        marker = f"/{model}/".encode() if model else b""
        return [pid for pid, cmdline in self._stub_cmdlines() if marker in cmdline]

    def stubs(self) -> list[Stub]:
        """This server's running Python stubs, each with the model instance it runs."""
        found = (
            Stub.from_argv(pid, cmdline.decode(errors="replace").split("\0")[:-1])
            for pid, cmdline in self._stub_cmdlines()
        )
        return [stub for stub in found if stub is not None]

    def _stub_cmdlines(self) -> list[tuple[int, bytes]]:
        """(pid, NUL-separated command line) of each live stub process with this launcher's shm prefix
        (tritonserver's own command line carries the prefix too). A stub that died but is not reaped yet (a
        zombie) has an empty command line, so it is not listed."""
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes()
            except OSError:
                continue  # the process ended while we looked
            if self.shm_prefix.encode() in text and text.split(b"\0", 1)[0].endswith(STUB_EXECUTABLE):
                found.append((int(cmdline.parent.name), text))
        return found

    def _end_orphaned_stubs(self, timeout_s: float = 5.0) -> None:
        """SIGKILL the stubs of a server that is gone. They would hold the server's inherited sockets and shared
        memory, and a restarted server reuses the same shm prefix, so they must not outlive it."""
        deadline = time.monotonic() + timeout_s
        while (pids := self.stub_pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _get(self, path: str) -> int | None:
        """The HTTP status of GET `path`, None when the server did not answer."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def _call(self, path: str, body: dict | None = None, *, timeout_s: float) -> Any:
        """GET `path` (POST `body` when given) with the admin key; the JSON answer, or ServerError with the
        server's message."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://{self.http_url}{path}",
            data=data,
            method="GET" if body is None else "POST",
            headers=admin_headers("http", self.admin_key),
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                answer = response.read()
        except urllib.error.HTTPError as error:  # Triton's body is {"error": "<why>"}
            raise ServerError(f"{path}: {error.code} {error.read().decode(errors='replace')}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            raise ServerError(f"{path}: tritonserver did not answer ({error})") from None
        return json.loads(answer) if answer else None
