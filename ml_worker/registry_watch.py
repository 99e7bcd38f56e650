"""Registry watcher: follow an alias or tag in MLflow and swap in whatever it names, safely.

Everything slow (registry calls, download, session build, warm-up, checks) runs in a thread; only the
final pointer swap happens on the event loop. A version that fails is never served and is retried with
exponential back-off; an unreachable registry only costs a counted, logged poll error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path

from ml_worker import metrics
from ml_worker.models import LoadedModel, ModelStore, load_version
from shared import registry
from shared.runtime import freeze_long_lived
from shared.settings import WorkerSettings

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0


class RegistryWatcher:
    def __init__(self, settings: WorkerSettings, store: ModelStore, cache_dir: Path) -> None:
        self.settings = settings
        self.store = store
        self.cache_dir = cache_dir
        self.uri = settings.resolved_registry_uri()
        self._failures: dict[str, tuple[int, float]] = {}  # version -> (attempts, next try at)
        self._warned_missing = False
        self.registry_ok = True

    @property
    def target(self) -> str:
        return f"tag {self.settings.tag}" if self.settings.tag else f"alias {self.settings.alias}"

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # a bug here must not stop the watcher, nor (through serve()) the worker
                logger.exception("registry watcher failed; polling again")
            interval = self.settings.poll_interval
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))

    async def poll_once(self) -> LoadedModel | None:
        """One poll; returns the model swapped in, if any."""
        name = self.settings.model
        try:
            ref = await asyncio.to_thread(
                registry.resolve, self.uri, name, alias=self.settings.alias, tag=self.settings.tag
            )
        except Exception as exc:
            metrics.REGISTRY_ERRORS.inc()
            if self.registry_ok:
                logger.warning(
                    "registry poll failed (%s); still serving %s",
                    exc,
                    self.store.live.version if self.store.live else "nothing",
                )
            self.registry_ok = False
            return None
        if not self.registry_ok:
            logger.info("registry reachable again")
        self.registry_ok = True
        if ref is None:
            if not self._warned_missing:
                logger.warning("registry has no version of %s with %s", name, self.target)
                self._warned_missing = True
            return None
        self._warned_missing = False
        live = self.store.live
        if live is not None and live.is_(ref):
            return None
        attempts, next_try = self._failures.get(ref.version, (0, 0.0))
        if time.monotonic() < next_try:
            return None
        resident = self.store.get(ref.version)
        if resident is not None and resident.is_(ref):
            # A rollback inside the grace period: already loaded and checked.
            self._swap(resident, 0.0)
            return resident
        t0 = time.monotonic()
        try:
            model = await asyncio.to_thread(self._load, ref)
        except Exception as exc:
            attempts += 1
            backoff = min(MAX_BACKOFF_S, self.settings.poll_interval * 2 ** min(attempts, 32))
            self._failures[ref.version] = (attempts, time.monotonic() + backoff)
            metrics.SWAPS.labels("failed").inc()
            logger.error(
                "version %s of %s not swapped in (attempt %d, next try in %.0f s): %s",
                ref.version,
                name,
                attempts,
                backoff,
                exc,
            )
            return None
        self._failures.pop(ref.version, None)
        # Loading can take minutes: if the operator moved the alias meanwhile (a rollback of the very
        # version being loaded, say), what was asked for then must not go live now.
        try:
            now_ref = await asyncio.to_thread(
                registry.resolve, self.uri, name, alias=self.settings.alias, tag=self.settings.tag
            )
        except Exception:  # unreachable right now: go with what the registry named when this began
            now_ref = ref
        if now_ref is None or registry.cache_key(now_ref) != registry.cache_key(ref):
            logger.warning(
                "%s moved from v%s to %s while v%s loaded; not swapping it in",
                self.target,
                ref.version,
                f"v{now_ref.version}" if now_ref else "nothing",
                ref.version,
            )
            return None
        self._swap(model, time.monotonic() - t0)
        return model

    def _load(self, ref: registry.VersionRef) -> LoadedModel:
        folder = registry.download(self.uri, ref, self.cache_dir)
        s = self.settings
        model = load_version(
            ref.name,
            ref.version,
            folder,
            device=s.device,
            intra_op_threads=s.intra_op_threads,
            max_batch_size=s.max_batch_size,
        )
        model.origin = registry.cache_key(ref)
        return model

    def _swap(self, model: LoadedModel, load_s: float) -> None:
        previous = self.store.swap(model, time.monotonic())
        freeze_long_lived()  # the new version's objects would otherwise make every full collection slow
        metrics.SWAPS.labels("ok").inc()
        if load_s:
            metrics.LOAD_SECONDS.observe(load_s)
        logger.info(
            "serving %s v%s on %s (was %s; load+warm+check %.2f s)",
            model.name,
            model.version,
            model.device,
            previous.version if previous else "nothing",
            load_s,
        )
