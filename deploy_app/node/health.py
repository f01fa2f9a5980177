"""The node's health endpoint: ``GET /health`` on ``health_port`` answers 200 when the node takes studies in, 503
when it does not (spool full, listener stopped), with a small JSON document: state, reason, jobs per state.
``GET /metrics`` on the same port serves the node's Prometheus metrics (``deploy_app.node.metrics``).  With an SSL
context (``health_tls``) the port speaks HTTPS only; each handshake runs in its request's thread."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("deploy_app.node")


HANDSHAKE_TIMEOUT_S = 10.0


def send_body(request: BaseHTTPRequestHandler, code: int, content_type: str, body: bytes,
              headers: dict[str, str] | None = None) -> None:
    """Answer ``request`` with ``code``, ``body`` of ``content_type`` and any further ``headers``."""
    request.send_response(code)
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        request.send_header(name, value)
    request.end_headers()
    request.wfile.write(body)


class HttpEndpoint:
    """An HTTP(S) server of the node in a thread of its own: the health port, the STOW-RS port."""

    name = "http"

    def serve(self, host: str, port: int, handler: type[BaseHTTPRequestHandler],
              ssl_context: ssl.SSLContext | None) -> None:
        self._server = ThreadingHTTPServer((host, port), handler) if ssl_context is None else \
            HttpsServer((host, port), handler, ssl_context)
        self._thread = threading.Thread(target=self._server.serve_forever, name=self.name, daemon=True)

    @property
    def scheme(self) -> str:
        return "HTTPS" if isinstance(self._server, HttpsServer) else "HTTP"

    def describe(self) -> str:
        return f"{self.name} on port {self._server.server_address[1]} ({self.scheme})"

    def start(self) -> None:
        self._thread.start()
        log.info("%s", self.describe())

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class HealthServer(HttpEndpoint):
    """Serves ``report()`` (a JSON-able dict whose ``ok`` says healthy or not) at ``/health`` on ``host:port``, and
    ``metrics()`` (bytes of ``metrics_type``) at ``/metrics`` when given; over HTTPS with ``ssl_context``."""

    def __init__(self, host: str, port: int, report: Callable[[], dict[str, Any]],
                 metrics: Callable[[], bytes] | None = None, metrics_type: str = "text/plain",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                path = self.path.split("?")[0]
                if path == "/metrics" and outer.metrics is not None:
                    send_body(self, 200, metrics_type, outer.metrics())
                    return
                if path != "/health":
                    self.send_error(404, "only /health and /metrics are served here")
                    return
                document = outer.report()
                send_body(self, 200 if document.get("ok") else 503, "application/json", json.dumps(document).encode())

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server signature)
                return  # a monitor polls every few seconds: not one log line each

        self.report = report
        self.metrics = metrics
        self.serve(host, port, Handler, ssl_context)

    name = "health"

    def describe(self) -> str:
        return super().describe() + ": /health" + (", /metrics" if self.metrics is not None else "")


class HttpsServer(ThreadingHTTPServer):
    """An HTTP server over TLS (the health port, STOW-RS): the handshake runs in the request's thread, so a slow or
    plain client holds nobody else up, and a failed one is a log line, not a traceback."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 context: ssl.SSLContext) -> None:
        super().__init__(address, handler)
        self.context = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            secure = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as error:
            log.info("health port: TLS handshake from %s failed (%s)", client_address[0],
                     getattr(error, "reason", None) or type(error).__name__)
            return
        with secure:
            super().finish_request(secure, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        request.close()  # wrap_socket took its descriptor over; the TLS socket is closed by then
