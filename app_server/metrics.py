"""App server metrics, defined once at module level. Durations in seconds.

Series about one model carry a ``model`` label. Its value is only ever a name the app server already
knows (from a worker's heartbeat or its own settings), never text taken from a URL: a scanner trying
random model names would otherwise create a series per name. Requests for an unknown model, and routes
about no model, are counted under ``model=""``.
"""

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS

FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)

HTTP_REQUESTS = Counter(
    "tandem_http_requests_total", "HTTP requests by route template, status code and model", ["route", "code", "model"]
)
REQUEST_DURATION = Histogram(
    "tandem_request_duration_seconds", "HTTP request duration", ["route", "model"], buckets=LATENCY_BUCKETS
)
ENCODE_DURATION = Histogram(
    "tandem_encode_duration_seconds", "Validation and feature encoding", ["model"], buckets=FAST_BUCKETS
)
FEATURE_STORE_DURATION = Histogram(
    "tandem_feature_store_duration_seconds", "Online feature reads (one pipelined round trip)", buckets=FAST_BUCKETS
)
WORKER_RTT = Histogram(
    "tandem_worker_rtt_seconds", "Round trip of one call to a worker", ["model"], buckets=LATENCY_BUCKETS
)
WORKERS_READY = Gauge("tandem_workers_ready", "Workers answering heartbeats")
MODEL_WORKERS = Gauge(
    "tandem_model_workers", "Live workers serving each model (routable: alive, not draining)", ["model"]
)
RETRIES = Counter("tandem_retries_total", "Calls retried on another worker or version", ["reason", "model"])
CLIENT_DISCONNECTS = Counter("tandem_client_disconnects_total", "Requests whose caller left before the answer")
IN_FLIGHT = Gauge("tandem_in_flight_requests", "Requests this app server is holding")
FEATURE_STORE_LOOKUPS = Counter(
    "tandem_feature_store_lookups_total", "Entities read from the feature store, by whether they were found", ["result"]
)
FEATURE_STORE_ERRORS = Counter(
    "tandem_feature_store_errors_total", "Feature store reads that failed or timed out (answered 503)"
)
PREDICTION_CACHE = Counter(
    "tandem_prediction_cache_total", "Prediction cache lookups per row, by result (hit, miss, error)", ["result"]
)
API_KEY_REQUESTS = Counter(
    "tandem_api_key_requests_total",
    'Requests checked against the API keys, by key name (never the key; "" when none matched) and outcome: '
    "admitted, missing, unknown, rate_limited",
    ["key", "outcome"],
)
API_KEY_RELOADS = Counter(
    "tandem_api_key_reloads_total",
    "Re-reads of the API key file after it changed, by result (ok; error: the last good set stays in force)",
    ["result"],
)

# -- app-tier admission (app_server/admission.py) --
ADMISSION_LIMIT = Gauge("tandem_admission_limit", "The adaptive concurrency limit on predictions in progress")
ADMISSION_IN_FLIGHT = Gauge("tandem_admission_in_flight", "Predictions in progress, as the admission limit counts them")
ADMISSION_REJECTIONS = Counter(
    "tandem_admission_rejections_total",
    "Predictions refused 503 at the door, by reason: limit (concurrency limit), loop_lag (event loop behind)",
    ["reason"],
)
LOOP_LAG = Gauge("tandem_event_loop_lag_seconds", "How late the app server's event loop last ran a timer")

# -- hedged requests (app_server/hedging.py) --
HEDGES = Counter(
    "tandem_hedges_total",
    "Hedged calls by outcome: sent; won (the hedge answered first) or lost (the first worker did); "
    "budget and deadline (a hedge not sent for lack of budget or of time before the deadline)",
    ["model", "outcome"],
)

_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: ``labels()`` validates and locks on every call, and this
    runs several times per request. Bounded like the label values themselves (routes, codes, known
    models)."""
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


# -- traffic policies: variants, safe canary, shadow (app_server/traffic.py, app_server/shadow.py) ------

VARIANT_REQUESTS = Counter(
    "tandem_variant_requests_total",
    "Prediction attempts per variant (production, canary) and outcome (ok, error: a model or worker error, "
    "not bad input). A canary failure retried on production counts here as the canary's error",
    ["model", "variant", "outcome"],
)
VARIANT_DURATION = Histogram(
    "tandem_variant_request_duration_seconds",
    "Prediction time per variant: one attempt on that variant (validation, encoding, the worker call)",
    ["model", "variant"],
    buckets=LATENCY_BUCKETS,
)
CANARY_FALLBACKS = Counter(
    "tandem_canary_fallbacks_total", "Requests that failed on the canary and were answered by production", ["model"]
)
SHADOW_REQUESTS = Counter(
    "tandem_shadow_requests_total",
    "Shadow copies by outcome: agree (every row within --shadow-tolerance of production), differ, error, shed",
    ["model", "outcome"],
)
SHADOW_ABS_DIFF = Histogram(
    "tandem_shadow_abs_diff",
    "Absolute difference between the shadow's and production's prediction, per row",
    ["model"],
    buckets=(1e-6, 1e-5, 1e-4, 1e-3, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)


# -- Model observability: drift against each version's reference profile, and the payload log --------
FEATURE_DRIFT_PSI = Gauge(
    "tandem_feature_drift_psi",
    "Population stability index of a feature's last drift_window values against the version's reference "
    "profile (under 0.1 stable, over 0.25 drifted)",
    ["model", "version", "feature"],
)
PREDICTION_DRIFT_PSI = Gauge(
    "tandem_prediction_drift_psi",
    "Population stability index of the last drift_window predictions against the version's reference profile",
    ["model", "version"],
)
DRIFT_WINDOW_ROWS = Gauge(
    "tandem_drift_window_rows", "Rows in the drift window of a version (PSI is exported from 500)", ["model", "version"]
)
PAYLOAD_LOG_WRITTEN = Counter("tandem_payload_log_written_total", "Payload log records written to the sink")
PAYLOAD_LOG_DROPPED = Counter(
    "tandem_payload_log_dropped_total",
    "Payload log records dropped, never a request: buffer_full (the sink is slower than the sampled traffic) "
    "or sink_error (the sink refused or was unreachable)",
    ["reason"],
)
