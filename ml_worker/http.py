"""The worker's small HTTP side: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for probes.

It runs on its own daemon threads, so a scrape never touches the ZeroMQ event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

_ready: Callable[[], bool] = lambda: False  # noqa: E731


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def set_readiness(check: Callable[[], bool]) -> None:
    global _ready
    _ready = check


def _app(metrics_app: Callable) -> Callable:
    def app(environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ok = _ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ready\n" if ok else b"no model loaded\n"]
        return metrics_app(environ, start_response)

    return app


def start_http(port: int, host: str = "0.0.0.0") -> WSGIServer:
    server = make_server(host, port, _app(make_wsgi_app()), server_class=_Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
