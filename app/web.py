"""/health, /metrics, the status page and /api/v1: a small Flask app served by waitress on its own thread.

Handlers only evaluate what the health monitor already holds in memory (the status page also what its model
built from that memory), so they answer in milliseconds whatever the targets or a running backup are doing.
STATUS_TOKEN guards the page and /api/v1; /health and /metrics stay open for probes and scrapers.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Any

from flask import Flask, Response, request
from waitress.server import create_server

from app.errors import SidecarError
from app.health import HealthMonitor
from app.metrics import CONTENT_TYPE, Metrics
from app.status import api as status_api
from app.status import auth
from app.status import page as status_page
from app.status.model import StatusCache

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

    token = monitor.settings.health.status_token

    @app.get("/api/v1/openapi.json")
    def openapi() -> Response:  # open like /health: it describes the API and holds no data
        return _json(status_api.openapi_doc(protected=token is not None), 200)

    cache = StatusCache(monitor)
    cache.start()
    app.extensions["status_cache"] = cache
    for bp in (status_page.blueprint(monitor, cache), status_api.blueprint(monitor, cache)):
        bp.before_request(lambda: None if auth.authorized(request, token) else _unauthorized())
        bp.after_request(_hardened)
        app.register_blueprint(bp)
    app.jinja_env.get_template("status.html")  # compiled now, not by the first visitor
    return app


def _unauthorized() -> Response:
    return status_api.json_response(
        {"error": "this page needs STATUS_TOKEN (hint: send it as `Authorization: Bearer TOKEN`, or as the "
                  "password of basic auth with any user name)"}, 401, auth.challenge())


def _hardened(response: Response) -> Response:
    """The page runs no script and loads nothing; a browser is told so, and never to frame it."""
    response.headers.setdefault("Content-Security-Policy",
                                "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


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
        log.info("serving /health, /metrics and the status page on http://%s:%d", self.host, self.port)

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
