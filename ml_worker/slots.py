"""A model slot: everything a worker keeps for one registered model it serves, in one object.

Its versions (the live one, previous ones kept for stragglers, and what is needed to load the live one
again after it was unloaded to save memory), its batcher and cost models, its executor share, its
metrics and its use. "For each model" loops and eviction read this object instead of parallel dicts
keyed by name.

Version pointers change only on the event loop, between batches, so a batch always runs against the
version it was formed for. A replaced version stays resident for ``keep_previous_s`` so requests the
app server already encoded for it still finish on it. Versions a traffic policy names (the ``canary``
and ``shadow`` aliases, ``policy_watch.py``) are *pinned*: resident beside the live one for as long as
the policy names them, counted against the memory budget like any other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_worker import metrics
from ml_worker.batcher import Batcher, Pending
from ml_worker.versions import LoadedVersion, WireInput
from shared.model_targets import ModelTarget
from shared.traffic import TrafficPolicy

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class UnloadedVersion:
    """The live version of a model whose runner was unloaded to stay within the memory budget: enough
    to describe it, check requests against it, and load it again from its folder."""

    version: str
    wire_input: WireInput
    description: dict[str, Any]
    model_dir: Path
    origin: str
    size_bytes: int
    load_s: float
    device: str


class ModelSlot:
    """One model on one worker."""

    def __init__(
        self, target: ModelTarget, batcher: Batcher, *, weight: float = 1.0, keep_previous_s: float = 30.0
    ) -> None:
        self.name = target.name
        self.target = target
        self.batcher = batcher
        self.weight = weight
        self.keep_previous_s = keep_previous_s
        self.metrics = metrics.for_model(self.name)
        self.live: LoadedVersion | None = None
        self.unloaded: UnloadedVersion | None = None
        """Set while the live version is not in memory; requests for it load it again."""
        self._resident: dict[str, LoadedVersion] = {}
        self._retire_at: dict[str, float] = {}
        self.last_used = 0.0
        """When a request last arrived for it: the residency budget unloads the least recent first."""
        self.running = 0
        """Batches of this model on the executor."""
        self.reported_depth = 0
        """The queue depth last written to its gauge."""
        self.waiting: list[Pending] = []
        """Requests parked while the live version loads again."""
        self.loading = False
        self.leaving = False
        """Its alias was removed (``*`` mode): no new requests; it is dropped once idle."""
        self.refused: dict[str, Any] | None = None
        """The version the registry names that failed to load here, and why (heartbeats carry it, so
        ``/v1/models``, ``tandem models`` and ``tandem up`` show it); ``None`` when none failed."""
        self.pinned: set[str] = set()
        """Versions the traffic policy names besides the live one: never retired while named."""
        self.policy: TrafficPolicy | None = None
        """The traffic policy in force (only variants whose version is resident); heartbeats carry it."""

    # -- versions ------------------------------------------------------------------------------------

    def get(self, version: str | None) -> LoadedVersion | None:
        """The resident version of that number (the live one for ``None``)."""
        if version is None:
            return self.live
        return self._resident.get(str(version))

    @property
    def live_version(self) -> str | None:
        """The version requests go to, loaded or not."""
        if self.live is not None:
            return self.live.version
        return self.unloaded.version if self.unloaded is not None else None

    @property
    def versions(self) -> list[str]:
        """Versions in memory."""
        return list(self._resident)

    @property
    def device(self) -> str | None:
        if self.live is not None:
            return self.live.device
        return self.unloaded.device if self.unloaded is not None else None

    def describe(self, version: str | None) -> dict[str, Any] | None:
        """Spec, example and signature of a version (the live one for ``None``), loaded or not."""
        loaded = self.get(version)
        if loaded is not None:
            return loaded.describe()
        if self.unloaded is not None and version in (None, self.unloaded.version):
            return self.unloaded.description
        return None

    def swap(self, loaded: LoadedVersion, now: float) -> LoadedVersion | None:
        """Make ``loaded`` live; the previous live version is retired after ``keep_previous_s``."""
        previous = self.live
        self._resident[loaded.version] = loaded
        self._retire_at.pop(loaded.version, None)
        self.live = loaded
        self.unloaded = None
        if previous is not None and previous.version != loaded.version:
            if previous.version not in self.pinned:
                self._retire_at[previous.version] = now + self.keep_previous_s
            metrics.MODEL_INFO.labels(self.name, previous.version, previous.device).set(0)
        metrics.MODEL_INFO.labels(self.name, loaded.version, loaded.device).set(1)
        metrics.RESIDENT_BYTES.labels(self.name, loaded.version).set(loaded.size_bytes)
        if seed := getattr(self.batcher, "seed", None):  # the cost model starts from warm-up timings
            seed(loaded.version, loaded.warm_timings)
        return previous

    def add_pinned(self, loaded: LoadedVersion) -> None:
        """Hold ``loaded`` (a canary or shadow version) beside the live one; requests naming it run on it."""
        self._resident[loaded.version] = loaded
        self._retire_at.pop(loaded.version, None)
        self.pinned.add(loaded.version)
        live = self.live is not None and self.live.version == loaded.version
        metrics.MODEL_INFO.labels(self.name, loaded.version, loaded.device).set(1 if live else 0)
        metrics.RESIDENT_BYTES.labels(self.name, loaded.version).set(loaded.size_bytes)
        if seed := getattr(self.batcher, "seed", None):
            seed(loaded.version, loaded.warm_timings)

    def pin(self, versions: set[str], now: float) -> None:
        """The policy names ``versions`` now: those it no longer names retire after ``keep_previous_s``
        (requests already sent to them finish), as a replaced live version does."""
        for v in self.pinned - versions:
            if v in self._resident and (self.live is None or self.live.version != v):
                self._retire_at.setdefault(v, now + self.keep_previous_s)
        self.pinned = {v for v in versions if v in self._resident}
        for v in self.pinned:
            self._retire_at.pop(v, None)

    def retire_due(self, now: float) -> list[LoadedVersion]:
        """Free previous versions whose grace period is over."""
        return [self._free(v) for v, t in list(self._retire_at.items()) if t <= now]

    def retire_all(self) -> list[LoadedVersion]:
        """Free every previous version now (the memory budget needs the room)."""
        return [self._free(v) for v in list(self._retire_at)]

    def unload(self) -> list[LoadedVersion]:
        """Free every version, keeping what loading the live one again needs (pinned versions too: the
        policy watch loads them again at its next poll, and meanwhile their traffic goes to production)."""
        freed = self.retire_all()
        live_version = self.live.version if self.live is not None else None
        freed += [self._free(v) for v in list(self.pinned) if v != live_version and v in self._resident]
        self.pinned.clear()
        live = self.live
        if live is not None:
            self.unloaded = UnloadedVersion(
                live.version,
                live.wire_input,
                live.describe(),
                live.model_dir,
                live.origin,
                live.size_bytes,
                live.load_s,
                live.device,
            )
            self.live = None
            freed.append(self._free(live.version))
        return freed

    def _free(self, version: str) -> LoadedVersion:
        old = self._resident.pop(version)
        self._retire_at.pop(version, None)
        metrics.remove_series(metrics.MODEL_INFO, self.name, version, old.device)
        metrics.remove_series(metrics.RESIDENT_BYTES, self.name, version)
        logger.info("freed %s v%s", self.name, version)
        return old

    @property
    def resident_bytes(self) -> int:
        return sum(v.size_bytes for v in self._resident.values())

    @property
    def retiring_bytes(self) -> int:
        return sum(self._resident[v].size_bytes for v in self._retire_at)

    # -- use -----------------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing queued, running or parked: unloading it now loses nothing."""
        return not (self.batcher.depth or self.running or self.waiting)

    def heartbeat(self, now: float) -> dict[str, Any]:
        return {
            "live": self.live_version,
            "resident": self.versions,
            "loaded": self.live is not None,
            "queue_depth": self.batcher.depth + sum(p.rows for p in self.waiting),
            "est_wait_ms": self.batcher.estimated_wait_s(now) * 1000,
            **({"refused": self.refused} if self.refused else {}),
            **({"policy": self.policy.to_wire()} if self.policy is not None else {}),
        }

    def close(self) -> None:
        """The worker stopped serving this model: free everything and drop its series."""
        for version in list(self._resident):
            self._free(version)
        self.live = None
        self.pinned.clear()
        self.unloaded = None
        if self.refused is not None:
            metrics.remove_series(metrics.REFUSED, self.name, self.refused["version"])
        metrics.forget_model(self.name)
        metrics.forget_policy(self.name)
