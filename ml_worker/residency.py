"""Keeping loaded versions within ``--max-resident-mb``: which to unload, least recently used first.

Sizes are measured, not guessed: each version records how much the process's resident memory grew
while it loaded and warmed (at least its files' size; ``versions.load_version``). Before a load the
room it needs is estimated from the last measured size of that model (or its files), and made by
unloading, in this order:

1. previous versions kept for stragglers (requests encoded for them are re-encoded by the app for the
   live version, invisibly to callers), least recently used model first;
2. whole idle models (nothing queued, running or parked), least recently used first. An unloaded
   model keeps its description and files: its next request loads it again (``server``).

A model that is busy is never unloaded from under its requests, so the budget can be exceeded for as
long as every other model is busy; it is enforced again after each load and every second. A model
larger than the whole budget is still served, alone, with a warning: refusing it would serve nothing.
See docs/architecture.md, "Memory".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ml_worker import metrics
from ml_worker.slots import ModelSlot
from ml_worker.versions import LoadedVersion, release_memory

logger = logging.getLogger(__name__)

MB = 1024 * 1024


class Residency:
    def __init__(self, budget_mb: float) -> None:
        self.budget = int(budget_mb * MB)
        """Bytes; 0 means no budget."""
        metrics.RESIDENT_BUDGET.set(self.budget)
        self._warned = False

    @staticmethod
    def total(slots: Iterable[ModelSlot]) -> int:
        return sum(s.resident_bytes for s in slots)

    def make_room(self, slots: Iterable[ModelSlot], need: int = 0, keep: ModelSlot | None = None) -> int:
        """Unload until ``need`` more bytes fit. ``keep`` (the model about to load; by default the most
        recently used one) is never a victim.

        Returns the bytes still over budget afterwards (0 when it fits).
        """
        if not self.budget:
            return 0
        slots = list(slots)
        over = self.total(slots) + need - self.budget
        if over <= 0:
            return 0
        freed = 0
        if keep is None:  # the most recently used model stays: one model is always served from memory
            keep = max((s for s in slots if s.live is not None), key=lambda s: s.last_used, default=None)
        by_age = sorted((s for s in slots if s is not keep), key=lambda s: s.last_used)
        if keep is not None:
            by_age.append(keep)  # its own previous versions may go too, last
        for slot in by_age:
            if over > 0 and slot.retiring_bytes:
                freed += _bytes(slot.retire_all())
                over = self.total(slots) + need - self.budget
        for slot in by_age:
            if over <= 0:
                break
            if slot is keep or slot.live is None or not slot.idle:
                continue
            version = slot.live_version
            size = _bytes(slot.unload())
            freed += size
            over -= size
            metrics.EVICTIONS.labels(slot.name).inc()
            logger.info(
                "unloaded %s v%s (%.0f MB) to stay within --max-resident-mb %.0f",
                slot.name,
                version,
                size / MB,
                self.budget / MB,
            )
        if freed:
            release_memory()
        if over > 0 and not self._warned:
            self._warned = True
            logger.warning(
                "resident versions need %.1f MB over --max-resident-mb %.1f (every other model is busy, or "
                "one model alone is larger); unloading again once one is idle",
                over / MB,
                self.budget / MB,
            )
        self._warned = over > 0
        return max(over, 0)


def _bytes(versions: list[LoadedVersion]) -> int:
    return sum(v.size_bytes for v in versions)
