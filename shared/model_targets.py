"""Which models a process serves, and with which batching knobs: ``--models`` and ``--models-config``.

``--models`` is a comma list; each entry names a registered model and the registry pointer that says
which of its versions serves:

- ``NAME``: the version the worker-wide ``--alias`` (or ``--tag``) names;
- ``NAME@ALIAS``: the version that alias names;
- ``NAME@tag:KEY=VALUE``: the newest version carrying that tag;
- ``*`` (or ``*@ALIAS``): every registered model that has the alias, found anew at every registry
  poll, so a model promoted later is served without a restart and one whose alias is removed leaves.

Explicit entries win over ``*`` for their names. Per-model batching knobs come from ``--models-config``
(inline JSON, or a JSON or YAML file): ``{"NAME": {"weight": 2, "max_batch_size": 32}, ...}``; a
model it does not name takes the worker-wide settings. See docs/architecture.md, "Many models".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

EVERY = "*"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Model names Tandem serves: they appear in URL paths, metric labels and file names, so no spaces,
slashes or quotes. MLflow allows more; such a model is refused at start-up with this message."""


@dataclass(frozen=True, slots=True)
class ModelTarget:
    """One entry of ``--models``: a model (or ``*``) and the alias or tag that picks its version."""

    name: str
    alias: str | None = "production"
    tag: str | None = None
    """``KEY=VALUE``; when set, ``alias`` is ignored."""

    @property
    def every(self) -> bool:
        return self.name == EVERY

    @property
    def pointer(self) -> str:
        """How the version is chosen, as an operator would write it."""
        return f"tag:{self.tag}" if self.tag else f"@{self.alias}"

    def __str__(self) -> str:
        return f"{self.name}@tag:{self.tag}" if self.tag else f"{self.name}@{self.alias}"


def parse_models(text: str, *, alias: str | None = "production", tag: str | None = None) -> list[ModelTarget]:
    """``--models`` as a list of targets; ``alias``/``tag`` are the worker-wide defaults of bare names.

    Raises ValueError naming the entry that does not parse, or a name given twice.
    """
    targets: list[ModelTarget] = []
    seen: set[str] = set()
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, at, pointer = entry.partition("@")
        name = name.strip()
        if name != EVERY and not NAME_RE.fullmatch(name):
            raise ValueError(
                f"models: {entry!r}: a model name is 1-128 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit"
            )
        if not at:
            target = ModelTarget(name, alias=alias, tag=tag)
        elif pointer.startswith("tag:"):
            kv = pointer.removeprefix("tag:")
            if "=" not in kv or not kv.partition("=")[0]:
                raise ValueError(f"models: {entry!r}: a tag pointer looks like NAME@tag:KEY=VALUE")
            target = ModelTarget(name, alias=None, tag=kv)
        elif pointer and "=" not in pointer and ":" not in pointer:
            target = ModelTarget(name, alias=pointer, tag=None)
        else:
            raise ValueError(f"models: {entry!r}: expected NAME, NAME@ALIAS, NAME@tag:KEY=VALUE or *")
        if target.every and target.tag:
            raise ValueError(f"models: {entry!r}: '*' follows an alias (*@ALIAS), not a tag")
        if name in seen:
            raise ValueError(f"models: {name!r} is listed twice")
        seen.add(name)
        targets.append(target)
    if not targets:
        raise ValueError("models: no model named")
    return targets


class ModelOptions(BaseModel):
    """Per-model knobs; ``None`` means the worker-wide setting of the same name."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, gt=0)
    """Share of the executor under contention, relative to other models (equal shares by default)."""
    max_batch_size: int | None = Field(None, ge=1)
    max_latency_ms: float | None = Field(None, ge=0)
    max_queue: int | None = Field(None, ge=1)
    target_utilization: float | None = Field(None, gt=0, le=1)


def parse_model_config(text: str | None) -> dict[str, ModelOptions]:
    """``--models-config``: inline JSON, or the path of a JSON or YAML file, mapping names to options."""
    if not text or not text.strip():
        return {}
    raw: Any
    stripped = text.strip()
    if stripped.startswith("{"):
        raw = json.loads(stripped)
    else:
        path = Path(stripped)
        content = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(content) or {}
        else:
            raw = json.loads(content)
    if not isinstance(raw, dict):
        raise ValueError("models_config: expected a mapping of model names to options")
    return {str(name): ModelOptions.model_validate(opts or {}) for name, opts in raw.items()}
