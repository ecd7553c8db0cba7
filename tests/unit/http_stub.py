"""A stand-in for tritonserver's HTTP endpoint on loopback: GET and POST answer from a function of the path."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Reply = Callable[[str], tuple[int, bytes]]  # path -> (status, body)


@contextlib.contextmanager
def http_stub(
    reply: Reply, headers: list[dict[str, str]] | None = None, bodies: list[bytes] | None = None
) -> Iterator[tuple[str, list[str]]]:
    """Serve GETs and POSTs with `reply` until the block ends; yields the address (host:port) and the paths asked
    for (a POST's as "POST <path>"); with `headers`, each request's headers are appended there, and with `bodies`
    each POST's body."""
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(self.path)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if bodies is not None:
                bodies.append(body)
            self._answer(f"POST {self.path}")

        def _answer(self, asked: str) -> None:
            paths.append(asked)
            if headers is not None:
                headers.append(dict(self.headers))
            status, body = reply(asked)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()
