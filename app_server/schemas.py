"""The request schema of each (model, version): the one place it comes from, for validating ``/predict``
bodies and for documenting them.

A version's feature spec lives with the version (its workers describe it); the pydantic model generated
from it validates requests, and its JSON schema, annotated from the spec, documents them.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from app_server.worker_conn import WorkerConn
from app_server.workers import WorkerPool
from shared.features import FeatureSpec


class VersionSpecs:
    """Feature spec and request validator per (model, version), fetched once from a worker."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._validators: dict[tuple[str, str], tuple[FeatureSpec, TypeAdapter[Any]]] = {}

    async def get(self, conn: WorkerConn, model: str, version: str) -> tuple[FeatureSpec, TypeAdapter[Any]]:
        key = (model, version)
        found = self._validators.get(key)
        if found is None:
            desc = await self.pool.describe(conn, model, version)
            spec = FeatureSpec.model_validate(desc["feature_spec"])
            found = (spec, TypeAdapter(list[spec.instance_model]))  # type: ignore[name-defined]
            self._validators[key] = found
        return found


def instance_schema(spec: FeatureSpec, title: str) -> dict[str, Any]:
    """JSON schema of one instance, each field described from the spec (type, default, vocabulary)."""
    schema = spec.instance_model.model_json_schema()
    for f in spec.features:
        prop = schema["properties"][f.name]
        note = f"{f.type} feature; " + (
            f"default {f.default!r}" if f.default is not None else "no default: required unless stored for the entity"
        )
        if f.type == "categorical":
            note += f"; vocabulary {f.vocabulary}, anything else is out-of-vocabulary"
        prop["description"] = f"{prop['description']} ({note})" if prop.get("description") else note
    schema["title"] = title
    return schema


def predict_body_schema(instance_ref: str, max_instances: int) -> dict[str, Any]:
    """JSON schema of a ``/predict`` body whose instances are ``instance_ref`` (a ``$ref``)."""
    return {
        "type": "object",
        "required": ["instances"],
        "additionalProperties": False,
        "properties": {
            "instances": {
                "type": "array",
                "items": {"$ref": instance_ref},
                "minItems": 1,
                "maxItems": max_instances,
            }
        },
    }
