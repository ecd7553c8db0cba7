"""A redis-server of its own, for tests and benchmarks of the Redis state store: on a free port of 127.0.0.1, in a
scratch directory, without persistence; it can be stopped, paused and started again on the same port (an outage)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

REDIS_SERVER = "/usr/bin/redis-server"  # Debian's redis-server (tools/bootstrap.sh installs it)
READY_TIMEOUT_S = 10.0


class RedisServerError(RuntimeError):
    """redis-server is missing or did not start; the message says what to do."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """redis-server on 127.0.0.1:`port` (a free one by default); `url` names database 0 for `--state`."""

    def __init__(self, workdir: Path, port: int | None = None, executable: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or _free_port()
        self.executable = executable or shutil.which("redis-server") or REDIS_SERVER
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it and wait until it answers PING; RedisServerError when it cannot (the message has its log)."""
        if not Path(self.executable).exists():
            raise RedisServerError(f"{self.executable} not found: run tools/bootstrap.sh (Debian package redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "redis.log"
        options = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "dir": str(self.workdir),
            "save": "",
            "appendonly": "no",
            "logfile": str(log),
            "daemonize": "no",
        }
        self._process = subprocess.Popen(
            [self.executable, *(word for name, value in options.items() for word in (f"--{name}", value))],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.RedisError:
                    if self._process.poll() is not None or time.monotonic() > deadline:
                        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                        self.stop()
                        raise RedisServerError(f"redis-server on port {self.port} did not start:\n{tail}") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def flush(self) -> None:
        """FLUSHALL: empty every database (tests start from nothing)."""
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5) as client:
            client.flushall()

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 5 s); what it held is gone (no persistence)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a paused one takes SIGTERM only once continued
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def pause(self) -> None:
        """SIGSTOP: it keeps its port and its connections but answers nothing (a hung or very slow Redis)."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
