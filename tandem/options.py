"""What several ``tandem`` commands share: their common options, and settings built from flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from shared.settings import CommonSettings

RegistryUri = Annotated[
    str | None,
    typer.Option(
        "--registry-uri",
        help="MLflow registry URI (else TANDEM_REGISTRY_URI, MLFLOW_TRACKING_URI, then the --home registry).",
    ),
]
Home = Annotated[Path | None, typer.Option("--home", help="Folder of a `tandem up` registry (default ./.tandem).")]
Model = Annotated[str | None, typer.Option("--model", help="Registered model name (default demo).")]
Models = Annotated[
    str | None,
    typer.Option(
        "--models",
        help="Models to serve: comma list of NAME, NAME@ALIAS, NAME@tag:KEY=VALUE, or * (every model with the alias).",
    ),
]
LogLevel = Annotated[str | None, typer.Option("--log-level")]
CurveSecretKey = Annotated[
    Path | None, typer.Option(help="CURVE: this process's key pair, a .key_secret file (tandem keys generate).")
]

Drift = Annotated[
    bool | None, typer.Option("--drift/--no-drift", help="Drift gauges against each version's reference profile.")
]
PayloadSample = Annotated[
    float | None, typer.Option(help="Share of /predict requests written to the payload log (e.g. 0.01).")
]
PayloadLogUrl = Annotated[
    str | None, typer.Option(help="Payload log sink: file:///DIR (gzip JSON lines) or redis://HOST:PORT/DB?stream=KEY.")
]


def build(cls: type[CommonSettings], **flags: Any) -> Any:
    """Settings from the environment, with every flag the user actually gave taking precedence."""
    return cls(**{k: v for k, v in flags.items() if v is not None})


def registry_uri(registry_uri: str | None, home: Path | None) -> str:
    return build(CommonSettings, registry_uri=registry_uri, home=home).resolved_registry_uri()


def registry_uri_for_write(uri: str | None, home: Path | None) -> str:
    resolved = registry_uri(uri, home)
    if resolved.startswith("sqlite:///"):
        Path(resolved.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return resolved
