"""Which variant answers a request, and the safe canary.

The model's traffic policy (:func:`app_server.traffic.policy_for`) and the request's sticky key give
its variant (:func:`shared.traffic.choose`); a canary request is pinned to the canary's version, a
production one goes to the live version as always. With ``--safe-canary`` (on by default), a request
that fails on the canary with a model or worker error (5xx, never bad input) is retried once on
production while its deadline allows, so callers do not see a broken canary; the failure still
counts against the canary in ``tandem_variant_requests_total`` (what ``tandem rollout`` guards on)
and in ``tandem_canary_fallbacks_total``. Production answers are mirrored to the shadow version,
when the policy has one, after the caller's answer is ready (:mod:`app_server.shadow`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from app_server import metrics
from app_server.shadow import Shadow
from app_server.traffic import policy_for
from app_server.workers import WorkerPool
from shared.errors import TandemError
from shared.settings import AppSettings
from shared.traffic import CANARY, PRODUCTION, TrafficPolicy, choose, mirrored, sticky_key

logger = logging.getLogger(__name__)

POLICY_TTL_S = 0.05

PredictOn = Callable[[str, list[Any], str, float, str | None], Awaitable[dict[str, Any]]]
"""``(model, instances, request_id, deadline, version)``: the answer of that version (``None``: live)."""


class Variants:
    def __init__(self, settings: AppSettings, pool: WorkerPool, predict_on: PredictOn, shadow: Shadow) -> None:
        self.settings = settings
        self.pool = pool
        self.predict_on = predict_on
        self.shadow = shadow
        self._policies: dict[str, tuple[float, TrafficPolicy | None]] = {}

    def policy(self, model: str, now: float) -> TrafficPolicy | None:
        """The policy in force, worked out at most every ``POLICY_TTL_S`` (heartbeats change it only every
        quarter second or so; per request it would cost a scan of the workers)."""
        cached = self._policies.get(model)
        if cached is not None and now - cached[0] < POLICY_TTL_S:
            return cached[1]
        policy = policy_for(self.pool, model)
        self._policies[model] = (now, policy)
        return policy

    async def predict(
        self, model: str, instances: list[Any], request_id: str, deadline: float, headers: Any = None
    ) -> dict[str, Any]:
        t0 = time.monotonic()
        policy = self.policy(model, t0)
        variant = choose(policy, model, sticky_key(policy, instances, headers))
        if variant == CANARY and policy is not None and policy.canary is not None:
            try:
                answer = await self.predict_on(model, instances, request_id, deadline, policy.canary)
            except TandemError as exc:
                if exc.http_status < 500:
                    raise  # bad input is the caller's, not the canary's
                self._count(model, CANARY, "error", t0)
                if not self.settings.safe_canary or time.monotonic() >= deadline:
                    raise
                metrics.child(metrics.CANARY_FALLBACKS, model).inc()
                logger.warning(
                    "request %s failed on %s canary v%s (%s); answering from production",
                    request_id,
                    model,
                    policy.canary,
                    exc.message,
                    extra={"request_id": request_id, "model": model},
                )
            else:
                self._count(model, CANARY, "ok", t0)
                answer["variant"] = CANARY
                return answer
        t0 = time.monotonic()  # production's own attempt: a canary's failed one is not production's time
        try:
            answer = await self.predict_on(model, instances, request_id, deadline, None)
        except TandemError as exc:
            if exc.http_status >= 500:
                self._count(model, PRODUCTION, "error", t0)
            raise
        self._count(model, PRODUCTION, "ok", t0)
        answer["variant"] = PRODUCTION
        if policy is not None and policy.shadow is not None and mirrored(policy):
            self.shadow.mirror(model, policy.shadow, instances, answer["predictions"], request_id)
        return answer

    @staticmethod
    def _count(model: str, variant: str, outcome: str, t0: float) -> None:
        metrics.child(metrics.VARIANT_REQUESTS, model, variant, outcome).inc()
        if outcome == "ok":
            metrics.child(metrics.VARIANT_DURATION, model, variant).observe(time.monotonic() - t0)
