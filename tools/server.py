"""A tritonserver child process serving one model repository: started, awaited, stopped without leftovers."""

from __future__ import annotations

import ctypes
import json
import os
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
from typing import IO

from tierserve.load_board import server_scratch
from tierserve.tools.triton_install import assemble_backend_directory, embedded_install, server_environment

SHM_DIR = Path("/dev/shm")
EXIT_TIMEOUT_S = 10  # how long tritonserver lets in-flight requests finish after SIGTERM
ADMIN_HEADER = "tierserve-admin-key"  # the header the model repository API (load/unload) requires


class ServerError(RuntimeError):
    """tritonserver could not be started or did not become ready."""


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

    def busy(self) -> list[int]:
        """The ports among these that something already listens on."""
        taken = []
        for port in (self.http, self.grpc, self.metrics):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    taken.append(port)
        return taken


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the launcher dies, so no tritonserver is orphaned."""
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, signal.SIGTERM)


class TritonServer:
    """tritonserver serving `repository` on `ports`; use as a context manager or start()/stop()."""

    def __init__(self, repository: Path, ports: Ports, workdir: Path, *, tritonserver: Path | None = None,
                 log_verbose: int = 0, output: IO[bytes] | None = None, admin_key: str | None = None) -> None:
        self.repository = repository.resolve()
        self.ports = ports
        self.workdir = workdir
        self.tritonserver = tritonserver
        self.log_verbose = log_verbose
        self.output = output  # where tritonserver's log goes; None inherits the launcher's stdout
        # load/unload are the operator's and the router's alone: over HTTP/gRPC they need this key
        self.admin_key = admin_key or secrets.token_hex(16)
        # Python backend shared-memory regions get a prefix of their own so stop() can sweep leftovers.
        self.shm_prefix = f"tierserve_{os.getpid()}_{ports.http}_"
        self._process: subprocess.Popen[bytes] | None = None
        self.swept_shm_regions: list[Path] = []  # regions tritonserver left behind and stop() removed

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

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
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            *backend_args,
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            # explicit control lets the router reload a model whose stub died; all models load at start
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--http-restricted-api=model-repository:{ADMIN_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol=model-repository:{ADMIN_HEADER}={self.admin_key}",
            "--disable-auto-complete-config",  # config.pbtxt is the whole truth about each model
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--log-verbose={self.log_verbose}",
        ]

    def start(self) -> None:
        if busy := self.ports.busy():
            raise ServerError(f"port(s) {', '.join(map(str, busy))} already in use: stop what listens there "
                              "or choose other ports with --http-port/--grpc-port/--metrics-port")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            self.command(), env=server_environment(), stdout=self.output, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the launcher, which stops the server in order
            preexec_fn=_die_with_parent,
        )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Block until every model is loaded and the server says ready; raise if it exits first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.returncode} before it was ready; "
                                  "its log says why")
            if self._get("/v2/health/ready") == 200:
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver was not ready within {timeout_s:.0f} s")

    def models(self) -> list[dict[str, str]]:
        """The repository index as the server reports it: name, version, state of each model."""
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST",
                                         headers={ADMIN_HEADER: self.admin_key})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def wait(self) -> int:
        assert self._process is not None, "start() first"
        return self._process.wait()

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def stop(self) -> None:
        """SIGTERM, let in-flight work drain, SIGKILL the process group if it hangs, then sweep shared memory."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=EXIT_TIMEOUT_S + 20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.swept_shm_regions = sorted(SHM_DIR.glob(f"{self.shm_prefix}*"))
        for region in self.swept_shm_regions:
            region.unlink(missing_ok=True)
        if process is not None:  # the stubs' shared reload log and load board
            shutil.rmtree(server_scratch(process.pid), ignore_errors=True)

    def live_processes(self) -> list[int]:
        """PIDs of this server's processes still running: tritonserver and its Python stubs."""
        own = [] if self.returncode is not None or self._process is None else [self._process.pid]
        return own + self.stub_pids()

    def stub_pids(self, model: str = "") -> list[int]:
        """PIDs of this server's Python stub processes, of one model or of all."""
        marker = f"/{model}/".encode() if model else b""
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes()
            except OSError:
                continue  # the process ended while we looked
            if self.shm_prefix.encode() in text and marker in text:
                pids.append(int(cmdline.parent.name))
        return pids

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _get(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as response:
                return response.status
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None
