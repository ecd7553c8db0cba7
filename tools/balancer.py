"""Several tierserve servers (replicas) behind one nginx: the configuration for N replicas, and nginx run in the
foreground with everything it writes under one directory of its own.

Where a retry is safe, and so what nginx retries on another replica (at most RETRY_TRIES tries in all):
- HTTP inference (`POST /v2/models/<m>/infer`, feedback aside) is idempotent: an answer has no side effect a second
  answer would repeat (per-arm counts and the inference log may count a row twice, once on the replica that died). So
  it is tried on the next replica after a connection error, a timeout, or a 502 (a replica that closed the connection
  mid-answer), even once it was sent (nginx's `non_idempotent`): a request in flight on a replica that dies is
  answered by another. Not after a 503: from a live tritonserver that is UNAVAILABLE, a request shed under overload
  (or a full queue), and the client is told so. nginx counts every answer it retries as a failed try of the replica,
  and one (max_fails) takes the replica out: retried, one shed best_effort request took its replica out for
  fail_timeout_s, and once every replica had shed one, nginx had no replica left and answered 502 to every request,
  critical ones included, for that long.
- HTTP feedback (`POST /v2/models/feedback/infer`) is not idempotent, so it goes to another replica only when it never
  reached one (the connection failed). A repeat would do no harm anyway: the replicas share one state store, where
  feedback claims its REQUEST_ID with one SET NX, so a second feedback for an id is refused as a duplicate.
- gRPC: nginx streams a gRPC request's body to the replica without keeping it (its grpc module never buffers it), so
  it can try another replica only while nothing was sent: a refused connection, a replica out. A call in flight on a
  replica that dies fails with UNAVAILABLE (TierserveError.retryable): the client may send it again; inference is
  idempotent and feedback is refused as a duplicate if the dead replica had taken it.
- The admin APIs change one server; through the balancer they would reach a replica at random, so they are refused
  here (403): run admin commands against each server's own address.

Health, with nginx open source (no active health checks): a replica is taken out passively, after `max_fails` failed
tries within `fail_timeout_s` (a refused or reset connection, a timeout, a 502 or 503), for `fail_timeout_s`, then
tried again with live traffic; the try that fails meanwhile goes on to the next replica. tritonserver listens only once
every model is loaded (ready) and closes its ports at once on SIGTERM, so a replica that is starting, restarting under
its supervisor, or stopping refuses connections: it is out, without a failed request, until it is ready again.
`Nginx.reload` with a replica marked `down` takes one out by hand (to drain it before maintenance).

The configuration for an nginx of the operator's: `python -m tierserve.tools.balancer --replica a=10.0.0.1:8000:8001
--replica b=10.0.0.2:8000:8001 --http-port 8000 --grpc-port 8001 --prefix /var/lib/tierserve-nginx > nginx.conf`.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tierserve.tools.server import _die_with_parent

NGINX = Path("/usr/sbin/nginx")  # Debian's nginx (tools/bootstrap.sh installs it)
RETRY_TRIES = 2  # an idempotent request is tried on at most this many replicas
ADMIN_PATHS = ("repository", "logging", "trace", "systemsharedmemory", "cudasharedmemory")  # under /v2/
FEEDBACK_MODEL = "feedback"
ACCESS_FIELDS = ("at", "port", "method", "uri", "status", "upstream_addr", "upstream_status")  # access.log, '|'
_UNUSED_TEMPS = ("fastcgi", "uwsgi", "scgi")  # nginx creates them at start: under the prefix, not /var/lib/nginx
STOP_TIMEOUT_S = 10.0  # after SIGQUIT (graceful: in-flight requests finish), then SIGKILL


class BalancerError(RuntimeError):
    """nginx refused its configuration or did not start; the message carries its error log."""


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Replica(_Settings):
    """One tierserve server behind the balancer."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="for people and logs")
    host: str = Field("127.0.0.1", pattern=r"^[A-Za-z0-9_.-]+$", description="where the balancer reaches it")
    http_port: int = Field(ge=1, le=65535)
    grpc_port: int = Field(ge=1, le=65535)
    down: bool = Field(False, description="taken out by hand: nginx sends it nothing")


class BalancerSettings(_Settings):
    """Where nginx listens, and how it judges a replica."""

    address: str = Field("127.0.0.1", pattern=r"^[0-9.]+$", description="the IPv4 address nginx listens on")
    http_port: int = Field(ge=1, le=65535)
    grpc_port: int = Field(ge=1, le=65535)
    max_fails: int = Field(1, ge=1, description="failed tries within fail_timeout_s that take a replica out")
    fail_timeout_s: int = Field(2, ge=1, description="how long a replica is out, and the window max_fails counts in")
    connect_timeout_s: float = Field(1.0, gt=0, le=60, description="a replica that does not accept by then failed")
    read_timeout_s: float = Field(30.0, gt=0, description="a replica silent this long on a request failed")
    max_body_bytes: int = Field(64 * 2**20, ge=1, description="the largest request taken (images are float32)")
    keepalive: int = Field(16, ge=0, description="idle connections nginx keeps open to each replica's workers")


def _upstream(name: str, replicas: Sequence[Replica], port: str, settings: BalancerSettings) -> str:
    servers = "\n".join(
        f"        server {r.host}:{getattr(r, port)} max_fails={settings.max_fails} "
        f"fail_timeout={settings.fail_timeout_s}s{' down' if r.down else ''};  # {r.name}"
        for r in replicas
    )
    keepalive = f"\n        keepalive {settings.keepalive};" if settings.keepalive else ""
    return f"    upstream {name} {{\n{servers}{keepalive}\n    }}"


def nginx_config(replicas: Sequence[Replica], settings: BalancerSettings, prefix: Path) -> str:
    """nginx.conf for `replicas` behind `settings`' ports, writing its pid, logs and temporary files under `prefix`
    (absolute). The access log's lines are `ACCESS_FIELDS`. ValueError without replicas or with duplicate names."""
    if not replicas:
        raise ValueError("a balancer needs at least one replica")
    if len({r.name for r in replicas}) != len(replicas):
        raise ValueError(f"replica names must differ, got {[r.name for r in replicas]}")
    prefix = prefix.resolve()
    temp = "\n".join(f"    {kind}_temp_path {prefix}/tmp/{kind};" for kind in ("client_body", "proxy", *_UNUSED_TEMPS))
    timeouts = f"{settings.connect_timeout_s:g}s"
    read = f"{settings.read_timeout_s:g}s"
    admin = "|".join(ADMIN_PATHS)
    refuse_admin = (
        f"        location ~ ^/v2/({admin})(/|$) {{\n"
        '            return 403 "tierserve balancer: admin APIs change one server; call each server directly\\n";\n'
        "        }"
    )
    return f"""# {len(replicas)} tierserve replica(s) behind nginx: see tierserve.tools.balancer
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    log_format tierserve '$msec|$server_port|$request_method|$uri|$status|$upstream_addr|$upstream_status';
    access_log {prefix}/access.log tierserve;
{temp}
    client_max_body_size {settings.max_body_bytes};
{_upstream("tierserve_http", replicas, "http_port", settings)}
{_upstream("tierserve_grpc", replicas, "grpc_port", settings)}
    server {{
        listen {settings.address}:{settings.http_port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_connect_timeout {timeouts};
        proxy_send_timeout {read};
        proxy_read_timeout {read};
{refuse_admin}
        # feedback is not idempotent: another replica only when none was reached (the connection failed)
        location ~ ^/v2/models/{FEEDBACK_MODEL}(/versions/[0-9]+)?/infer$ {{
            proxy_pass http://tierserve_http;
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries {RETRY_TRIES};
        }}
        # inference is idempotent: tried again on the next replica even once sent; a 503 (shed) goes to the client
        location ~ ^/v2/models/[^/]+(/versions/[0-9]+)?/infer$ {{
            proxy_pass http://tierserve_http;
            proxy_next_upstream error timeout http_502 non_idempotent;
            proxy_next_upstream_tries {RETRY_TRIES};
        }}
        # health, metadata, configs, statistics: GETs, which nginx retries by itself
        location / {{
            proxy_pass http://tierserve_http;
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries {RETRY_TRIES};
        }}
    }}
    server {{
        listen {settings.address}:{settings.grpc_port} http2;
        grpc_connect_timeout {timeouts};
        grpc_send_timeout {read};
        grpc_read_timeout {read};
        # admin calls change one server: call each server directly
        location ~ ^/inference\\.GRPCInferenceService/(RepositoryIndex|RepositoryModel|Log|Trace|.*SharedMemory) {{
            return 403;
        }}
        # the request body is streamed, never kept: another replica only while nothing was sent (see the docstring)
        location / {{
            grpc_pass grpc://tierserve_grpc;
            grpc_next_upstream error timeout http_502 http_503;
            grpc_next_upstream_tries {RETRY_TRIES};
        }}
    }}
}}
"""


def _accepts(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((address, port)) == 0


class Nginx:
    """nginx in the foreground (not a daemon), its configuration, pid, logs and temporary files under `prefix`; use
    as a context manager or start()/stop()."""

    def __init__(
        self, replicas: Sequence[Replica], settings: BalancerSettings, prefix: Path, binary: Path = NGINX
    ) -> None:
        self.replicas = tuple(replicas)
        self.settings = settings
        self.prefix = prefix.resolve()
        self.binary = binary
        self.config_path = self.prefix / "nginx.conf"
        self.access_log = self.prefix / "access.log"
        self.error_log = self.prefix / "error.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"{self.settings.address}:{self.settings.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.settings.address}:{self.settings.grpc_port}"

    def _write_config(self) -> None:
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(nginx_config(self.replicas, self.settings, self.prefix))

    def _command(self, *extra: str) -> list[str]:
        # -e: the error log before the configuration is read (else Debian's /var/log/nginx/error.log)
        paths = ["-p", f"{self.prefix}/", "-c", str(self.config_path), "-e", str(self.error_log)]
        return [str(self.binary), *paths, "-g", "daemon off;", *extra]  # in the foreground: its parent stops it

    def check(self) -> None:
        """`nginx -t` on the written configuration; BalancerError with nginx's words if it refuses it."""
        self._write_config()
        checked = subprocess.run(self._command("-t"), capture_output=True, text=True, check=False)
        if checked.returncode != 0:
            raise BalancerError(f"nginx refused {self.config_path}: {checked.stderr.strip()}")

    def start(self, timeout_s: float = 10.0) -> None:
        """Start nginx and wait until both ports accept connections; BalancerError if it exits or never does."""
        self.check()
        self._process = subprocess.Popen(
            self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout_s
        address = self.settings.address
        while not (_accepts(address, self.settings.http_port) and _accepts(address, self.settings.grpc_port)):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BalancerError(f"nginx did not start; {self.error_log} says: {self._error_tail()}")
            time.sleep(0.05)

    def reload(self, replicas: Sequence[Replica]) -> None:
        """Serve `replicas` from now on (one marked down gets nothing new): nginx's workers finish what they hold
        and new ones take the new configuration (SIGHUP). BalancerError if nginx refuses it (the old one stays)."""
        previous, self.replicas = self.replicas, tuple(replicas)
        try:
            self.check()
        except BalancerError:
            self.replicas = previous
            self._write_config()
            raise
        assert self._process is not None, "start() first"
        self._process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """Graceful stop (SIGQUIT: requests in flight finish), SIGKILL after STOP_TIMEOUT_S. Safe when not running."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()  # the master; its workers end when it is gone
            process.wait()

    def _error_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.error_log.read_text(errors="replace").splitlines()[-lines:]) or "nothing"
        except OSError:
            return "nothing (no error log)"

    def access_lines(self) -> list[dict[str, str]]:
        """The access log so far, one dict of ACCESS_FIELDS per request answered."""
        if not self.access_log.exists():
            return []
        rows = []
        for line in self.access_log.read_text().splitlines():
            fields = line.split("|")
            if len(fields) == len(ACCESS_FIELDS):
                rows.append(dict(zip(ACCESS_FIELDS, fields, strict=True)))
        return rows

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _replica(text: str) -> Replica:
    """NAME=HOST:HTTP_PORT:GRPC_PORT"""
    name, _, address = text.partition("=")
    parts = address.split(":")
    if not name or len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:HTTP_PORT:GRPC_PORT, got {text!r}")
    try:
        return Replica(name=name, host=parts[0], http_port=int(parts[1]), grpc_port=int(parts[2]))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


def main(argv: list[str] | None = None) -> int:
    """Print nginx.conf for the replicas named on the command line."""
    parser = argparse.ArgumentParser(prog="python -m tierserve.tools.balancer", description=main.__doc__)
    parser.add_argument("--replica", type=_replica, action="append", required=True, help="NAME=HOST:HTTP:GRPC")
    parser.add_argument("--address", default="0.0.0.0", help="the address nginx listens on")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--prefix", type=Path, required=True, help="where nginx writes its pid, logs, temp files")
    args = parser.parse_args(argv)
    try:
        settings = BalancerSettings(address=args.address, http_port=args.http_port, grpc_port=args.grpc_port)
        sys.stdout.write(nginx_config(args.replica, settings, args.prefix))
    except ValueError as error:
        print(f"tierserve balancer: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
