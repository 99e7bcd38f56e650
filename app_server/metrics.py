"""App server metrics (DESIGN §7), defined once at module level. Durations in seconds."""

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS

FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)

HTTP_REQUESTS = Counter("tandem_http_requests_total", "HTTP requests by route and status code", ["route", "code"])
REQUEST_DURATION = Histogram(
    "tandem_request_duration_seconds", "HTTP request duration", ["route"], buckets=LATENCY_BUCKETS
)
ENCODE_DURATION = Histogram("tandem_encode_duration_seconds", "Validation and feature encoding", buckets=FAST_BUCKETS)
FEATURE_STORE_DURATION = Histogram(
    "tandem_feature_store_duration_seconds", "Online feature reads (one pipelined round trip)", buckets=FAST_BUCKETS
)
WORKER_RTT = Histogram("tandem_worker_rtt_seconds", "Round trip of one call to a worker", buckets=LATENCY_BUCKETS)
WORKERS_READY = Gauge("tandem_workers_ready", "Workers answering heartbeats")
RETRIES = Counter("tandem_retries_total", "Calls retried on another worker or version", ["reason"])
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
