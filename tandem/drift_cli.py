"""``tandem drift report NAME --log DIR``: a self-contained HTML drift report from the payload log."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from tandem.options import Home, RegistryUri, registry_uri

app = typer.Typer(help="Drift: live traffic against each version's reference profile.", no_args_is_help=True)


@app.command()
def report(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    log: Annotated[Path, typer.Option(help="Payload log folder (the app servers' --payload-log file:///DIR).")],
    since: Annotated[str | None, typer.Option(help="Only records from then on: 30m, 6h, 2d or an ISO time.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file (default drift-NAME.html).")] = None,
    registry_uri_opt: RegistryUri = None,
    home: Home = None,
) -> None:
    """Write an HTML report: per version, each feature's and the predictions' live distribution against
    the reference the version was registered with, with charts, drifted features first."""
    from app_server.payload_sinks import read_records
    from tandem.drift_report import parse_since, registry_profiles
    from tandem.drift_report import report as build
    from tandem.report_html import render

    if not log.is_dir():
        typer.echo(f"error: --log {log}: not a folder", err=True)
        raise typer.Exit(2)
    try:
        start = parse_since(since)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    uri = registry_uri(registry_uri_opt, home)
    with tempfile.TemporaryDirectory(prefix="tandem-drift-") as cache:
        versions = build(name, read_records(log, start), registry_profiles(uri, Path(cache)))
    target = out or Path(f"drift-{name}.html")
    target.write_text(render(name, versions, str(log)))
    for v in versions:
        top = ", ".join(f"{c.name} {c.psi:.2f}" for c in v.features[:3]) or v.note
        typer.echo(f"{name} v{v.version}: {v.rows} instances; {top}")
    if not versions:
        typer.echo(f"no logged requests of {name} in {log}" + (f" since {since}" if since else ""))
    typer.echo(f"wrote {target}")
