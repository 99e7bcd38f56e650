"""One worker as the app server knows it: its socket, its calls in flight, and what its last heartbeat
said about each model it serves.

The heartbeat contract (a ping's reply header)::

    {"models": {NAME: {"live": "3" | None, "resident": ["3", ...], "loaded": bool,
                       "queue_depth": int, "est_wait_ms": float, "policy": {...}}},
     "queue_depth": int, "est_wait_ms": float, "in_flight": int, "draining": bool, "device": str}

Per-model ``loaded``, ``queue_depth`` and ``est_wait_ms`` are newer than the rest: a worker that does
not send them is read as holding every model loaded, with only worker-wide queue figures.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from shared import protocol
from shared.traffic import TrafficPolicy
from shared.transport import LoopSocket

HANDSHAKE_RETRY_S = 2.0
HANDSHAKE_FAILED = {  # why, as the log says it
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "it refused this app server's CURVE key (not in its --curve-authorized-dir)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the handshake failed: one side runs with CURVE keys and the other without",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the handshake failed (with CURVE: is --curve-worker-key its public key?)",
}
RETRIED_BY_ZMQ = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
"""The worker hung up: libzmq reconnects. After the others it gives up, and the pool connects again."""
MONITORED = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
for _event in HANDSHAKE_FAILED:
    MONITORED |= _event


@dataclass(slots=True)
class ModelOnWorker:
    """What one worker's last heartbeat said about one model."""

    live: str | None = None
    """The version new requests run on; ``None`` while none is loaded yet."""
    resident: list[str] = field(default_factory=list)
    """Versions held, the live one and those kept for requests already encoded for them."""
    loaded: bool = True
    """``False``: unloaded to stay within the worker's memory budget; it still accepts requests for the
    model, loading it on demand (or answering ``model_loading``), so other workers are preferred."""
    queue_depth: int | None = None
    est_wait_ms: float | None = None
    """This model's own queue figures; ``None``: the worker sent only worker-wide ones."""
    refused: dict[str, Any] | None = None
    """The version the registry names that this worker refused (``version``, ``error``), if any."""
    policy: TrafficPolicy | None = None
    """The model's traffic policy as this worker read it from the registry (``shared.traffic``)."""


def read_models(header: dict[str, Any]) -> dict[str, ModelOnWorker]:
    """The ``models`` of a heartbeat, read in full (raises on anything malformed, changing nothing)."""
    models = header.get("models") or {}
    if not isinstance(models, dict):
        raise ValueError(f"models: expected a map, got {type(models).__name__}")
    out = {}
    for name, m in models.items():
        live = m.get("live")
        depth, wait = m.get("queue_depth"), m.get("est_wait_ms")
        out[str(name)] = ModelOnWorker(
            live=None if live is None else str(live),
            resident=[str(v) for v in m.get("resident") or []],
            loaded=bool(m.get("loaded", True)),
            queue_depth=None if depth is None else int(depth),
            est_wait_ms=None if wait is None else float(wait),
            refused=m.get("refused") if isinstance(m.get("refused"), dict) else None,
            policy=TrafficPolicy.from_wire(m.get("policy")),
        )
    return out


@dataclass(eq=False)
class WorkerConn:
    endpoint: str
    io: LoopSocket
    """The DEALER to this worker, read by a callback on its descriptor (no future per message)."""
    pending: dict[str, asyncio.Future[protocol.Message]] = field(default_factory=dict)
    last_seen: float = 0.0
    alive: bool = False
    models: dict[str, ModelOnWorker] = field(default_factory=dict)
    """Every model the worker serves, as of its last heartbeat (kept while it is silent: a model whose
    only worker died is still known, and answered 503, not 404)."""
    queue_depth: int = 0
    est_wait_ms: float = 0.0
    device: str | None = None
    draining: bool = False
    unanswered: int = 0
    """Pings sent since the last reply of any kind."""
    removed: bool = False
    """Gone from discovery: no new calls; the socket closes once its calls are answered."""
    rtt_ewma_s: float = 0.0
    monitor: zmq.asyncio.Socket | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    outbox: list[tuple[str, list[Any]]] = field(default_factory=list)
    """Inference requests to send at the end of this event-loop turn, in one envelope."""
    refused: bool = False
    """Its last handshake failed (wrong or unauthorised CURVE key): reconnecting every few seconds."""

    @property
    def outstanding(self) -> int:
        return len(self.pending)

    def live(self, model: str) -> str | None:
        m = self.models.get(model)
        return m.live if m is not None else None

    def holds(self, model: str, version: str) -> bool:
        """Whether a request for ``version`` can run here: it is in memory, or it is the live version
        (in memory or not: an unloaded model is loaded again on demand, and lists no resident version)."""
        m = self.models.get(model)
        return m is not None and (version == m.live or version in m.resident)

    def loaded(self, model: str) -> bool:
        m = self.models.get(model)
        return m is None or m.loaded

    def load(self, model: str) -> tuple[int, float]:
        """Queue depth and estimated wait for ``model``: its own figures, else the worker-wide ones."""
        m = self.models.get(model)
        if m is None:
            return self.queue_depth, self.est_wait_ms
        return (
            self.queue_depth if m.queue_depth is None else m.queue_depth,
            self.est_wait_ms if m.est_wait_ms is None else m.est_wait_ms,
        )

    def routable(self) -> bool:
        return self.alive and not self.draining and not self.removed

    def apply_heartbeat(self, header: dict[str, Any]) -> None:
        # Read in full before anything changes: a malformed heartbeat raises (the caller logs it) and
        # leaves the worker as it was, not half-updated and marked alive with stale versions.
        models = read_models(header)
        queue_depth = int(header.get("queue_depth") or 0)
        est_wait_ms = float(header.get("est_wait_ms") or 0.0)
        self.models = models
        self.queue_depth, self.est_wait_ms = queue_depth, est_wait_ms
        self.device = header.get("device")
        self.draining = bool(header.get("draining"))

    def reconnect(self) -> None:
        """Connect again after a refused handshake, which libzmq gives up on: the worker's authorised keys
        may change (a rotation), and then this app server gets in without a restart."""
        sock = self.io.sock
        if sock.closed:  # left the pool meanwhile
            return
        with contextlib.suppress(zmq.ZMQError):
            sock.disconnect(self.endpoint)
        sock.connect(self.endpoint)

    def model_info(self, model: str) -> dict[str, Any]:
        """This worker in a model's ``/v1/models`` entry."""
        m = self.models.get(model) or ModelOnWorker()
        return {"endpoint": self.endpoint, "alive": self.alive, "live": m.live, "versions": m.resident,
                "loaded": m.loaded, "refused": m.refused}  # fmt: skip
