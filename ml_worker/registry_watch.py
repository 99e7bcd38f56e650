"""Following the registry: one watch per model (its alias or tag), and for ``*`` the set of models.

A :class:`ModelWatch` polls what its model's pointer names and swaps it in, safely: everything slow
(registry calls, download, session build, warm-up, checks) runs in a thread through the worker's
:class:`~ml_worker.loader.Loader`; only the final pointer swap happens on the event loop. A version
that fails is never served and is retried with exponential back-off; an unreachable registry only
costs a counted, logged poll error. Each model polls on its own, so one model's slow load or broken
version never holds back another's promotion (loads themselves take turns, see ``loader.py``).

:class:`Discovery` serves ``*``: every registered model that has the alias, read with one search per
poll. A model newly promoted appears at the next poll; one whose alias is removed is told to leave
(the server drops it once its last request is answered).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from ml_worker import metrics
from ml_worker.loader import Loader
from ml_worker.policy_watch import PolicyWatch
from ml_worker.slots import ModelSlot
from ml_worker.versions import LoadedVersion
from shared import registry
from shared.runtime import freeze_long_lived

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0

Resolve = Callable[[], registry.VersionRef | None]
"""Blocking: what the model's pointer names now (run in a thread)."""


async def jittered_sleep(interval: float) -> None:
    await asyncio.sleep(interval * random.uniform(0.8, 1.2))


class ModelWatch:
    def __init__(
        self,
        slot: ModelSlot,
        loader: Loader,
        poll_interval: float,
        *,
        resolve: Resolve | None = None,
        on_swap: Callable[[ModelSlot], None] = lambda slot: None,
        policy: PolicyWatch | None = None,
    ) -> None:
        self.slot = slot
        self.loader = loader
        self.poll_interval = poll_interval
        t = slot.target
        self.resolve = resolve or (lambda: registry.resolve(loader.uri, slot.name, alias=t.alias, tag=t.tag))
        self.on_swap = on_swap
        self.policy = policy
        """The model's traffic policy (canary and shadow versions), followed at the same polls."""
        self._failures: dict[str, tuple[int, float]] = {}  # version -> (attempts, next try at)
        self._warned_missing = False
        self.registry_ok = True

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
                if self.policy is not None:
                    await self.policy.poll_once()
            except Exception:  # a bug here must not stop the watch, nor (through serve()) the worker
                logger.exception("registry watch of %s failed; polling again", self.slot.name)
            await jittered_sleep(self.poll_interval)

    async def poll_once(self) -> LoadedVersion | None:
        """One poll; returns the version swapped in, if any."""
        slot = self.slot
        try:
            ref = await asyncio.to_thread(self.resolve)
        except Exception as exc:
            metrics.REGISTRY_ERRORS.inc()
            if self.registry_ok:
                logger.warning("registry poll failed (%s); %s still serves %s", exc, slot.name, slot.live_version)
            self.registry_ok = False
            return None
        if not self.registry_ok:
            logger.info("registry reachable again")
        self.registry_ok = True
        if ref is None:
            if not self._warned_missing:
                logger.warning("registry has no version of %s for %s", slot.name, slot.target.pointer)
                self._warned_missing = True
            return None
        self._warned_missing = False
        if self._is_live(ref):
            self._clear_refusal()  # the pointer went back to what serves: nothing is refused any more
            return None
        attempts, next_try = self._failures.get(ref.version, (0, 0.0))
        if time.monotonic() < next_try:
            return None
        resident = slot.get(ref.version)
        if resident is not None and resident.is_(ref):
            # A rollback inside the grace period: already loaded and checked.
            self._swap(resident, 0.0)
            return resident
        t0 = time.monotonic()
        try:
            loaded = await self.loader.load(slot, ref)
        except Exception as exc:
            attempts += 1
            backoff = min(MAX_BACKOFF_S, self.poll_interval * 2 ** min(attempts, 32))
            self._failures[ref.version] = (attempts, time.monotonic() + backoff)
            metrics.SWAPS.labels(slot.name, "failed").inc()
            self._refuse(ref.version, exc, attempts, backoff)
            logger.error(
                "version %s of %s not swapped in (attempt %d, next try in %.0f s): %s",
                ref.version,
                slot.name,
                attempts,
                backoff,
                exc,
            )
            return None
        self._failures.pop(ref.version, None)
        self._clear_refusal()
        # Loading can take minutes: if the operator moved the pointer meanwhile (a rollback of the very
        # version being loaded, say), what was asked for then must not go live now.
        try:
            now_ref = await asyncio.to_thread(self.resolve)
        except Exception:  # unreachable right now: go with what the registry named when this began
            now_ref = ref
        if now_ref is None or registry.cache_key(now_ref) != registry.cache_key(ref):
            logger.warning(
                "%s %s moved from v%s to %s while v%s loaded; not swapping it in",
                slot.name,
                slot.target.pointer,
                ref.version,
                f"v{now_ref.version}" if now_ref else "nothing",
                ref.version,
            )
            return None
        self._swap(loaded, time.monotonic() - t0)
        return loaded

    def _refuse(self, version: str, exc: Exception, attempts: int, backoff: float) -> None:
        slot = self.slot
        if slot.refused is not None and slot.refused["version"] != version:
            metrics.remove_series(metrics.REFUSED, slot.name, slot.refused["version"])
        message = getattr(exc, "message", None) or f"{exc.__class__.__name__}: {exc}"
        slot.refused = {"version": version, "error": message[:2000], "attempts": attempts, "retry_in_s": backoff}
        metrics.REFUSED.labels(slot.name, version).set(1)

    def _clear_refusal(self) -> None:
        slot = self.slot
        if slot.refused is not None:
            metrics.remove_series(metrics.REFUSED, slot.name, slot.refused["version"])
            slot.refused = None

    def _is_live(self, ref: registry.VersionRef) -> bool:
        """Whether ``ref`` already serves here, in memory or unloaded to save it."""
        slot = self.slot
        if slot.live is not None:
            return slot.live.is_(ref)
        u = slot.unloaded
        return u is not None and u.version == ref.version and (not u.origin or u.origin == registry.cache_key(ref))

    def _swap(self, loaded: LoadedVersion, load_s: float) -> None:
        slot = self.slot
        previous = slot.swap(loaded, time.monotonic())
        freeze_long_lived()  # the new version's objects would otherwise make every full collection slow
        metrics.SWAPS.labels(slot.name, "ok").inc()
        if load_s:
            metrics.LOAD_SECONDS.labels(slot.name).observe(load_s)
        logger.info(
            "serving %s v%s on %s (was %s; load+warm+check %.2f s, %.0f MB)",
            slot.name,
            loaded.version,
            loaded.device,
            previous.version if previous else "nothing",
            load_s,
            loaded.size_bytes / 2**20,
        )
        self.loader.settle()
        self.on_swap(slot)


class Discovery:
    """Which registered models have the alias (``*``), and what version each names."""

    def __init__(self, uri: str, alias: str, poll_interval: float, on_change: Callable[[set[str]], None]) -> None:
        self.uri = uri
        self.alias = alias
        self.poll_interval = poll_interval
        self.on_change = on_change
        self.versions: dict[str, str] = {}
        self._refs: dict[str, registry.VersionRef] = {}
        self.registry_ok = True

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await jittered_sleep(self.poll_interval)

    async def poll_once(self) -> set[str] | None:
        try:
            self.versions = await asyncio.to_thread(registry.models_with_alias, self.uri, self.alias)
        except Exception as exc:
            metrics.REGISTRY_ERRORS.inc()
            if self.registry_ok:
                logger.warning("registry search for models @%s failed (%s); serving the set as it was", self.alias, exc)
            self.registry_ok = False
            return None
        self.registry_ok = True
        names = set(self.versions)
        self.on_change(names)
        return names

    def resolve(self, name: str) -> registry.VersionRef | None:
        """What the alias names for ``name`` as of the last search (blocking: may ask the registry for the
        version's details, once per version number)."""
        version = self.versions.get(name)
        if version is None:
            return None
        ref = self._refs.get(name)
        if ref is None or ref.version != version:
            ref = self._refs[name] = registry.get_version(self.uri, name, version)
        return ref

    def forget(self, name: str) -> None:
        self._refs.pop(name, None)
