"""Typed settings, one object per process.

Every field is also an environment variable ``TANDEM_<FIELD>``; command-line flags override both.
Settings are built explicitly by the entry point (never parsed at import time), so tests can hand a
process exactly the configuration they mean.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.model_targets import ModelOptions, ModelTarget, parse_model_config, parse_models

DEFAULT_HOME = Path(".tandem")


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore", validate_default=True)

    registry_uri: str | None = None
    """MLflow tracking/registry URI. Falls back to ``MLFLOW_TRACKING_URI``, then to ``--home``."""

    home: Path | None = None
    """Folder of a local Tandem registry (``tandem up --home``): sqlite file plus artifact folder."""

    models: str | None = None
    """Models served, as a comma list (``NAME``, ``NAME@ALIAS``, ``NAME@tag:KEY=VALUE``, ``*``; see
    ``shared/model_targets.py``). Workers serve them; app servers wait for each named one in
    ``/readyz``. Unset: the one-model form ``--model``."""

    log_level: str = "INFO"
    """Python logging level name."""

    log_format: Literal["auto", "json", "text"] = "auto"
    """``json`` writes one JSON object per line; ``auto`` picks text on a terminal, JSON otherwise."""

    log_requests: bool = False
    """Log one line per request (request id, model version, timings). Off by default: at thousands of
    requests per second the log would cost more than the request."""

    slow_request_ms: float = Field(250.0, ge=0)
    """Requests slower than this are logged even without ``log_requests``, so a slow request can be
    found by its id in both tiers' logs."""

    # -- secrets from mounted files --
    registry_uri_file: Path | None = None
    """A file holding the registry URI (a mounted Secret, when the URI carries credentials), read at start;
    instead of ``registry_uri``, never with it."""

    @model_validator(mode="after")
    def _registry_uri_from_file(self) -> CommonSettings:
        self.registry_uri = read_secret_file(self.registry_uri_file, self.registry_uri, "registry_uri")
        return self

    def resolved_registry_uri(self) -> str:
        """The registry this process talks to: explicit URI, ``MLFLOW_TRACKING_URI``, else the home."""
        if self.registry_uri:
            return self.registry_uri
        if self.home is None and os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return home_registry_uri(self.home or DEFAULT_HOME)


def read_secret_file(path: Path | None, value: str | None, name: str) -> str | None:
    """``value``, or the content of ``path`` (stripped) when that is set: secrets are mounted as files so
    they stay out of the environment and the process list."""
    if path is None:
        return value
    if value:
        raise ValueError(f"set {name} or {name}_file, not both")
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{name}_file {path}: {exc.strerror}") from None
    if not text:
        raise ValueError(f"{name}_file {path} is empty")
    return text


def home_registry_uri(home: Path) -> str:
    return f"sqlite:///{(Path(home) / 'registry.db').resolve()}"


class WorkerSettings(CommonSettings):
    bind: str = "tcp://0.0.0.0:5555"
    """ZeroMQ endpoint the worker's ROUTER socket binds."""

    model: str = "demo"
    """The one-model form: the registered model served when ``models`` is unset."""

    models_config: str | None = None
    """Per-model knobs (weight, max_batch_size, max_latency_ms, max_queue, target_utilization) as inline
    JSON or a JSON/YAML file: ``{"NAME": {"weight": 2}}``. Unnamed models take the worker-wide values."""

    max_resident_mb: float = Field(0.0, ge=0)
    """Memory budget of loaded versions; past it the least recently used model is unloaded and loaded
    again on its next request. 0: no budget."""

    alias: str | None = "production"
    """Registry alias that names the version to serve (ignored when ``tag`` is set)."""

    tag: str | None = None
    """``KEY=VALUE``: serve the newest version carrying this tag instead of an alias."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` uses CUDA when ONNX Runtime can, else the CPU."""

    max_batch_size: int = Field(64, ge=1)
    """Most rows one model call receives."""

    max_latency_ms: float = Field(10.0, ge=0)
    """Latency window: the most a request waits for company before its batch is dispatched."""

    max_queue: int = Field(1024, ge=1)
    """Admission bound: rows queued beyond this are answered ``overloaded``."""

    batcher: Literal["adaptive", "simple"] = "adaptive"
    """Batching policy; ``simple`` takes whatever is queued, up to ``max_batch_size``."""

    target_utilization: float = Field(0.5, gt=0, le=1)
    """Adaptive batcher: size batches so the model is busy at most this fraction of the time at the
    current arrival rate. Lower waits more for company (cheaper per row); 1 only keeps up. On a CPU
    shared with the I/O loops 0.5 measured best; a GPU worker can go higher."""

    batches_in_flight: int = Field(1, ge=1)
    """Batches executing at once; the next batch forms while these run."""

    poll_interval: float = Field(5.0, gt=0)
    """Seconds between registry polls (with jitter)."""

    keep_previous_s: float = Field(30.0, ge=0)
    """How long a replaced version stays resident for requests already encoded for it."""

    drain_grace_s: float = Field(1.0, ge=0)
    """On SIGTERM, keep refusing new work this long (after finishing held work) before exiting, so app
    servers see the drain in a heartbeat instead of a vanished socket."""

    drain_timeout_s: float = Field(30.0, gt=0)
    """On SIGTERM, the most time spent finishing held work before exiting anyway."""

    metrics_port: int = Field(0, ge=0, le=65535)
    """Port of the worker's HTTP ``/metrics`` and ``/healthz``; 0 disables it."""

    cache_dir: Path | None = None
    """Where downloaded versions are kept (default: ``<home>/cache`` or a temp folder)."""

    debug_delay_ms: float = Field(0.0, ge=0)
    """Testing only: sleep this long before every batch, to make a deliberately slow worker."""

    intra_op_threads: int = Field(0, ge=0)
    """ONNX Runtime intra-op threads; 0 means usable cores minus one on CPU (the I/O loop keeps a core),
    one on CUDA. Set it to the container's CPU limit minus one in a pod."""

    # -- model integrity (shared/integrity.py) --
    require_integrity: bool = False
    """Refuse a version whose files carry no sha256 record from registration (one registered by MLflow
    alone); without it such a version serves, counted as unverified. Recorded files that do not match
    are refused either way."""

    # -- CURVE: who may send this worker work (shared/curve.py, ml_worker/auth.py) ---------------------
    curve_secret_key: Path | None = None
    """This worker's CURVE key pair (the ``.key_secret`` file of ``tandem keys generate``). With
    ``curve_authorized_dir`` the ZeroMQ socket is encrypted and admits only app servers holding an
    authorised key. Set both or neither; neither: a plain socket, for a network nobody else reaches."""

    curve_authorized_dir: Path | None = None
    """Directory of the public keys (``NAME.key``) of the app servers allowed in. Re-read every few
    seconds: adding a file admits its key, removing one drops it, without a restart."""

    # -- fault injection for drills (ml_worker/faults.py) --
    fault_stall_ms: float = Field(0.0, ge=0)
    """Drills and tests only: stall this long before ``fault_stall_percent`` % of batches (0: never)."""

    fault_stall_percent: float = Field(0.0, ge=0, le=100)
    """Share of batches, in percent, that ``fault_stall_ms`` stalls, chosen at random."""

    @field_validator("tag")
    @classmethod
    def _tag_has_value(cls, tag: str | None) -> str | None:
        if tag is not None and "=" not in tag:
            raise ValueError("tag must look like KEY=VALUE")
        return tag

    @model_validator(mode="after")
    def _targets_parse(self) -> WorkerSettings:
        self.targets()  # a bad --models or --models-config fails at start-up, not at the first poll
        self.model_options()
        return self

    @model_validator(mode="after")
    def _curve_complete(self) -> WorkerSettings:
        both_or_neither("curve_secret_key", self.curve_secret_key, "curve_authorized_dir", self.curve_authorized_dir)
        return self

    def targets(self) -> list[ModelTarget]:
        """What this worker serves: ``models``, else the one model ``model``."""
        return parse_models(self.models or self.model, alias=self.alias, tag=self.tag)

    def model_options(self) -> dict[str, ModelOptions]:
        return parse_model_config(self.models_config)


class AppSettings(CommonSettings):
    host: str = "0.0.0.0"
    """Interface uvicorn listens on."""

    default_model: str | None = None
    """The model ``POST /predict`` serves; unset: the only model the workers serve."""

    model: str | None = None
    """Older name of ``default_model`` (the one-model form); ``default_model`` wins when both are set."""

    port: int = Field(8000, ge=0, le=65535)
    """HTTP port."""

    worker_urls: str = "tcp://127.0.0.1:5555"
    """Comma-separated ``tcp://host:port`` list, or ``dns+tcp://name:port`` re-resolved periodically."""

    redis_url: str | None = None
    """Online feature store; unset means requests must carry every feature inline."""

    redis_url_file: Path | None = None
    """A file holding the Redis URL (a mounted Secret, when it carries a password), read at start."""

    @model_validator(mode="after")
    def _redis_url_from_file(self) -> AppSettings:
        self.redis_url = read_secret_file(self.redis_url_file, self.redis_url, "redis_url")
        return self

    feature_timeout_ms: float = Field(50.0, gt=0)
    """Budget of one pipelined Redis round trip for a request's entities."""

    prediction_cache_ttl_s: float = Field(0.0, ge=0)
    """Seconds a prediction stays in the Redis prediction cache; 0 turns the cache off."""

    timeout_ms: float = Field(1000.0, gt=0)
    """Default deadline budget of a request (``X-Timeout-Ms`` overrides it per request)."""

    max_instances: int = Field(256, ge=1)
    """Most instances one ``/predict`` request may carry (413 beyond)."""

    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest accepted request body (413 beyond)."""

    max_in_flight: int = Field(2048, ge=1)
    """Requests this app server holds at once; beyond it answers 503 ``overloaded``."""

    heartbeat_interval: float = Field(0.25, gt=0)
    """Seconds between pings to each worker; a worker silent for 3 intervals leaves the pool."""

    shutdown_timeout_s: float = Field(10.0, gt=0)
    """On SIGTERM, how long uvicorn waits for in-flight requests before closing connections."""

    dns_refresh_s: float = Field(5.0, gt=0)
    """How often a ``dns+tcp://`` worker name is re-resolved."""

    # -- admission at the door, and hedged requests (app_server/admission.py, app_server/hedging.py) --
    admission: bool = True
    """Refuse predictions (503 ``overloaded``) past an adaptive concurrency limit or while the event loop
    lags; off: only ``max_in_flight`` bounds what this server holds."""

    admission_target_ms: float = Field(50.0, gt=0)
    """This server's own time per request (worker waits excluded) above which the limit is cut."""

    admission_initial_limit: int = Field(64, ge=1)
    """The concurrency limit at start; it adapts from there, up to ``max_in_flight``."""

    admission_min_limit: int = Field(16, ge=1)
    """The limit is never cut below this."""

    admission_max_lag_ms: float = Field(250.0, gt=0)
    """Refuse new predictions while the event loop runs timers later than this."""

    hedge_budget: float = Field(0.05, ge=0, le=1)
    """Hedged calls as a share of requests, at most (tokens per request; 0 turns hedging off)."""

    hedge_after_ms: float | None = Field(None, gt=0)
    """Hedge a call unanswered this long; unset: after the model's rolling p95 worker round trip."""

    reuse_port: bool = False
    """Bind the port with ``SO_REUSEPORT`` so several app server processes share it (``tandem up --apps``)."""

    http_loop: Literal["asyncio", "uvloop"] = "asyncio"
    """uvicorn's event loop. asyncio's accepts waiting connections at once, so admission sees (and
    refuses) a flood; under uvloop, past capacity, connections waited unaccepted in the listen queue,
    where nothing can refuse them, until callers timed out (docs/architecture.md)."""

    # -- API keys (app_server/api_keys.py) --
    api_keys_file: Path | None = None
    """JSON lines of hashed API keys (``{"name", "hash": "sha256:...", "rps"}``; ``tandem keys api-key``
    adds one). Set: every route but the probes and ``/metrics`` needs a key, and each key is held to its
    rps on this replica. Re-read when it changes; a bad file stops start-up. Unset: no keys needed."""

    api_keys_protect_metrics: bool = False
    """With ``api_keys_file``: ``/metrics`` needs a key too (off: scrapers reach it without one)."""

    # -- CURVE: encrypted, authenticated connections to workers (shared/curve.py) ---------------------
    curve_secret_key: Path | None = None
    """This app server's CURVE key pair (a ``.key_secret`` file); its public half must be in the
    workers' ``curve_authorized_dir``. Set with ``curve_worker_key``, or neither."""

    curve_worker_key: Path | None = None
    """The workers' public key (their ``.key`` file): a worker holding another key is not talked to."""

    # -- traffic policies: canary, A/B, shadow (app_server/traffic.py, app_server/shadow.py) ------------
    safe_canary: bool = True
    """A request that fails on the canary with a model or worker error (not bad input) is retried once on
    production when its budget allows; the failure still counts against the canary. Off: callers see it."""

    shadow_tolerance: float = Field(1e-3, ge=0)
    """A shadow row agrees with production when their predictions differ by at most this much."""

    shadow_timeout_ms: float = Field(1000.0, gt=0)
    """Budget of one shadow copy (sent after the caller's answer, off its path)."""

    shadow_max_in_flight: int = Field(64, ge=1)
    """Shadow copies this app server holds at once; beyond, a copy is not sent and counts as ``shed``."""

    @model_validator(mode="after")
    def _curve_complete(self) -> AppSettings:
        both_or_neither("curve_secret_key", self.curve_secret_key, "curve_worker_key", self.curve_worker_key)
        return self

    # -- Model observability: drift gauges and the payload log (app_server/observe.py) ------------------
    drift: bool = True
    """Compare each version's live instances and predictions with its reference profile
    (``reference_profile.json``) and export ``tandem_feature_drift_psi``/``tandem_prediction_drift_psi``.
    A version without a profile simply has no drift gauges."""

    drift_window: int = Field(2000, ge=100)
    """Rows per (model, version) the drift gauges are computed over (the most recent ones)."""

    drift_sample: float = Field(1.0, gt=0, le=1)
    """Share of answered requests the drift window takes in (lower it if the drift thread shows in CPU)."""

    drift_interval_s: float = Field(2.0, gt=0)
    """How often the drift thread folds new rows in and updates the gauges."""

    payload_sample: float = Field(0.0, ge=0, le=1)
    """Share of ``/predict`` requests written to the payload log, every instance of a sampled one; 0: none."""

    payload_log: str | None = None
    """Where sampled requests go: ``file:///DIR`` (rotated gzip JSON lines) or ``redis://HOST:PORT/DB?stream=KEY``
    (a capped stream). Unset: no payload log."""

    payload_buffer: int = Field(10_000, ge=1)
    """Records waiting for the sink at most; beyond, new ones are dropped and counted (never a request)."""

    payload_rotate_mb: float = Field(64.0, gt=0)
    """A payload log file is closed and a new one started after this many MB of records (uncompressed)..."""

    payload_rotate_s: float = Field(3600.0, gt=0)
    """... or after this many seconds, whichever comes first."""

    payload_stream_maxlen: int = Field(1_000_000, ge=1)
    """Entries a Redis payload stream is capped at (``XADD MAXLEN ~``: trimmed in whole nodes, about this)."""

    @model_validator(mode="after")
    def _payload_log_url(self) -> AppSettings:
        if self.payload_sample > 0 and not self.payload_log:
            raise ValueError("payload_sample is set but payload_log is not: say where the records go")
        if self.payload_log and not self.payload_log.startswith(("file://", "redis://", "rediss://", "unix://")):
            raise ValueError(
                f"payload_log {self.payload_log!r}: expected file:///DIR or redis://HOST:PORT/DB?stream=KEY"
            )
        return self

    def worker_endpoints(self) -> list[str]:
        return [u.strip() for u in self.worker_urls.split(",") if u.strip()]

    @property
    def default(self) -> str | None:
        """The default model's name, if one is configured."""
        return self.default_model or self.model

    def required_models(self) -> list[str]:
        """Models ``/readyz`` waits for: those named in ``models`` (``*`` names none) and the default."""
        names = [t.name for t in parse_models(self.models) if not t.every] if self.models else []
        if self.default and self.default not in names:
            names.append(self.default)
        return names


def both_or_neither(name_a: str, a: object, name_b: str, b: object) -> None:
    """Half a CURVE configuration is refused: it could only mean a process that cannot talk to its peers,
    or one that was meant to be secured and is not."""
    if (a is None) != (b is None):
        given, missing = (name_a, name_b) if b is None else (name_b, name_a)
        raise ValueError(f"{_flag(given)} is set but {_flag(missing)} is not: CURVE needs both, or neither")


def _flag(field: str) -> str:
    return f"--{field.replace('_', '-')} (TANDEM_{field.upper()})"
