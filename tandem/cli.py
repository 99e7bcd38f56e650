"""The ``tandem`` command line. Flags override ``TANDEM_*`` environment variables."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from shared import logs
from shared.settings import DEFAULT_HOME, AppSettings, CommonSettings, WorkerSettings
from tandem import tail_options as tail
from tandem.drift_cli import app as drift_app
from tandem.features_cli import app as features_app
from tandem.keys_cli import app as keys_app
from tandem.models_cmd import models
from tandem.options import (
    CurveSecretKey,
    Drift,
    Home,
    LogLevel,
    Model,
    Models,
    PayloadLogUrl,
    PayloadSample,
    RegistryUri,
    build,
    registry_uri_for_write,
)
from tandem.registry_cmds import demo_model, promote, register
from tandem.rollout import rollout
from tandem.spec_cli import app as spec_app
from tandem.traffic_cmd import traffic

app = typer.Typer(
    help="Tandem model serving: stateless app servers, batching GPU workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(features_app, name="features")
app.add_typer(spec_app, name="spec")
app.add_typer(keys_app, name="keys")
app.add_typer(drift_app, name="drift")


@app.command()
def worker(
    bind: Annotated[str | None, typer.Option(help="ZeroMQ endpoint to bind.")] = None,
    model: Model = None,
    models: Models = None,
    models_config: Annotated[
        str | None, typer.Option(help='Per-model knobs: JSON or a JSON/YAML file, {"NAME": {"weight": 2}}.')
    ] = None,
    max_resident_mb: Annotated[
        float | None, typer.Option(help="Memory budget of loaded versions; least recently used unload. 0: none.")
    ] = None,
    alias: Annotated[str | None, typer.Option(help="Alias naming the version to serve.")] = None,
    tag: Annotated[str | None, typer.Option(help="KEY=VALUE: serve the newest version with this tag.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    max_batch_size: Annotated[int | None, typer.Option()] = None,
    max_latency_ms: Annotated[float | None, typer.Option()] = None,
    max_queue: Annotated[int | None, typer.Option()] = None,
    batcher: Annotated[str | None, typer.Option(help="adaptive or simple.")] = None,
    batches_in_flight: Annotated[int | None, typer.Option()] = None,
    target_utilization: Annotated[float | None, typer.Option(help="Adaptive batcher's executor busy target.")] = None,
    poll_interval: Annotated[float | None, typer.Option(help="Seconds between registry polls.")] = None,
    keep_previous_s: Annotated[float | None, typer.Option()] = None,
    metrics_port: Annotated[int | None, typer.Option(help="HTTP /metrics and probes; 0 = off.")] = None,
    cache_dir: Annotated[Path | None, typer.Option()] = None,
    intra_op_threads: Annotated[int | None, typer.Option()] = None,
    drain_grace_s: Annotated[float | None, typer.Option(help="On SIGTERM, refuse new work this long.")] = None,
    drain_timeout_s: Annotated[float | None, typer.Option(help="On SIGTERM, most time to finish work.")] = None,
    debug_delay_ms: Annotated[float | None, typer.Option(hidden=True, help="Testing: slow every batch.")] = None,
    fault_stall_ms: tail.FaultStallMs = None,
    fault_stall_percent: tail.FaultStallPercent = None,
    curve_secret_key: CurveSecretKey = None,
    curve_authorized_dir: Annotated[
        Path | None, typer.Option(help="CURVE: public keys (NAME.key) of the app servers let in; re-read on change.")
    ] = None,
    log_requests: Annotated[bool | None, typer.Option("--log-requests", help="Log every request.")] = None,
    slow_request_ms: Annotated[float | None, typer.Option(help="Log requests slower than this.")] = None,
    registry_uri: RegistryUri = None,
    home: Home = None,
    log_level: LogLevel = None,
    # -- integrity and secrets (shared/integrity.py, shared/logs.py) --
    require_integrity: Annotated[
        bool | None,
        typer.Option("--require-integrity", help="Refuse versions without sha256 records from registration."),
    ] = None,
    registry_uri_file: Annotated[
        Path | None, typer.Option(help="File holding the registry URI (a mounted Secret), instead of --registry-uri.")
    ] = None,
) -> None:
    """Run one worker: ZeroMQ server, a batcher and registry watch per model, the shared executor."""
    settings = build_or_exit(WorkerSettings, **locals())
    logs.configure(settings.log_level, settings.log_format, "worker", secret_urls=[settings.resolved_registry_uri()])
    from ml_worker.runners import pin_openmp_threads

    pin_openmp_threads(settings.intra_op_threads)
    from ml_worker.server import run_worker
    from shared.runtime import run_loop

    with config_errors():
        run_loop(run_worker(settings))


@app.command("app")
def app_server(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    worker_urls: Annotated[str | None, typer.Option(help="tcp://h:p,... or dns+tcp://name:port")] = None,
    redis_url: Annotated[str | None, typer.Option()] = None,
    feature_timeout_ms: Annotated[float | None, typer.Option(help="Budget of one Redis read of features.")] = None,
    prediction_cache_ttl_s: Annotated[float | None, typer.Option(help="Prediction cache TTL; 0 = off.")] = None,
    default_model: Annotated[
        str | None, typer.Option(help="Model POST /predict serves (default: the only model the workers serve).")
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(help="Models /readyz waits for, in the workers' syntax (NAME,NAME@ALIAS,...); * names none."),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Older name of --default-model.")] = None,
    timeout_ms: Annotated[float | None, typer.Option(help="Default request deadline.")] = None,
    max_instances: Annotated[int | None, typer.Option()] = None,
    max_in_flight: Annotated[int | None, typer.Option()] = None,
    admission: tail.Admission = None,
    admission_max_lag_ms: tail.AdmissionMaxLagMs = None,
    hedge_after_ms: tail.HedgeAfterMs = None,
    hedge_budget: tail.HedgeBudget = None,
    reuse_port: tail.ReusePort = None,
    heartbeat_interval: Annotated[float | None, typer.Option()] = None,
    log_requests: Annotated[bool | None, typer.Option("--log-requests", help="Log every request.")] = None,
    slow_request_ms: Annotated[float | None, typer.Option(help="Log requests slower than this.")] = None,
    api_keys_file: Annotated[
        Path | None, typer.Option(help="Hashed API keys (JSON lines); set: every route but probes needs a key.")
    ] = None,
    api_keys_protect_metrics: Annotated[
        bool | None, typer.Option("--api-keys-protect-metrics", help="With --api-keys-file: /metrics needs a key too.")
    ] = None,
    curve_secret_key: CurveSecretKey = None,
    curve_worker_key: Annotated[Path | None, typer.Option(help="CURVE: the workers' public key (a .key file).")] = None,
    log_level: LogLevel = None,
    redis_url_file: Annotated[
        Path | None, typer.Option(help="File holding the Redis URL (a mounted Secret), instead of --redis-url.")
    ] = None,
    safe_canary: Annotated[
        bool | None, typer.Option("--safe-canary/--no-safe-canary", help="Retry canary failures on production.")
    ] = None,
    shadow_tolerance: Annotated[float | None, typer.Option(help="Shadow rows within this agree.")] = None,
    drift: Drift = None,
    payload_sample: PayloadSample = None,
    payload_log: PayloadLogUrl = None,
) -> None:
    """Run one app server (uvicorn); it serves every model its workers serve, routing by name."""
    settings = build_or_exit(AppSettings, **locals())
    from app_server.api_keys import ApiKeyFileError
    from app_server.app import serve
    from tandem.app_run import run_uvicorn

    logs.configure(settings.log_level, settings.log_format, "app", secret_urls=[settings.redis_url])
    try:
        with config_errors():
            application = serve(settings)
    except ApiKeyFileError as exc:  # never an open server by accident: no usable keys, no server
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    run_uvicorn(application, settings)


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """A setting or a file it names is wrong (an unreadable key file, say): one line, exit status 2."""
    from shared.errors import ConfigError

    try:
        yield
    except ConfigError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None


def build_or_exit(cls: type[CommonSettings], **flags: Any) -> Any:
    """:func:`build` for a server command: settings that do not validate are one line each, exit status 2."""
    from pydantic import ValidationError

    try:
        return build(cls, **flags)
    except ValidationError as exc:
        for e in exc.errors():
            where = ".".join(map(str, e["loc"]))
            typer.echo(f"error: {where + ': ' if where else ''}{e['msg'].removeprefix('Value error, ')}", err=True)
        raise typer.Exit(2) from None


WORKER_ONLY = (
    "poll_interval",
    "max_batch_size",
    "max_latency_ms",
    "max_queue",
    "batcher",
    "batches_in_flight",
    "target_utilization",
    "device",
    "alias",
    "tag",
    "keep_previous_s",
    "intra_op_threads",
    "drain_grace_s",
    "drain_timeout_s",
    "models_config",
    "max_resident_mb",
    "require_integrity",
)
APP_ONLY = (
    "redis_url",
    "timeout_ms",
    "max_instances",
    "max_in_flight",
    "feature_timeout_ms",
    "prediction_cache_ttl_s",
    "heartbeat_interval",
    "default_model",
    "payload_sample",
    "payload_log",
)


@app.command()
def up(
    home: Annotated[Path | None, typer.Option(help="Registry, artifacts and cache (default ./.tandem).")] = None,
    port: Annotated[int, typer.Option(help="App server HTTP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 2,
    apps: tail.Apps = 1,
    models: Annotated[
        str | None,
        typer.Option(help="Models every worker serves (default *: every model with the alias; see `tandem worker`)."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="One-model form of --models.")] = None,
    registry_uri: RegistryUri = None,
    poll_interval: Annotated[float | None, typer.Option()] = None,
    max_batch_size: Annotated[int | None, typer.Option()] = None,
    max_latency_ms: Annotated[float | None, typer.Option()] = None,
    max_queue: Annotated[int | None, typer.Option()] = None,
    batcher: Annotated[str | None, typer.Option()] = None,
    batches_in_flight: Annotated[int | None, typer.Option()] = None,
    target_utilization: Annotated[float | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option()] = None,
    alias: Annotated[str | None, typer.Option()] = None,
    tag: Annotated[str | None, typer.Option()] = None,
    keep_previous_s: Annotated[float | None, typer.Option()] = None,
    intra_op_threads: Annotated[int | None, typer.Option()] = None,
    drain_grace_s: Annotated[float | None, typer.Option()] = None,
    drain_timeout_s: Annotated[float | None, typer.Option()] = None,
    models_config: Annotated[str | None, typer.Option(help="Per-model knobs for the workers.")] = None,
    max_resident_mb: Annotated[float | None, typer.Option(help="Each worker's memory budget for models.")] = None,
    default_model: Annotated[str | None, typer.Option(help="What POST /predict serves (default: the first).")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Online feature store for the app server.")] = None,
    timeout_ms: Annotated[float | None, typer.Option(help="App server: default request deadline.")] = None,
    max_instances: Annotated[int | None, typer.Option()] = None,
    max_in_flight: Annotated[int | None, typer.Option()] = None,
    feature_timeout_ms: Annotated[float | None, typer.Option()] = None,
    prediction_cache_ttl_s: Annotated[float | None, typer.Option()] = None,
    heartbeat_interval: Annotated[float | None, typer.Option()] = None,
    log_requests: Annotated[bool | None, typer.Option("--log-requests")] = None,
    drift: Drift = None,
    payload_sample: PayloadSample = None,
    payload_log: PayloadLogUrl = None,
    require_integrity: Annotated[
        bool | None, typer.Option("--require-integrity", help="Workers refuse versions without sha256 records.")
    ] = None,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure", help="Fresh CURVE keys between app and workers, and an API key (printed once) for the HTTP API."
        ),
    ] = False,
) -> None:
    """Everything local: registry, demo models, N workers and --apps app servers. Ctrl-C stops it all.

    Serves every registered model with the alias (`*`) unless --models says otherwise: a model promoted
    while it runs is served at the next poll. Into a registry with none, the demo models `demo` (fraud)
    and `churn` are trained and registered first; a named demo model the registry lacks is too. The
    registry is found like every other command's (--registry-uri, TANDEM_REGISTRY_URI,
    MLFLOW_TRACKING_URI, else the --home registry), so `tandem promote` acts on the one this stack uses.
    """
    flags = dict(locals())
    from shared.model_targets import parse_models
    from tandem.up import DEFAULT_MODELS, Stack

    logs.configure("INFO", "text", "up")
    chosen = models or model or DEFAULT_MODELS
    try:
        targets = parse_models(chosen, alias=alias or "production", tag=tag)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None

    def as_flags(names: tuple[str, ...]) -> dict[str, str]:
        given = {k: flags[k] for k in names if flags[k] is not None}
        return {k.replace("_", "-"): ("" if v is True else str(v)) for k, v in given.items()}

    worker_flags = as_flags(WORKER_ONLY)
    app_flags = as_flags(APP_ONLY)
    if log_requests:
        worker_flags["log-requests"] = app_flags["log-requests"] = ""
    if drift is not None:
        app_flags["drift" if drift else "no-drift"] = ""
    api_key = None
    if secure:
        from tandem.up import secure_flags

        api_key = secure_flags(home or DEFAULT_HOME, worker_flags, app_flags)
    stack = Stack(
        api_key=api_key,
        home=home or DEFAULT_HOME,
        port=port,
        workers=workers,
        apps=apps,
        targets=targets,
        registry_uri=registry_uri_for_write(registry_uri, home),
        worker_flags=worker_flags,
        app_flags=app_flags,
    )
    sys.exit(stack.run())


app.command("demo-model")(demo_model)
app.command()(register)
app.command()(promote)
app.command()(models)
app.command()(rollout)
app.command()(traffic)


def main() -> None:
    logs.redact_uncaught()  # before settings are parsed: their errors quote what they were given
    app()


if __name__ == "__main__":
    main()
