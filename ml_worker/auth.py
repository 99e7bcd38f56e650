"""Who may send a worker work: CURVE on its ROUTER socket, a ZAP handler that admits only the authorised
app servers' keys, and a count of everything turned away.

With ``--curve-secret-key`` and ``--curve-authorized-dir`` the socket is a CURVE server (encrypted,
``shared/curve.py``), and at each handshake libzmq asks the ZAP handler (pyzmq's
``ThreadAuthenticator``: its own thread, so a handshake never waits on the event loop and the loop never
runs authentication) whether the client's public key is in the authorised set. The set is the ``*.key``
files of the directory, re-read when the directory changes, so keys rotate without a restart. A key
removed from it is refused at its next handshake, and connections it already holds are cut off too:
every message carries the key it was admitted with (ZeroMQ's ``User-Id`` property), checked against the
current set (about 0.7 µs a message).

Counting: libzmq reports every failed handshake on the socket's monitor (a ZAP refusal as an auth
failure; a client without keys, with the wrong worker key, or not speaking ZeroMQ at all as a protocol
failure, which never reaches ZAP), so ``tandem_worker_auth_failures_total`` is counted there, by reason.
Log lines are rate-limited: a client retrying in a loop must not flood the log.

Order matters, because libzmq lets a CURVE client in unchecked when no ZAP handler is listening: the
handler starts before the socket binds and stops only after it has closed, and if the handler's thread
dies the worker stops rather than serve without it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from ml_worker import metrics
from shared import curve
from shared.curve import Authorized, ServerKeys
from shared.settings import WorkerSettings
from shared.transport import LoopSocket

logger = logging.getLogger(__name__)

RELOAD_S = 2.0
"""How often the authorised directory is checked for changes (a listing and a stat per key file)."""
LOG_EVERY_S = 10.0
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class Every:
    """A warning at most once per ``every_s``; the next one says how many were left out meanwhile."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._next = 0.0
        self._skipped = 0

    def __call__(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            message += f" ({self._skipped} more in the last {self.every_s:g} s not logged)"
        self._next, self._skipped = now + self.every_s, 0
        logger.warning(message, *args)


class _Zap(ThreadAuthenticator):
    """pyzmq's ZAP thread, remembering the address of the request it is answering, for the log."""

    address = "?"

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)


class CurveGuard:
    """The worker's CURVE keys, the authorised set, and the ZAP handler and monitor that enforce it."""

    def __init__(self, keys: ServerKeys, directory: Path, authorized: Authorized) -> None:
        self.keys = keys
        self.directory = directory
        self._set(authorized.keys)
        self._seen = curve.fingerprint(directory)
        self._zap: _Zap | None = None
        self._sock: zmq.Socket | None = None
        self._monitor: LoopSocket | None = None
        self._log_refused, self._log_handshake, self._log_revoked = Every(), Every(), Every()

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> CurveGuard | None:
        """None without CURVE. Reads every key file now: a bad one stops the worker before it binds."""
        keys = curve.server_keys(settings)
        if keys is None or settings.curve_authorized_dir is None:
            return None
        directory = settings.curve_authorized_dir
        return cls(keys, directory, curve.read_authorized(directory, "--curve-authorized-dir"))

    def _set(self, allowed: dict[bytes, str]) -> None:
        # Replaced whole, never mutated: the ZAP thread reads ``_allowed`` while the loop reloads.
        self._allowed = allowed
        self._user_ids = frozenset(k.decode() for k in allowed)

    @property
    def admitted(self) -> list[str]:
        """File names of the keys admitted now."""
        return sorted(self._allowed.values())

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self, ctx: zmq.Context) -> None:
        """Start the ZAP handler on ``ctx``; call before the guarded socket binds."""
        zap = _Zap(ctx, log=logging.getLogger("zmq.auth"))
        zap.start()
        zap.configure_curve_callback("*", self)
        self._zap = zap
        logger.info(
            "CURVE on: worker key %s (public %s); admitting %s from %s",
            self.keys.own.path,
            self.keys.own.public.decode(),
            curve.describe(self.admitted),
            self.directory,
        )

    def watch(self, sock: zmq.Socket) -> None:
        """Count and log the failed handshakes of ``sock`` (read on the event loop once :meth:`run` runs)."""
        self._sock = sock
        self._monitor = LoopSocket(sock.get_monitor_socket(_HANDSHAKE_EVENTS), self._on_event)

    async def run(self) -> None:
        """Read the monitor, and re-read the authorised directory every ``RELOAD_S``, until cancelled."""
        if self._monitor is not None:
            self._monitor.start()
        try:
            while True:
                await asyncio.sleep(RELOAD_S)
                if self._zap is not None and not self._zap.is_alive():
                    raise RuntimeError("the CURVE ZAP handler thread stopped; no app server could connect")
                self.reload()
        finally:
            if self._monitor is not None:
                self._monitor.stop()

    def stop_monitor(self) -> None:
        """Before the guarded socket closes (the context cannot end while the monitor's socket is open)."""
        if self._monitor is not None:
            if self._sock is not None and not self._sock.closed:
                self._sock.disable_monitor()
            self._monitor.close()
        self._monitor = None

    def stop(self) -> None:
        """After the guarded socket closed: without a handler, libzmq would admit any CURVE client."""
        self.stop_monitor()
        if self._zap is not None:
            self._zap.stop()
            self._zap = None

    # -- the authorised set --------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the directory if a key file was added, removed or rewritten. A file that cannot be used
        is logged and left out: a reload only ever narrows who gets in by mistake, never widens it."""
        seen = curve.fingerprint(self.directory)
        if seen == self._seen:
            return
        self._seen = seen
        found = curve.scan_authorized(self.directory)
        for problem in found.problems:
            logger.error("%s; not admitted", problem)
        if found.keys == self._allowed:
            return
        before, after = set(self._allowed.values()), set(found.keys.values())
        self._set(found.keys)
        logger.warning(
            "authorised keys in %s changed: added %s, removed %s; admitting %s",
            self.directory,
            curve.describe(after - before),
            curve.describe(before - after),
            curve.describe(after),
        )

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP (its thread): whether the client holding ``key`` (Z85) may complete its handshake."""
        try:
            if key in self._allowed:
                return True
            address = self._zap.address if self._zap is not None else "?"
            self._log_refused("refused CURVE key %s from %s: not in %s", key.decode(), address, self.directory)
        except Exception:  # never let the handler thread die: it would stop every later handshake
            logger.exception("error checking a CURVE key; refused")
        return False

    def admits(self, frame: zmq.Frame) -> bool:
        """Whether a received message's connection still holds an authorised key (every message: its key
        may have been removed since the handshake)."""
        if frame.get("User-Id") in self._user_ids:
            return True
        metrics.AUTH_FAILURES["revoked"].inc()
        self._log_revoked("dropped a message from %s: its key is no longer authorised", frame.get("Peer-Address"))
        return False

    def _on_event(self, frames: list[Any]) -> None:
        event = parse_monitor_message([f.bytes for f in frames])
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # ZAP said no, and logged the key
            metrics.AUTH_FAILURES["unauthorized"].inc()
            return
        metrics.AUTH_FAILURES["handshake"].inc()
        self._log_handshake(
            "refused a connection that failed the CURVE handshake: a client without keys, with the wrong "
            "worker public key, or not speaking ZeroMQ"
        )
