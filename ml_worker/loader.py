"""Loading versions: one at a time, off the event loop, after making room in the memory budget.

Every load goes through here, whether a promotion (the registry watch) or a model unloaded to save
memory and asked for again (the server). One at a time, because two loads at once would measure each
other's memory and could both pass the budget check before either had grown the process.

Every load first checks the version's files against the sha256 manifest recorded at registration
(``shared/integrity.py``), whether they were just downloaded or come from the cache: a cached copy can
be changed as well as the store's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ml_worker import metrics
from ml_worker.mlflow_runner import warm_mlflow
from ml_worker.residency import Residency
from ml_worker.runners import warm_runtime
from ml_worker.slots import ModelSlot
from ml_worker.versions import LoadedVersion, files_bytes, load_version
from shared import integrity, registry
from shared.errors import IntegrityError
from shared.logs import redact_url
from shared.settings import WorkerSettings

logger = logging.getLogger(__name__)


class Loader:
    def __init__(
        self,
        settings: WorkerSettings,
        cache_dir: Path,
        residency: Residency | None = None,
        slots: Callable[[], Iterable[ModelSlot]] = tuple,
    ) -> None:
        self.settings = settings
        self.uri = settings.resolved_registry_uri()
        self.cache_dir = cache_dir
        self.residency = residency or Residency(0)
        self._slots = slots
        self._lock = asyncio.Lock()
        self._runtime_warm = False
        self._mlflow_warm = False
        self._recorded: dict[str, str | None] = {}
        """Each folder loaded from, with the manifest digest its version's tag recorded: what loading
        it again is checked against."""
        logger.info("following the registry at %s", redact_url(self.uri))

    async def load(self, slot: ModelSlot, ref: registry.VersionRef) -> LoadedVersion:
        """Download (cached), check and load a registry version for ``slot``; raises what the load raised."""
        folder = await asyncio.to_thread(registry.download, self.uri, ref, self.cache_dir)
        recorded = self._recorded[str(folder)] = ref.tags.get(integrity.TAG)
        await self.verify(slot.name, ref.version, folder, recorded)
        loaded = await self._load(slot, ref.version, folder)
        loaded.origin = registry.cache_key(ref)
        return loaded

    async def reload(self, slot: ModelSlot) -> LoadedVersion:
        """Load the live version of a slot that was unloaded, from the folder it came from."""
        unloaded = slot.unloaded
        if unloaded is None:
            raise RuntimeError(f"{slot.name} has no unloaded version to load")
        recorded = self._recorded.get(str(unloaded.model_dir))
        await self.verify(slot.name, unloaded.version, unloaded.model_dir, recorded)
        loaded = await self._load(slot, unloaded.version, unloaded.model_dir, unloaded.size_bytes)
        loaded.origin = unloaded.origin
        return loaded

    async def verify(self, name: str, version: str, folder: Path, recorded: str | None) -> None:
        """Check the files against what was recorded at registration (in a thread: it reads every byte);
        raises :class:`IntegrityError` for files not as registered, and for a version with nothing
        recorded when the worker requires integrity. Counted either way."""
        t0 = time.perf_counter()
        try:
            verified = await asyncio.to_thread(integrity.verify, folder, recorded)
        except IntegrityError:
            metrics.INTEGRITY.labels(name, "mismatch").inc()
            raise
        ms = (time.perf_counter() - t0) * 1000
        metrics.INTEGRITY.labels(name, "verified" if verified else "unverified").inc()
        if verified:
            logger.info("%s v%s: every file as registered (checked in %.0f ms)", name, version, ms)
        elif self.settings.require_integrity:
            raise IntegrityError(
                f"no {integrity.TAG} tag (registered by MLflow alone?) and this worker requires integrity: "
                f"`tandem register models:/{name}/{version} --name {name}` registers its files with their hashes"
            )
        else:
            logger.warning(
                "%s v%s is unverified: no %s tag recorded its files at registration", name, version, integrity.TAG
            )

    async def _load(self, slot: ModelSlot, version: str, folder: Path, known_size: int = 0) -> LoadedVersion:
        async with self._lock:
            if not self._runtime_warm:
                s = self.settings
                try:
                    await asyncio.to_thread(warm_runtime, s.device, s.intra_op_threads)
                except Exception:  # a runtime that cannot run this cannot run the model either: it says why
                    logger.warning("warming ONNX Runtime up failed", exc_info=True)
                self._runtime_warm = True
            if not self._mlflow_warm and not registry.model_files(folder)["feature_spec"].exists():
                await asyncio.to_thread(warm_mlflow)  # its imports are the process's, not this model's
                self._mlflow_warm = True
            last = slot.live.size_bytes if slot.live is not None else 0
            need = max(known_size, last, await asyncio.to_thread(files_bytes, folder))
            self.residency.make_room(self._slots(), need, keep=slot)
            s = self.settings
            max_batch = getattr(slot.batcher, "max_batch_size", s.max_batch_size)  # warm what it will see
            return await asyncio.to_thread(
                load_version,
                slot.name,
                version,
                folder,
                device=s.device,
                intra_op_threads=s.intra_op_threads,
                max_batch_size=max_batch,
            )

    def settle(self) -> None:
        """Enforce the budget now (after a load, and periodically: a busy model may have blocked it)."""
        if not self._lock.locked():
            self.residency.make_room(self._slots())
