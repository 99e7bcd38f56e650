"""Commands that write to the registry: train and register a demo model, register any model after checking
it as a worker would, and move an alias or tag (what every rollout starts from)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared import logs
from tandem.options import Home, RegistryUri, registry_uri_for_write
from tandem.rollout import note_for_promote


def demo_model(
    size: Annotated[str, typer.Option(help="small (default) or large (compute-heavy, for benchmarks).")] = "small",
    dataset: Annotated[str, typer.Option(help="fraud (default; registered as demo) or churn.")] = "fraud",
    variant: Annotated[bool, typer.Option(help="Another seed and one extra feature: a visibly new version.")] = False,
    fail_percent: Annotated[
        float, typer.Option(help="Drill version: passes its checks, then fails this % of requests (0-100).")
    ] = 0.0,
    seed: Annotated[int | None, typer.Option()] = None,
    name: Annotated[str | None, typer.Option(help="Registered name (default demo, demo-large or churn).")] = None,
    kind: Annotated[
        str,
        typer.Option(
            help="network (default: PyTorch, served as ONNX), or gradient-boosted trees logged the ordinary MLflow "
            "way over the same fields: xgboost, lightgbm, sklearn (pip install 'tandem-serve[trees]')."
        ),
    ] = "network",
    registry_uri: RegistryUri = None,
    home: Home = None,
) -> None:
    """Train a demo model (fraud or churn), register it, and print the new version."""
    from shared.errors import TandemError
    from tandem.demo import KINDS, register_demo
    from tandem.demo_data import DATASETS

    if size not in ("small", "large"):
        raise typer.BadParameter("--size must be small or large")
    if dataset not in DATASETS:
        raise typer.BadParameter(f"--dataset must be one of {', '.join(sorted(DATASETS))}")
    if kind not in KINDS:
        raise typer.BadParameter(f"--kind must be one of {', '.join(KINDS)}")
    if kind != "network" and size != "small":
        raise typer.BadParameter("--size is for --kind network")
    logs.configure("WARNING", "text", "demo")
    uri = registry_uri_for_write(registry_uri, home)
    try:
        ref = register_demo(
            uri,
            size,
            seed=seed if seed is not None else (11 if variant else 7),
            variant=variant,
            name=name,
            dataset=dataset,
            kind=kind,
            fail_percent=fail_percent,
        )
    except (TandemError, ValueError) as exc:
        typer.echo(f"error: {logs.redact(getattr(exc, 'message', None) or str(exc))}", err=True)
        raise typer.Exit(1) from None
    aliases = f" (aliases: {', '.join(ref.aliases)})" if ref.aliases else ""
    typer.echo(f"registered {ref.name} version {ref.version}{aliases}")


def register(
    source: Annotated[
        str,
        typer.Argument(
            help="model.onnx, a TorchScript model.pt, an MLflow model folder, runs:/RUN/PATH, "
            "models:/NAME/VERSION or models:/NAME@ALIAS."
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="Registered model name (letters, digits, ., _, -).")],
    spec: Annotated[
        Path | None,
        typer.Option(help="feature_spec.json, for .onnx and .pt (make one: tandem spec fit DATA --target COL)."),
    ] = None,
    example: Annotated[
        Path | None,
        typer.Option(help='Instances to check it on (.onnx/.pt): a JSON list, or {"instances": [...]}.'),
    ] = None,
    alias: Annotated[
        str | None,
        typer.Option(help="Point this alias at the new version (default: production, if no version has it yet)."),
    ] = None,
    reference: Annotated[
        Path | None, typer.Option(help="Training data (CSV/Parquet): store its reference profile, for drift.")
    ] = None,
    registry_uri: RegistryUri = None,
    home: Home = None,
) -> None:
    """Check a model exactly as a worker would (load, run its example, warm), then register it.

    A model a worker would refuse is refused here, with the worker's reason and exit status 1, and nothing
    is registered (exit status 2: the command line or a file it names is wrong).
    """
    from tandem.register import RegisterError, register_model, summary

    logs.configure("WARNING", "text", "register")
    uri = registry_uri_for_write(registry_uri, home)
    try:
        result = register_model(
            uri,
            source,
            name,
            spec=spec,
            example=example,
            alias=alias,
            reference=reference,
            say=lambda m: typer.echo(m, err=True),
        )
    except RegisterError as exc:
        typer.echo(f"error: {logs.redact(exc.message)}", err=True)
        raise typer.Exit(exc.exit_code) from None
    for line in summary(result):
        typer.echo(line)


def promote(
    name: str,
    version: str,
    alias: Annotated[str | None, typer.Option(help="Alias to move (default production).")] = None,
    tag: Annotated[str | None, typer.Option(help="KEY=VALUE tag to set on the version instead.")] = None,
    registry_uri: RegistryUri = None,
    home: Home = None,
) -> None:
    """Point an alias at a version (or tag it); workers pick it up on their next poll."""
    from shared import registry

    uri = registry_uri_for_write(registry_uri, home)
    if tag:
        if "=" not in tag:
            raise typer.BadParameter("--tag must look like KEY=VALUE")
        registry.set_tag(uri, name, version, tag)
        typer.echo(f"tagged {name} version {version} with {tag}")
    else:
        registry.set_alias(uri, name, alias or "production", version)
        typer.echo(f"{name}@{alias or 'production'} -> version {version}")
        if note := note_for_promote(uri, name):
            typer.echo(note)
