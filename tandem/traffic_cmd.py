"""``tandem traffic NAME``: set or show a model's traffic policy (its ``canary``/``shadow`` aliases and the
``tandem.*`` tags), the same registry entries the MLflow client or UI would set, checked first."""

from __future__ import annotations

from typing import Annotated

import typer

from shared import registry
from shared.traffic import CANARY, CANARY_PERCENT, SHADOW, SHADOW_PERCENT, STICKY, percent_problem, sticky_problem
from tandem.options import Home, RegistryUri, registry_uri_for_write


def traffic(
    name: str,
    canary: Annotated[str | None, typer.Option(help="Version the canary alias names ('none' removes it).")] = None,
    canary_percent: Annotated[float | None, typer.Option(help="Share of callers sent to the canary, 0-100.")] = None,
    shadow: Annotated[str | None, typer.Option(help="Version the shadow alias names ('none' removes it).")] = None,
    shadow_percent: Annotated[float | None, typer.Option(help="Share of requests mirrored to the shadow.")] = None,
    sticky: Annotated[str | None, typer.Option(help="entity_id, header:NAME or none.")] = None,
    registry_uri: RegistryUri = None,
    home: Home = None,
) -> None:
    """Set a model's canary, shadow and stickiness (workers apply it at their next poll), then show it."""
    for flag, value in (("--canary-percent", canary_percent), ("--shadow-percent", shadow_percent)):
        if value is not None and (why := percent_problem(str(value))):
            raise typer.BadParameter(f"{flag}: {why}")
    if sticky is not None and (why := sticky_problem(sticky)):
        raise typer.BadParameter(f"--sticky: {why}")
    uri = registry_uri_for_write(registry_uri, home)
    for alias, version in ((CANARY, canary), (SHADOW, shadow)):
        if version is None:
            continue
        if version == "none":
            registry.delete_alias(uri, name, alias)
        else:
            registry.get_version(uri, name, version)  # a version that does not exist fails here, not on workers
            registry.set_alias(uri, name, alias, version)
    for tag, value in ((CANARY_PERCENT, canary_percent), (SHADOW_PERCENT, shadow_percent)):
        if value is not None:
            registry.set_model_tag(uri, name, tag, f"{value:g}")
    if sticky is not None:
        registry.set_model_tag(uri, name, STICKY, sticky)
    aliases, tags = registry.model_state(uri, name)
    typer.echo(
        f"{name}: production v{aliases.get('production', '-')}; "
        f"canary v{aliases.get(CANARY, '-')} at {tags.get(CANARY_PERCENT, '0')}%; "
        f"shadow v{aliases.get(SHADOW, '-')} at {tags.get(SHADOW_PERCENT, '0')}%; "
        f"sticky {tags.get(STICKY, 'entity_id')}"
    )
