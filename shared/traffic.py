"""Traffic policies: which variant of a model serves a request, as data and pure functions.

A policy comes from the registry. The aliases of a registered model name its variants' versions
(``production``, required; ``canary``; ``shadow``) and three registered-model tags say how traffic
splits between them:

- ``tandem.canary.percent``: share of callers sent to the canary, 0-100 (default 0);
- ``tandem.shadow.percent``: share of requests also mirrored to the shadow, 0-100 (default 0);
- ``tandem.sticky``: what keeps a caller on one variant: ``entity_id`` (default: the first instance's
  ``entity_id``), ``header:NAME`` (that request header), or ``none`` (random per request).

Workers read it when they poll the registry (:func:`parse_tags` keeps the last good value of a field
whose new value is invalid) and report it in heartbeats (:meth:`TrafficPolicy.to_wire`); app servers
apply it with :func:`choose`, never talking to MLflow. Assignment hashes (model, sticky key) into
10,000 buckets, so the same caller gets the same variant on every app replica and across restarts,
and raising the percent only moves callers from production to the canary, never back.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace
from typing import Any

PRODUCTION, CANARY, SHADOW = "production", "canary", "shadow"
VARIANTS = (PRODUCTION, CANARY, SHADOW)
CANARY_PERCENT = "tandem.canary.percent"
SHADOW_PERCENT = "tandem.shadow.percent"
STICKY = "tandem.sticky"
BUCKETS = 10_000
DEFAULT_STICKY = "entity_id"


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """One model's policy. ``versions`` maps a variant to its version; a variant is absent while its
    alias is unset or its version is not (yet) loaded and checked."""

    versions: dict[str, str] = field(default_factory=dict)
    canary_percent: float = 0.0
    shadow_percent: float = 0.0
    sticky: str = DEFAULT_STICKY

    @property
    def canary(self) -> str | None:
        """The canary's version when it takes traffic (set, and a percent above 0)."""
        v = self.versions.get(CANARY)
        return v if v and self.canary_percent > 0 and v != self.versions.get(PRODUCTION) else None

    @property
    def shadow(self) -> str | None:
        v = self.versions.get(SHADOW)
        return v if v and self.shadow_percent > 0 else None

    def to_wire(self) -> dict[str, Any]:
        return {
            "versions": dict(self.versions),
            "canary_percent": self.canary_percent,
            "shadow_percent": self.shadow_percent,
            "sticky": self.sticky,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> TrafficPolicy | None:
        """A heartbeat's ``policy``; ``None`` for anything malformed (the worker is read as having none)."""
        if not isinstance(raw, dict):
            return None
        versions = raw.get("versions")
        if not isinstance(versions, dict):
            return None
        try:
            canary = float(raw.get("canary_percent") or 0)
            shadow = float(raw.get("shadow_percent") or 0)
        except (TypeError, ValueError):
            return None
        sticky = raw.get("sticky") or DEFAULT_STICKY
        if not (0 <= canary <= 100 and 0 <= shadow <= 100) or sticky_problem(str(sticky)):
            return None
        known = {str(k): str(v) for k, v in versions.items() if k in VARIANTS and v is not None}
        return cls(known, canary, shadow, str(sticky))

    def key(self) -> tuple[Any, ...]:
        """Hashable identity, to count how many workers report the same policy."""
        return (tuple(sorted(self.versions.items())), self.canary_percent, self.shadow_percent, self.sticky)


def percent_problem(text: str) -> str | None:
    """Why ``text`` is not a percent (0-100), or ``None``."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return f"{text!r} is not a number"
    if not 0 <= value <= 100 or value != value:
        return f"{text!r} is outside 0-100"
    return None


def sticky_problem(text: str) -> str | None:
    if text in ("entity_id", "none"):
        return None
    if text.startswith("header:") and text.removeprefix("header:").strip():
        return None
    return f"{text!r} is not entity_id, header:NAME or none"


@dataclass(frozen=True, slots=True)
class TagReading:
    """The policy fields read from a registered model's tags: good values, and why the others were not."""

    canary_percent: float | None
    shadow_percent: float | None
    sticky: str | None
    problems: dict[str, str]
    """Tag name to why its value was ignored."""


def parse_tags(tags: dict[str, str]) -> TagReading:
    """Read the policy tags; a missing tag reads as its default, an invalid one as ``None`` plus a problem
    (the caller keeps that field's last good value)."""
    problems: dict[str, str] = {}
    percents: list[float | None] = []
    for tag in (CANARY_PERCENT, SHADOW_PERCENT):
        text = tags.get(tag)
        if text is None or not str(text).strip():
            percents.append(0.0)
        elif (why := percent_problem(str(text).strip())) is not None:
            problems[tag] = why
            percents.append(None)
        else:
            percents.append(float(str(text).strip()))
    sticky: str | None = str(tags.get(STICKY) or DEFAULT_STICKY).strip()
    if (why := sticky_problem(sticky)) is not None:
        problems[STICKY] = why
        sticky = None
    return TagReading(percents[0], percents[1], sticky, problems)


def merge(last: TrafficPolicy, reading: TagReading, versions: dict[str, str]) -> TrafficPolicy:
    """The new policy: ``versions`` with the reading's good fields, the last policy's for the rest."""
    return replace(
        last,
        versions=dict(versions),
        canary_percent=last.canary_percent if reading.canary_percent is None else reading.canary_percent,
        shadow_percent=last.shadow_percent if reading.shadow_percent is None else reading.shadow_percent,
        sticky=last.sticky if reading.sticky is None else reading.sticky,
    )


def bucket(model: str, key: str) -> int:
    """Where ``key`` falls among :data:`BUCKETS` for ``model``: the same on every replica and process (a
    cryptographic hash, not Python's salted ``hash``)."""
    digest = hashlib.blake2b(f"{model}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def choose(policy: TrafficPolicy | None, model: str, key: str | None, rng: random.Random | None = None) -> str:
    """The variant serving a request: ``canary`` for keys whose bucket falls under the canary percent,
    else ``production``. No key: a random bucket, per request."""
    if policy is None or policy.canary is None:
        return PRODUCTION
    b = bucket(model, key) if key is not None else (rng or random).randrange(BUCKETS)
    return CANARY if b < policy.canary_percent * BUCKETS / 100 else PRODUCTION


def mirrored(policy: TrafficPolicy | None, rng: random.Random | None = None) -> bool:
    """Whether this request also goes to the shadow (random per request: a mirror needs no stickiness)."""
    if policy is None or policy.shadow is None:
        return False
    return (rng or random).random() * 100 < policy.shadow_percent


def sticky_key(policy: TrafficPolicy | None, instances: list[Any], headers: Any = None) -> str | None:
    """The request's sticky key under ``policy``: the first instance's ``entity_id``, a header's value,
    or ``None`` (no key: random per request)."""
    mode = policy.sticky if policy is not None else DEFAULT_STICKY
    if mode == "none":
        return None
    if mode.startswith("header:"):
        value = headers.get(mode.removeprefix("header:").strip()) if headers is not None else None
        return str(value) if value else None
    first = instances[0] if instances else None
    entity = first.get("entity_id") if isinstance(first, dict) else None
    return None if entity is None or entity == "" else str(entity)
