"""Worker metrics (DESIGN §7), defined once at module level. Durations in seconds."""

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS

BATCH_SIZE = Histogram(
    "tandem_batch_size", "Rows per executed batch", buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)
)
QUEUE_WAIT = Histogram(
    "tandem_queue_wait_seconds", "Time from arrival to batch execution start", buckets=LATENCY_BUCKETS
)
INFERENCE = Histogram("tandem_inference_duration_seconds", "Model execution time per batch", buckets=LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge("tandem_queue_depth", "Rows waiting in the batcher")
REQUESTS = Counter("tandem_worker_requests_total", "Inference requests by outcome", ["outcome"])
MODEL_INFO = Gauge(
    "tandem_model_info", "Model versions resident on this worker (1 = live)", ["model", "version", "device"]
)
SWAPS = Counter("tandem_model_swaps_total", "Model version swaps", ["result"])
LOAD_SECONDS = Histogram(
    "tandem_model_load_seconds",
    "Download, load, warm and check of a version",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
REGISTRY_ERRORS = Counter("tandem_registry_poll_errors_total", "Registry polls that failed")

for _outcome in ("ok", "overloaded", "expired", "error", "cancelled", "bad_request"):
    REQUESTS.labels(_outcome)
for _result in ("ok", "failed"):
    SWAPS.labels(_result)
