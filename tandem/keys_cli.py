"""``tandem keys generate``: CURVE key pairs for the ZeroMQ hop between app servers and workers.

A worker runs with its own pair (``--curve-secret-key worker.key_secret``) and a directory of the app
servers' public keys (``--curve-authorized-dir``); an app server with its own pair and the workers'
public key (``--curve-worker-key worker.key``). docs/operations.md has the Kubernetes side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="CURVE keys between app servers and workers.", no_args_is_help=True)


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
