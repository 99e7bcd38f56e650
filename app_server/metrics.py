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
