"""/health and /metrics: a small Flask app served by waitress on its own thread.

Handlers only evaluate what the health monitor already holds in memory, so they answer in microseconds
whatever the targets or a running backup are doing.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Any

from flask import Flask, Response
from waitress.server import create_server

from app.errors import SidecarError
from app.health import HealthMonitor
from app.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)


def make_app(monitor: HealthMonitor, metrics: Metrics) -> Flask:
    app = Flask("backup-sidecar")

    @app.get("/health")
    def health() -> Response:
        doc = monitor.payload()
        return _json(doc, 503 if doc["code"] == 2 else 200)

    @app.get("/metrics")
    def metrics_view() -> Response:
        return Response(metrics.render(), 200, {"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"})

    @app.get("/")
    def index() -> Response:
        return _json({"service": "backup-sidecar", "endpoints": ["/health", "/metrics"]}, 200)

    return app


def _json(doc: dict[str, Any], status: int) -> Response:
    body = json.dumps(doc, separators=(",", ":"))
    return Response(body, status, {"Content-Type": "application/json", "Cache-Control": "no-store"})


class WebServer:
    """waitress on a socket bound here, so a busy port is one clear error and port 0 picks a free one."""

    def __init__(self, app: Flask, host: str, port: int, threads: int = 8) -> None:
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        except OSError as exc:
            raise SidecarError(
                f"cannot listen on {host}:{port} for /health: {exc.strerror or exc} "
                "(hint: set HEALTH_PORT to a free port, or HEALTH_BIND to an address of this host)"
            ) from exc
        self.port = sock.getsockname()[1]
        self.host = host
        self.server = create_server(
            app,
            sockets=[sock],
            threads=threads,
            ident="backup-sidecar",
            channel_timeout=30,
        )
        self._stopping = False
        self.thread = threading.Thread(target=self._serve, name="http", daemon=True)

    def _serve(self) -> None:
        try:
            self.server.run()
        except (OSError, ValueError):
            if not self._stopping:  # closing the sockets under select() is how stop() ends the loop
                raise

    def start(self) -> None:
        self.thread.start()
        log.info("serving /health and /metrics on http://%s:%d", self.host, self.port)

    def stop(self) -> None:
        """Close the connections and the listener; the serving thread ends on its next poll."""
        self._stopping = True
        server: Any = self.server
        for channel in list(server._map.values()):
            if channel is not server:
                try:
                    channel.close()
                except OSError:
                    pass
        server.task_dispatcher.shutdown(timeout=2)
        server.close()
        self.thread.join(2)
