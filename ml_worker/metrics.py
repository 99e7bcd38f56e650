"""Worker metrics, defined once at module level, every one labelled by ``model``. Durations in seconds.

The hot path does not look children up per request: :func:`for_model` resolves a model's series once,
when the worker starts serving it, and :func:`forget_model` removes them when it stops (a model that
left a ``*`` set must not linger on dashboards). A request the worker cannot tie to a model it serves
(garbage, an unknown name) is counted under ``model=""``: names from the wire never become labels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS

BATCH_SIZE = Histogram(
    "tandem_batch_size",
    "Rows per executed batch",
    ["model"],
    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512),
)
QUEUE_WAIT = Histogram(
    "tandem_queue_wait_seconds", "Time from arrival to batch execution start", ["model"], buckets=LATENCY_BUCKETS
)
INFERENCE = Histogram(
    "tandem_inference_duration_seconds", "Model execution time per batch", ["model"], buckets=LATENCY_BUCKETS
)
QUEUE_DEPTH = Gauge("tandem_queue_depth", "Rows waiting in the model's batcher", ["model"])
REQUESTS = Counter("tandem_worker_requests_total", "Inference requests by outcome", ["model", "outcome"])
MODEL_INFO = Gauge(
    "tandem_model_info", "Model versions resident on this worker (1 = live)", ["model", "version", "device"]
)
SWAPS = Counter("tandem_model_swaps_total", "Model version swaps", ["model", "result"])
REFUSED = Gauge(
    "tandem_model_version_refused",
    "1 while the registry points at a version this worker refused to serve (it failed to load or check)",
    ["model", "version"],
)
LOAD_SECONDS = Histogram(
    "tandem_model_load_seconds",
    "Download, load, warm and check of a version",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
REGISTRY_ERRORS = Counter("tandem_registry_poll_errors_total", "Registry polls that failed")
RESIDENT_BYTES = Gauge(
    "tandem_model_resident_bytes", "Memory a loaded version takes (measured at load)", ["model", "version"]
)
RESIDENT_BUDGET = Gauge("tandem_resident_budget_bytes", "--max-resident-mb in bytes (0: no budget)")
EVICTIONS = Counter("tandem_model_evictions_total", "Versions unloaded to stay within the memory budget", ["model"])
ON_DEMAND_LOADS = Counter(
    "tandem_model_on_demand_loads_total", "Loads of an unloaded model for a request, by result", ["model", "result"]
)

INTEGRITY = Counter(
    "tandem_model_integrity_total",
    "Checks of a version's files against the sha256 recorded at registration, one per load: verified, "
    "unverified (nothing recorded: registered by MLflow alone), mismatch (refused)",
    ["model", "result"],
)
INTEGRITY_RESULTS = ("verified", "unverified", "mismatch")

AUTH_FAILURES_TOTAL = Counter(
    "tandem_worker_auth_failures_total",
    "Turned away by CURVE (--curve-authorized-dir): unauthorized, a key not in the authorised set; handshake, "
    "a client without keys, with the wrong worker key, or not ZeroMQ; revoked, a message on a connection whose "
    "key was removed since",
    ["reason"],
)
AUTH_FAILURES = {reason: AUTH_FAILURES_TOTAL.labels(reason) for reason in ("unauthorized", "handshake", "revoked")}
"""Not by model, nor by key or address: a stranger picks those."""

OUTCOMES = (
    "ok",
    "overloaded",
    "expired",
    "error",
    "cancelled",
    "bad_request",
    "model_not_found",
    "model_loading",
    "version_unavailable",
)

for _outcome in OUTCOMES:
    REQUESTS.labels("", _outcome)


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """One model's series, resolved once."""

    batch_size: Any
    queue_wait: Any
    inference: Any
    queue_depth: Any
    requests: dict[str, Any]


def for_model(name: str) -> ModelMetrics:
    for result in ("ok", "failed"):
        SWAPS.labels(name, result)
    for result in INTEGRITY_RESULTS:
        INTEGRITY.labels(name, result)
    return ModelMetrics(
        BATCH_SIZE.labels(name),
        QUEUE_WAIT.labels(name),
        INFERENCE.labels(name),
        QUEUE_DEPTH.labels(name),
        {outcome: REQUESTS.labels(name, outcome) for outcome in OUTCOMES},
    )


UNKNOWN = for_model("")
"""Requests not tied to a served model."""


def forget_model(name: str) -> None:
    """Remove every series of a model this worker no longer serves."""
    for metric in (BATCH_SIZE, QUEUE_WAIT, INFERENCE, QUEUE_DEPTH, LOAD_SECONDS):
        remove_series(metric, name)
    for outcome in OUTCOMES:
        remove_series(REQUESTS, name, outcome)
    for result in ("ok", "failed"):
        remove_series(SWAPS, name, result)
        remove_series(ON_DEMAND_LOADS, name, result)
    remove_series(EVICTIONS, name)
    for result in INTEGRITY_RESULTS:
        remove_series(INTEGRITY, name, result)


def remove_series(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never created
        metric.remove(*labels)


# -- fault injection (ml_worker/faults.py) --
FAULT_STALLS = Counter(
    "tandem_worker_fault_stalls_total", "Batches stalled on purpose by --fault-stall-ms/--fault-stall-percent (drills)"
)
# -- traffic policies (ml_worker/policy_watch.py, shared/traffic.py) --------------------------------

POLICY_ERRORS = Counter(
    "tandem_policy_errors_total",
    "Traffic policy values ignored, by model and field: a tag with a bad value (tandem.canary.percent, "
    "tandem.shadow.percent, tandem.sticky), or a canary/shadow version that failed to load or check; the "
    "last good value stays in force",
    ["model", "field"],
)
POLICY_PERCENT = Gauge(
    "tandem_policy_percent", "Traffic policy in force: canary and shadow percents", ["model", "variant"]
)
SHADOW_SHED = Counter(
    "tandem_worker_shadow_shed_total",
    "Shadow copies refused at admission (the worker past its target utilisation, or queued work ahead)",
    ["model"],
)


def forget_policy(name: str) -> None:
    for variant in ("canary", "shadow"):
        remove_series(POLICY_PERCENT, name, variant)
        remove_series(POLICY_ERRORS, name, variant)
    for field in ("tandem.canary.percent", "tandem.shadow.percent", "tandem.sticky"):
        remove_series(POLICY_ERRORS, name, field)
    remove_series(SHADOW_SHED, name)
