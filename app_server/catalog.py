"""Which models this app server serves, read from the workers' heartbeats and its settings: names to
models (404 or 503), the default model of ``/predict``, readiness, and version descriptions.

A model is *known* when the settings name it (``--models``, ``--default-model``) or a worker's last
heartbeat lists it, alive or not. A known model with no live worker is a 503 ``no_workers`` with
``Retry-After`` (its worker may be restarting); any other name is a 404 ``model_not_found``.
"""

from __future__ import annotations

import time
from typing import Any

from app_server.worker_conn import WorkerConn
from app_server.workers import WorkerLost, WorkerPool
from shared.errors import ModelNotFound, NoWorkers
from shared.settings import AppSettings
from shared.versions import newest, oldest_first

SHOWN_NAME_CHARS = 64
SHOWN_MODELS = 10


def shown(name: str) -> str:
    """A caller's model name as error messages quote it: cut short, so a 10 kB name is not echoed back."""
    return repr(name) if len(name) <= SHOWN_NAME_CHARS else f"{name[:SHOWN_NAME_CHARS]!r}..."


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN_MODELS} more" if len(names) > SHOWN_MODELS else ""
    return ", ".join(names[:SHOWN_MODELS]) + more


class ModelCatalog:
    def __init__(self, settings: AppSettings, pool: WorkerPool) -> None:
        self.settings = settings
        self.pool = pool
        self.required = settings.required_models()

    def names(self) -> list[str]:
        """Every known model, sorted."""
        return sorted(self.pool.known_models())

    def resolve(self, name: str) -> str:
        """``name`` if it is a known model; else 404 ``model_not_found``."""
        if self.pool.knows(name):
            return name
        names = self.names()
        served = f"; served: {_listing(names)}" if names else "; no model is served yet"
        raise ModelNotFound(f"unknown model {shown(name)}{served}")

    def default(self) -> str:
        """The model ``POST /predict`` serves: the configured default, else the only model served."""
        if self.settings.default:
            return self.settings.default
        listed = sorted(self.pool.listed_models())
        if len(listed) == 1:
            return listed[0]
        if not listed:
            raise NoWorkers("no worker serves a model yet")
        raise ModelNotFound(
            f"several models are served ({_listing(listed)}) and none is the default: "
            "use POST /v1/models/{name}/predict, or start the app server with --default-model"
        )

    def readiness(self) -> tuple[dict[str, int], list[str]]:
        """Live workers per model, and the models readiness still waits for (ready when empty).

        With models required (``--models`` names, ``--default-model``), each needs a live worker. With
        none required (no ``--models``, or only ``*``, and no default), ready once any model has a live
        worker: a ``*`` fleet serves whatever the registry holds, so there is no list to wait for, and an
        app server that can answer nothing should still not take traffic.
        """
        live = {m: len(self.pool.candidates(m)) for m in self.names()}
        if self.required:
            return live, [m for m in self.required if not live.get(m)]
        return live, [] if any(live.values()) else ["any model"]

    def live_workers(self) -> int:
        """Workers a request for some model could go to now (each counted once, whatever it serves)."""
        return sum(c.routable() and any(m.live for m in c.models.values()) for c in self.pool.conns.values())

    def holders(self, model: str, version: str | None = None) -> list[WorkerConn]:
        """Live workers serving ``model`` (holding ``version`` when one is given)."""
        conns = self.pool.candidates(model)
        return conns if version is None else [c for c in conns if c.holds(model, version)]

    def newest(self, model: str) -> str | None:
        """The newest version a live worker serves."""
        return newest(c.live(model) for c in self.pool.candidates(model))

    def versions(self, model: str) -> list[str]:
        """Versions some live worker holds, oldest first."""
        return oldest_first(v for c in self.pool.candidates(model) for v in c.models[model].resident)

    async def describe(
        self, model: str, version: str | None = None, timeout_s: float = 2.0
    ) -> tuple[str, dict[str, Any]]:
        """Feature spec, example and signature of ``version`` (default: the newest live version), from
        a worker that holds it; a worker that no longer serves the model, or does not answer in time,
        gives way to the next one. 404 for a version no live worker holds, 503 when none serves."""
        target = version or self.newest(model)
        conns = self.holders(model, target) if target else []
        if not conns:
            if version is not None and self.pool.candidates(model):
                raise ModelNotFound(f"model {model!r} has no version {shown(version)} loaded")
            raise NoWorkers(f"no live worker serves model {model!r}")
        deadline = time.monotonic() + timeout_s
        error: Exception = NoWorkers(f"no live worker serves model {model!r}")
        for conn in conns:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return target, await self.pool.describe(conn, model, target, remaining)
            except ModelNotFound:
                self.pool.forget(conn, model)
            except WorkerLost as exc:
                error = exc
        if not self.pool.knows(model):
            raise ModelNotFound(f"no worker serves model {model!r} any more")
        raise error
