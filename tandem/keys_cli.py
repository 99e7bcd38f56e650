"""``tandem keys``: make keys. ``generate``: CURVE key pairs for the ZeroMQ hop between app servers and
workers; ``api-key``: an API key for the app server's HTTP API (``--api-keys-file``).

A worker runs with its own pair (``--curve-secret-key worker.key_secret``) and a directory of the app
servers' public keys (``--curve-authorized-dir``); an app server with its own pair and the workers'
public key (``--curve-worker-key worker.key``). docs/operations.md has the Kubernetes side and API keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Make keys: CURVE key pairs between tiers, API keys for the HTTP API.", no_args_is_help=True)


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


@app.command()
def generate(
    directory: Annotated[Path, typer.Argument(help="Where to write the pair (created if missing).")],
    name: Annotated[str, typer.Option(help="The pair's name: NAME.key (public) and NAME.key_secret.")] = "worker",
) -> None:
    """Write a key pair: NAME.key (the public key, to hand to peers) and NAME.key_secret (mode 0600, for
    the process that owns it only). Refuses to overwrite an existing key."""
    from shared.curve import generate_pair
    from shared.errors import ConfigError

    try:
        public, secret = generate_pair(directory, name)
    except ConfigError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"error: cannot write keys into {directory}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"public key: {public}")
    typer.echo(f"secret key: {secret}")
