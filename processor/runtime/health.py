"""The processor's HTTP endpoints: /metrics, /healthz and /readyz.

Anything on the pod network can reach them, so a client gets `IDLE_SECONDS` per read or write
and at most `MAX_CONNECTIONS` are served at once (a thread each); one more is closed at once
rather than queued. Probes and scrapes take milliseconds and come a few at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from processor.runtime.metrics import Metrics

IDLE_SECONDS = 5.0
MAX_CONNECTIONS = 32


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, up to `limit` at a time; the one past it is closed unserved."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, limit: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(limit)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client gone or too slow (socket.timeout) is not worth a traceback on stderr


class HealthServer:
    """`/metrics`, `/healthz` (the process is alive and not stuck: `is_alive`) and `/readyz`
    (it can do its work: `is_ready`)."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        is_ready: Callable[[], bool],
        is_alive: Callable[[], bool] = lambda: True,
        idle_seconds: float = IDLE_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
    ):
        self._metrics, self._is_ready, self._is_alive = metrics, is_ready, is_alive
        self._idle_seconds = idle_seconds
        self._server = _BoundedServer((host, port), self._handler_class(), max_connections)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health-server", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            timeout = owner._idle_seconds  # per socket read or write: an idle client is dropped

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._reply(200, owner._metrics.render(), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    alive = owner._is_alive()
                    self._reply(200 if alive else 503, b"ok\n" if alive else b"stuck\n")
                elif self.path == "/readyz":
                    ready = owner._is_ready()
                    self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, status: int, body: bytes, kind: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds are not events worth a log line

        return Handler
