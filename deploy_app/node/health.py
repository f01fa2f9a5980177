"""The node's health endpoint: ``GET /health`` on ``health_port`` answers 200 when the node takes studies in, 503
when it does not (spool full, listener stopped), with a small JSON document: state, reason, jobs per state.
``GET /metrics`` on the same port serves the node's Prometheus metrics (``deploy_app.node.metrics``)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("deploy_app.node")


class HealthServer:
    """Serves ``report()`` (a JSON-able dict whose ``ok`` says healthy or not) at ``/health`` on ``host:port``, and
    ``metrics()`` (bytes of ``metrics_type``) at ``/metrics`` when given."""

    def __init__(self, host: str, port: int, report: Callable[[], dict[str, Any]],
                 metrics: Callable[[], bytes] | None = None, metrics_type: str = "text/plain") -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                path = self.path.split("?")[0]
                if path == "/metrics" and outer.metrics is not None:
                    self._answer(200, metrics_type, outer.metrics())
                    return
                if path != "/health":
                    self.send_error(404, "only /health and /metrics are served here")
                    return
                document = outer.report()
                self._answer(200 if document.get("ok") else 503, "application/json", json.dumps(document).encode())

            def _answer(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server signature)
                return  # a monitor polls every few seconds: not one log line each

        self.report = report
        self.metrics = metrics
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("health endpoint on port %d (/health%s)", self._server.server_address[1],
                 ", /metrics" if self.metrics is not None else "")

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
