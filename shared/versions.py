"""Which of a model's versions is newest: the one rule, used wherever versions are compared or listed.

MLflow numbers a model's versions 1, 2, 3, ... and sends them as strings, so a plain string compare
puts "10" before "9". Versions compare as numbers; anything that is not a number (never seen from
MLflow, tolerated from a peer) sorts before every number, by its text, and ``None`` (nothing live)
before everything.
"""

from __future__ import annotations

from collections.abc import Iterable


def version_key(version: str | None) -> tuple[int, int, str]:
    """Sort key of a version: ``sorted(vs, key=version_key)`` lists them oldest first."""
    if version is None:
        return (0, 0, "")
    text = str(version)
    if text.isascii() and text.isdigit():
        return (2, int(text), text)
    return (1, 0, text)


def newest(versions: Iterable[str | None]) -> str | None:
    """The newest of ``versions`` (``None`` when there is none, or only ``None``)."""
    return max(versions, key=version_key, default=None)


def oldest_first(versions: Iterable[str]) -> list[str]:
    """Distinct versions, oldest first."""
    return sorted(set(versions), key=version_key)
