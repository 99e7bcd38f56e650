"""The set of models a worker serves: which they are, how each follows the registry, and loading one
that was unloaded to save memory when a request asks for it.

A model enters the set from ``--models`` (or, for ``*``, when the registry search first finds it with
the alias), gets a :class:`~ml_worker.slots.ModelSlot` and a registry watch of its own, and leaves when
its alias is removed (``*`` only), once its last request is answered. Requests for a model whose live
version was unloaded (``residency.py``) are parked while it loads again if the model's last measured
load time fits their budget, and answered ``model_loading`` (with when to retry) if it does not.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from ml_worker import metrics, replies
from ml_worker.adaptive import AdaptiveBatcher
from ml_worker.batcher import Batcher, Pending, SimpleBatcher
from ml_worker.loader import Loader
from ml_worker.policy_watch import PolicyWatch
from ml_worker.registry_watch import Discovery, ModelWatch
from ml_worker.sharing import ExecutorShare, FairShare
from ml_worker.slots import ModelSlot
from ml_worker.versions import release_memory
from shared.model_targets import NAME_RE, ModelTarget
from shared.protocol import Status
from shared.settings import WorkerSettings

logger = logging.getLogger(__name__)

REFUSED = "cannot finish within the request's budget: queue too long"
LOAD_MARGIN_S = 0.05
"""Added to a model's last measured load time when judging whether a request can wait for a load."""

Send = Callable[[bytes, list[Any]], None]


def make_batcher(settings: WorkerSettings, name: str = "", share: ExecutorShare | None = None) -> Batcher:
    """A model's batcher, with its ``--models-config`` knobs over the worker-wide ones."""
    o = settings.model_options().get(name)
    max_batch = (o.max_batch_size if o else None) or settings.max_batch_size
    max_queue = (o.max_queue if o else None) or settings.max_queue
    if settings.batcher == "adaptive":
        latency_ms = o.max_latency_ms if o and o.max_latency_ms is not None else settings.max_latency_ms
        return AdaptiveBatcher(
            max_batch_size=max_batch,
            max_latency_s=latency_ms / 1000,
            max_queue=max_queue,
            target_utilization=(o.target_utilization if o else None) or settings.target_utilization,
            name=name,
            share=share,
        )
    return SimpleBatcher(max_batch_size=max_batch, max_queue=max_queue)


class ModelSet:
    def __init__(
        self, settings: WorkerSettings, loader: Loader, fair: FairShare, send: Send, pump: Callable[[], None]
    ) -> None:
        self.settings = settings
        self.loader = loader
        self.fair = fair
        self.share = ExecutorShare()
        self.residency = loader.residency
        self.send = send
        self.pump = pump
        self.slots: dict[str, ModelSlot] = {}
        self.targets = settings.targets()
        self._explicit = {t.name for t in self.targets if not t.every}
        every = next((t for t in self.targets if t.every), None)
        self._every_alias = (every.alias or "production") if every else None
        self.discovery = (
            Discovery(loader.uri, self._every_alias, settings.poll_interval, self.sync_every) if every else None
        )
        self._watching = False
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._loads: set[asyncio.Task[None]] = set()
        self._skipped: set[str] = set()

    def __iter__(self) -> Iterator[ModelSlot]:
        return iter(self.slots.values())

    def get(self, model: Any) -> ModelSlot | None:
        """The model a message names, if served; a message without one (an older app) means the only one."""
        if not model and len(self.slots) == 1:
            return next(iter(self.slots.values()))
        slot = self.slots.get(model) if isinstance(model, str) else None
        return None if slot is None or slot.leaving else slot

    # -- membership ----------------------------------------------------------------------------------

    def make_slot(self, target: ModelTarget) -> ModelSlot:
        o = self.settings.model_options().get(target.name)
        batcher = make_batcher(self.settings, target.name, self.share)
        return ModelSlot(target, batcher, weight=o.weight if o else 1.0, keep_previous_s=self.settings.keep_previous_s)

    def add(self, slot: ModelSlot) -> None:
        self.slots[slot.name] = slot
        self.share.join(slot.name, slot.weight, slot.batcher)
        if self._watching:
            self._watch(slot)

    def add_configured(self) -> None:
        """A slot for each model ``--models`` names (``*`` finds its own at the first poll)."""
        for target in self.targets:
            if not target.every and target.name not in self.slots:
                self.add(self.make_slot(target))

    def start_watching(self) -> list[asyncio.Task[Any]]:
        self._watching = True
        for slot in self.slots.values():
            self._watch(slot)
        return [asyncio.create_task(self.discovery.run())] if self.discovery is not None else []

    def _watch(self, slot: ModelSlot) -> None:
        resolve = None
        if self.discovery is not None and slot.name not in self._explicit:
            discovery = self.discovery
            resolve = lambda: discovery.resolve(slot.name)  # noqa: E731 - one search per poll, not one per model
        # A model that follows an alias follows its traffic policy too (a tag-mode model has no aliases to read).
        policy = PolicyWatch(slot, self.loader, self.settings.poll_interval) if slot.target.tag is None else None
        watch = ModelWatch(
            slot, self.loader, self.settings.poll_interval, resolve=resolve, on_swap=self.release_parked, policy=policy
        )
        self._watches[slot.name] = asyncio.create_task(watch.run())

    def sync_every(self, names: set[str]) -> None:
        """``*``: serve the models that have the alias now; those that lost it leave once idle. A name
        Tandem cannot serve (it would be a URL path and a metric label: see ``model_targets.NAME_RE``)
        is skipped with a warning, once."""
        alias = self._every_alias
        for name in sorted(n for n in names if not NAME_RE.fullmatch(n) and n not in self._skipped):
            logger.warning("model %r has @%s but is not served: a name is letters, digits, '.', '_', '-'", name, alias)
            self._skipped.add(name)
        names = {n for n in names if NAME_RE.fullmatch(n)}
        for name in names - self._explicit:
            slot = self.slots.get(name)
            if slot is None:
                logger.info("model %s has @%s: serving it", name, alias)
                self.add(self.make_slot(ModelTarget(name, alias=alias)))
            elif slot.leaving:
                logger.info("model %s has @%s again: keeping it", name, alias)
                slot.leaving = False
        for name, slot in self.slots.items():
            if name not in names and name not in self._explicit and not slot.leaving:
                logger.info("model %s lost @%s: it leaves once its last request is answered", name, alias)
                slot.leaving = True

    def housekeeping(self, now: float) -> None:
        """Free previous versions past their grace, drop models that left, keep the memory budget (a
        busy model may have blocked it at the last load)."""
        freed = sum(len(s.retire_due(now)) for s in self.slots.values())
        for slot in [s for s in self.slots.values() if s.leaving and s.idle]:
            self._drop(slot)
            freed += 1
        if freed:
            release_memory()
        self.loader.settle()

    def _drop(self, slot: ModelSlot) -> None:
        task = self._watches.pop(slot.name, None)
        if task is not None:
            task.cancel()
        if self.discovery is not None:
            self.discovery.forget(slot.name)
        self.share.leave(slot.name)
        self.fair.forget(slot.name)
        del self.slots[slot.name]
        slot.close()
        logger.info("stopped serving %s", slot.name)

    def stop(self) -> None:
        for task in [*self._watches.values(), *self._loads]:
            task.cancel()

    # -- loading again on demand ---------------------------------------------------------------------

    def park(self, slot: ModelSlot, item: Pending, now: float) -> None:
        """A request for a model unloaded to save memory: wait for it to load again if that fits the
        request's budget (by the model's last measured load time), else ``model_loading`` at once."""
        unloaded = slot.unloaded
        assert unloaded is not None
        expected_s = unloaded.load_s * 1.5 + LOAD_MARGIN_S
        if not slot.loading:
            slot.loading = True
            task = asyncio.create_task(self._load_again(slot))
            self._loads.add(task)
            task.add_done_callback(self._loads.discard)
        if now + expected_s > item.deadline:
            self._loading(slot, item, expected_s, f"model {slot.name} is loading (about {expected_s:.1f} s)")
            return
        slot.waiting.append(item)

    async def _load_again(self, slot: ModelSlot) -> None:
        t0 = time.monotonic()
        try:
            loaded = await self.loader.reload(slot)
        except Exception as exc:
            metrics.ON_DEMAND_LOADS.labels(slot.name, "failed").inc()
            logger.error("loading %s again failed (%s); it reloads from the registry", slot.name, exc)
            slot.unloaded = None  # the registry watch downloads and loads it afresh at its next poll
        else:
            if slot.live is None and slot.unloaded is not None and slot.unloaded.version == loaded.version:
                slot.swap(loaded, time.monotonic())
                metrics.ON_DEMAND_LOADS.labels(slot.name, "ok").inc()
                metrics.LOAD_SECONDS.labels(slot.name).observe(time.monotonic() - t0)
                logger.info("loaded %s v%s again in %.2f s", slot.name, loaded.version, time.monotonic() - t0)
            self.loader.settle()
        finally:
            slot.loading = False
            self.release_parked(slot)

    def release_parked(self, slot: ModelSlot) -> None:
        """Parked requests go to the batcher once their version is in memory; a request whose version
        is gone meanwhile gets ``version_unavailable`` (the app re-encodes it)."""
        parked, slot.waiting = slot.waiting, []
        now = time.monotonic()
        for p in parked:
            if slot.get(p.version) is not None:
                if not slot.batcher.offer(p, now):
                    slot.metrics.requests["overloaded"].inc()
                    self.send(p.reply_to, replies.to(p, Status.OVERLOADED, REFUSED))
            elif slot.loading:
                slot.waiting.append(p)
            elif slot.live is None:  # the load failed: the registry watch loads it at its next poll
                self._loading(slot, p, self.settings.poll_interval, f"model {slot.name} could not be loaded again")
            else:  # another version went live meanwhile: the app re-encodes for it
                slot.metrics.requests["version_unavailable"].inc()
                self.send(p.reply_to, replies.version_unavailable(slot, p.msg_id, p.version))
        self.pump()

    def _loading(self, slot: ModelSlot, p: Pending, retry_s: float, why: str) -> None:
        slot.metrics.requests["model_loading"].inc()
        frames = replies.to(p, Status.MODEL_LOADING, f"{why}; retry shortly", retry_after_ms=math.ceil(retry_s * 1000))
        self.send(p.reply_to, frames)
