"""Running one app server under uvicorn, alone on its port or sharing it with others (``--reuse-port``).

``tandem up --apps N`` starts N app server processes on one port, each bound with ``SO_REUSEPORT``: the
kernel spreads incoming connections over them, so one machine uses several cores for HTTP with no proxy
in front (a proxy would be one more process parsing every request). Each process is a plain
``tandem app``, with its own worker connections, admission limit and metrics.
"""

from __future__ import annotations

import socket
from typing import Any

from shared.settings import AppSettings


def shared_socket(host: str, port: int) -> socket.socket:
    """A listening socket other processes may bind too (Linux, BSD, macOS: ``SO_REUSEPORT``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and the
    # connections accepted here inherit it (without, Nagle and delayed ACKs cost 40 ms per answer).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_uvicorn(application: Any, settings: AppSettings) -> None:
    import uvicorn

    config = uvicorn.Config(
        application,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        loop=settings.http_loop,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[shared_socket(settings.host, settings.port)] if settings.reuse_port else None)
