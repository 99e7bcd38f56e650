"""``tandem keys``: make keys. ``api-key`` makes an API key for the app server's HTTP API
(``--api-keys-file``; see docs/operations.md, "API keys")."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Make keys: API keys for the HTTP API.", no_args_is_help=True)


@app.command("api-key")
def api_key(
    name: Annotated[str, typer.Option(help="The key's name: in metrics and messages, never the key itself.")],
    file: Annotated[Path, typer.Option(help="The app server's --api-keys-file; created (0600) if absent.")],
    rps: Annotated[
        float | None, typer.Option(help="Requests per second per app server replica (default: no limit).")
    ] = None,
    burst: Annotated[
        float | None, typer.Option(help="Requests at once after a quiet spell (default: one second's).")
    ] = None,
) -> None:
    """Make an API key, append its sha256 to FILE and print the key: once, it is not stored anywhere.

    Running app servers admit it within a second or two (they re-read the file when it changes).
    """
    from app_server.api_keys import new_key

    try:
        key = new_key(file, name, rps, burst)
    except (ValueError, OSError) as exc:  # ApiKeyFileError is a ValueError; so is a file not UTF-8
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"API key {name!r} added to {file}; it is shown only now:", err=True)
    typer.echo(key)
