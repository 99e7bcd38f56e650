"""Following a model's traffic policy in the registry: its ``canary`` and ``shadow`` versions resident,
its tags read and checked, and the result in the slot for heartbeats to carry.

Runs at every registry poll of a model that follows an alias, right after the production pointer's
own poll (``registry_watch.py``), with one extra registry call (the registered model: its aliases and
tags). A version the ``canary`` or ``shadow`` alias names is loaded, checked and warmed like any
version, then *pinned* beside the live one (``ModelSlot.add_pinned``); a version the policy no longer
names is retired after ``keep_previous_s``, like a replaced live version.

Bad input never changes what serves: a tag with an invalid value (a percent outside 0-100, an
unknown sticky mode) is ignored with one warning per value and ``tandem_policy_errors_total``, and
that field keeps its last good value; a canary or shadow version that fails to load or check is
refused the same way (retried with back-off), and the variant keeps its last good version if it is
still resident, else it is left out of the policy (its traffic stays on production). An unreachable
registry keeps the policy as it was.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ml_worker import metrics
from ml_worker.loader import Loader
from ml_worker.slots import ModelSlot
from shared import registry
from shared.traffic import CANARY, PRODUCTION, SHADOW, TrafficPolicy, merge, parse_tags

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0


class PolicyWatch:
    def __init__(self, slot: ModelSlot, loader: Loader, poll_interval: float) -> None:
        self.slot = slot
        self.loader = loader
        self.poll_interval = poll_interval
        self.last = TrafficPolicy()
        """The last good policy (before dropping variants whose version is not resident)."""
        self._bad: dict[str, str] = {}
        """Tag or variant -> the value last warned about (one warning per bad value, not per poll)."""
        self._failures: dict[str, tuple[int, float]] = {}
        self._refs: dict[str, registry.VersionRef] = {}

    async def poll_once(self) -> TrafficPolicy | None:
        """Read the policy and bring its versions in; returns the policy now in force (``None`` when the
        registry could not be read: nothing changed)."""
        slot = self.slot
        try:
            aliases, tags = await asyncio.to_thread(registry.model_state, self.loader.uri, slot.name)
        except Exception as exc:
            metrics.REGISTRY_ERRORS.inc()
            logger.debug("policy poll of %s failed: %s", slot.name, exc)
            return None
        reading = parse_tags(tags)
        for tag in (*reading.problems, *[t for t in self._bad if t.startswith("tandem.")]):
            self._report(tag, tags.get(tag), reading.problems.get(tag))
        versions: dict[str, str] = {}
        if slot.live_version is not None:
            versions[PRODUCTION] = slot.live_version
        for variant in (CANARY, SHADOW):
            wanted = aliases.get(variant)
            if wanted is None:
                self._report(variant, None, None)
                continue
            got = await self._bring_in(variant, wanted)
            if got is not None:
                versions[variant] = got
        policy = merge(self.last, reading, versions)
        self.last = policy
        slot.pin({v for k, v in versions.items() if k != PRODUCTION}, time.monotonic())
        # Only what is resident is reported: the app sends a variant's traffic only where it can run.
        held = {k: v for k, v in versions.items() if k == PRODUCTION or slot.get(v) is not None}
        in_force = TrafficPolicy(held, policy.canary_percent, policy.shadow_percent, policy.sticky)
        if in_force != slot.policy:
            logger.info(
                "%s traffic policy: %s, canary %g%%, shadow %g%%, sticky %s",
                slot.name,
                ", ".join(f"{k} v{v}" for k, v in held.items()) or "no version",
                policy.canary_percent,
                policy.shadow_percent,
                policy.sticky,
            )
        slot.policy = in_force
        metrics.POLICY_PERCENT.labels(slot.name, CANARY).set(policy.canary_percent if in_force.canary else 0)
        metrics.POLICY_PERCENT.labels(slot.name, SHADOW).set(policy.shadow_percent if in_force.shadow else 0)
        return in_force

    async def _bring_in(self, variant: str, version: str) -> str | None:
        """``version`` resident for ``variant`` (loaded now if need be); on failure the variant's last
        good version if still resident, else ``None``."""
        slot = self.slot
        if version == slot.live_version or slot.get(version) is not None:
            self._report(variant, None, None)
            return version
        fallback = self.last.versions.get(variant)
        fallback = fallback if fallback and slot.get(fallback) is not None else None
        attempts, next_try = self._failures.get(version, (0, 0.0))
        if time.monotonic() < next_try:
            return fallback
        try:
            ref = self._refs.get(version)
            if ref is None:
                ref = self._refs[version] = await asyncio.to_thread(
                    registry.get_version, self.loader.uri, slot.name, version
                )
            loaded = await self.loader.load(slot, ref)
        except Exception as exc:
            attempts += 1
            backoff = min(MAX_BACKOFF_S, self.poll_interval * 2 ** min(attempts, 32))
            self._failures[version] = (attempts, time.monotonic() + backoff)
            metrics.SWAPS.labels(slot.name, "failed").inc()
            why = getattr(exc, "message", None) or f"{exc.__class__.__name__}: {exc}"
            problem = f"v{version} failed to load or check ({why[:500]}); next try in {backoff:.0f} s"
            self._report(variant, version, problem)
            return fallback
        self._failures.pop(version, None)
        slot.add_pinned(loaded)
        self.loader.settle()
        self._report(variant, None, None)
        logger.info("%s v%s loaded as %s (%.0f MB)", slot.name, version, variant, loaded.size_bytes / 2**20)
        return version

    def _report(self, field: str, value: str | None, problem: str | None) -> None:
        """Warn and count once per bad value of ``field``; note when it is good again."""
        if problem is None:
            if self._bad.pop(field, None) is not None:
                logger.info("%s: %s is valid again", self.slot.name, field)
            return
        if self._bad.get(field) == (value or ""):
            return
        self._bad[field] = value or ""
        metrics.POLICY_ERRORS.labels(self.slot.name, field).inc()
        logger.warning("%s: %s ignored: %s; the last good policy stays in force", self.slot.name, field, problem)
