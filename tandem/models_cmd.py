"""``tandem models``: what the registry holds, and which workers of a running stack serve what."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from shared import logs
from tandem.options import Home, RegistryUri, registry_uri_for_write


def models(
    name: Annotated[str | None, typer.Argument(help="One model (default: every registered model).")] = None,
    registry_uri: RegistryUri = None,
    home: Home = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    app_url: Annotated[
        str | None,
        typer.Option(
            help="An app server to ask which workers serve what (default: the running `tandem up` of --home)."
        ),
    ] = None,
) -> None:
    """List models with their versions, aliases and tags, and which workers serve which version."""
    from shared import registry

    uri = registry_uri_for_write(registry_uri, home)
    names = [name] if name else registry.list_models(uri)
    served = _served(app_url or _up_url(home))
    listed = []
    for n in names:
        versions = registry.list_versions(uri, n)
        workers = None if served is None else _workers_of(served, n)
        listed.append((n, versions, workers))
    if as_json:
        entries = [
            {
                "name": n,
                "versions": [{"version": v.version, "aliases": v.aliases, "tags": v.tags} for v in versions],
                "workers": workers,
            }
            for n, versions, workers in listed
        ]
        typer.echo(json.dumps(entries[0] if name else {"models": entries}))
        return
    if not any(versions for _, versions, _ in listed):
        typer.echo(f"no versions of {name}" if name else f"no models in {logs.redact_url(uri)}")
        raise typer.Exit(1)
    for n, versions, workers in listed:
        for v in versions:
            tags = " ".join(f"{k}={val}" for k, val in sorted(v.tags.items()))
            serving = [w["endpoint"] for w in workers or [] if w.get("live") == v.version]
            where = f"  served by: {', '.join(serving)}" if serving else ""
            typer.echo(f"{n} v{v.version:<4} aliases: {','.join(v.aliases) or '-':<12} tags: {tags}{where}")
            for w in workers or []:
                refused = w.get("refused") or {}
                if refused.get("version") == v.version:
                    typer.echo(
                        f"    refused by {w['endpoint']} (attempt {refused.get('attempts')}): {refused.get('error')}"
                    )
    if served is None:
        typer.echo("(no running app server found: pass --app-url to see which workers serve what)")


def _up_url(home: Path | None) -> str | None:
    from tandem.up import STATE_FILE

    state = (home or Path(".tandem")) / STATE_FILE
    try:
        return json.loads(state.read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None


def _served(url: str | None) -> list[dict[str, Any]] | None:
    """What an app server says it serves (``GET /v1/models``); None when nobody answers."""
    import urllib.request

    if not url:
        return None
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=3) as r:
            return json.loads(r.read())["models"]
    except (OSError, ValueError, KeyError):
        return None


def _workers_of(served: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Each worker serving ``name``, with the version it serves."""
    entry = next((m for m in served if m["name"] == name), None)
    if entry is None:
        return []
    return [
        {
            "endpoint": w["endpoint"],
            "alive": w["alive"],
            "live": w.get("live"),
            "resident": w.get("versions"),
            "refused": w.get("refused"),
        }
        for w in entry["workers"]
    ]
