"""Traffic policies on the app server: the policy in force for a model, from worker heartbeats.

App servers never talk to the registry: each worker reads a model's policy when it polls
(``ml_worker/policy_watch.py``) and carries it in every heartbeat. The policy in force here is the
one most live workers of the model report (workers poll at slightly different moments, so for up to
one poll interval they may disagree; ties go to the policy that sends the least traffic to the
canary, the safe side). A variant takes traffic only while some live worker holds its version: a
canary that no worker could load sends nobody there. Choosing a variant for a request is
:func:`shared.traffic.choose`, a pure function, so every replica assigns a caller alike.
"""

from __future__ import annotations

from collections import Counter

from app_server.workers import WorkerPool
from shared.traffic import CANARY, PRODUCTION, SHADOW, TrafficPolicy


def policy_for(pool: WorkerPool, model: str) -> TrafficPolicy | None:
    """The policy in force for ``model``, or ``None`` when no live worker reports one."""
    conns = [c for c in pool.candidates(model)]
    reported = [m.policy for c in conns if (m := c.models.get(model)) is not None and m.policy is not None]
    if not reported:
        return None
    counts = Counter(p.key() for p in reported)
    by_key = {p.key(): p for p in reported}
    best = max(counts, key=lambda k: (counts[k], -by_key[k].canary_percent))
    policy = by_key[best]
    held = {
        variant: version
        for variant, version in policy.versions.items()
        if variant == PRODUCTION or any(c.holds(model, version) for c in conns)
    }
    if held == policy.versions:
        return policy
    return TrafficPolicy(held, policy.canary_percent, policy.shadow_percent, policy.sticky)


def describe(policy: TrafficPolicy | None) -> dict[str, object] | None:
    """The policy as ``/v1/models`` shows it."""
    if policy is None:
        return None
    return {
        "versions": {v: policy.versions.get(v) for v in (PRODUCTION, CANARY, SHADOW)},
        "canary_percent": policy.canary_percent if policy.canary else 0.0,
        "shadow_percent": policy.shadow_percent if policy.shadow else 0.0,
        "sticky": policy.sticky,
    }
