"""The request schema of each (model, version): the one place it comes from, for validating ``/predict``
bodies and for documenting them.

A version's feature spec lives with the version (its workers describe it). From it, one pydantic model
per (spec, feature store or not) validates instances, and its JSON schema documents them, so what the
document admits is what the app server accepts:

* a feature with a default may be left out or null (null means "use the default");
* a feature without one is required and must not be null, unless the app server has a feature store
  (``--redis-url``) and the instance names its ``entity_id``: then the store fills the gap. Whether
  the store holds that entity is data, which no schema can know: an entity without the value is a 422;
* numbers are finite JSON numbers; integers beyond 64 bits, which JSON parsers read as floats or not at
  all, are outside the schema (``entity_id``) or the float range (features).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    TypeAdapter,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app_server.http_io import MAX_TIMEOUT_MS
from app_server.worker_conn import WorkerConn
from app_server.workers import WorkerPool
from shared.features import ENTITY_KEY, FeatureSpec
from shared.signature import TABLE_INPUT, Column, arrow_schema, columns_from

FLOAT64_MAX = sys.float_info.max
FLOAT32_MAX = 3.4028234663852886e38
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
"""The integers orjson reads as integers; beyond them it reads a float, which an integer field refuses."""

PREDICTION_HEADERS: list[dict[str, Any]] = [
    {
        "name": "X-Request-ID",
        "in": "header",
        "required": False,
        "description": "Echoed in the answer and in both tiers' logs; generated when absent or empty.",
        "schema": {"type": "string"},
    },
    {
        "name": "X-Timeout-Ms",
        "in": "header",
        "required": False,
        "description": "The request's deadline budget in milliseconds (a decimal number; default --timeout-ms). "
        "Past it the answer is 504; a budget too short to compute in is a 504 too.",
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_MS},
    },
]
"""The request headers of the prediction routes, as OpenAPI parameters."""


def _integral(value: Any) -> Any:
    """``7.0`` as 7: a JSON integer either way (JSON Schema's ``integer`` admits both)."""
    return int(value) if type(value) is float and value.is_integer() else value


_NUMBER = Annotated[float, Field(allow_inf_nan=False, strict=True, ge=-FLOAT64_MAX, le=FLOAT64_MAX)]
_TYPES: dict[str, Any] = {"numeric": _NUMBER, "categorical": StrictStr, "hashed": StrictStr, "boolean": StrictBool}
_ENTITY_ID = StrictStr | Annotated[int, Field(strict=True, ge=INT64_MIN, le=UINT64_MAX), BeforeValidator(_integral)]
# (Field before BeforeValidator: the other way round pydantic writes "ge"/"le", not JSON Schema's words.)


def needs_entity(spec: FeatureSpec, entities: bool) -> list[str]:
    """Features an instance must carry unless its ``entity_id`` can fill them (none without a store)."""
    return [f.name for f in spec.features if f.default is None] if entities and spec.entity else []


def request_model(spec: FeatureSpec, entities: bool) -> type[BaseModel]:
    """The pydantic model of one ``/predict`` instance of ``spec``; ``entities``: a feature store is there."""
    fillable = set(needs_entity(spec, entities))
    fields: dict[str, Any] = {}
    for f in spec.features:
        py_type = _TYPES[f.type]
        described = {"description": f.description} if f.description else {}
        if f.default is not None or f.name in fillable:
            fields[f.name] = (py_type | None, Field(None, **described))
        else:
            fields[f.name] = (py_type, Field(..., **described))
    if spec.entity:
        fields[ENTITY_KEY] = (_ENTITY_ID | None, Field(None))
    validators = {"_entity_fills": model_validator(mode="after")(_entity_fills(sorted(fillable)))} if fillable else None
    return create_model(  # type: ignore[call-overload,no-any-return]
        "Instance", __config__=ConfigDict(extra="forbid"), __validators__=validators, **fields
    )


def _entity_fills(fillable: list[str]) -> Any:
    def check(instance: Any) -> Any:
        """Without an ``entity_id``, the features only the store could fill must be in the instance."""
        if getattr(instance, ENTITY_KEY) is None:
            missing = [n for n in fillable if getattr(instance, n) is None]
            if missing:
                raise PydanticCustomError(
                    "missing_without_entity", "{names}: required without an entity_id", {"names": ", ".join(missing)}
                )
        return instance

    return check


def instance_schema(spec: FeatureSpec, entities: bool, title: str) -> dict[str, Any]:
    """JSON schema of one instance (the model's, annotated from the spec: type, default, vocabulary)."""
    schema = request_model(spec, entities).model_json_schema()
    fillable = needs_entity(spec, entities)
    for f in spec.features:
        prop = schema["properties"][f.name]
        if f.default is not None:
            note = f"{f.type} feature; default {f.default!r} when absent or null"
        elif f.name in fillable:
            note = f"{f.type} feature; no default: required unless entity_id is given (the feature store fills it)"
        else:
            note = f"{f.type} feature; required"
        if f.type == "categorical":
            note += f"; vocabulary {f.vocabulary}, anything else is out-of-vocabulary"
        prop["description"] = f"{prop['description']} ({note})" if prop.get("description") else note
    if spec.entity:
        schema["properties"][ENTITY_KEY]["description"] = (
            f"id of the {spec.entity} whose stored features fill the instance's gaps"
            if entities
            else "accepted and ignored: this app server has no feature store, so every feature without a "
            "default is required"
        )
    if fillable:
        # An entity_id, or every feature the store would otherwise fill, non-null.
        schema["anyOf"] = [
            {"required": [ENTITY_KEY], "properties": {ENTITY_KEY: {"not": {"type": "null"}}}},
            {"required": fillable, "properties": {n: {"not": {"type": "null"}} for n in fillable}},
        ]
    schema["title"] = title
    return schema


def predict_body_schema(instance: dict[str, Any], max_instances: int | None) -> dict[str, Any]:
    """JSON schema of a ``/predict`` body whose instances are ``instance`` (a schema or a ``$ref``)."""
    instances: dict[str, Any] = {"type": "array", "items": instance, "minItems": 1}
    if max_instances is not None:
        instances["maxItems"] = max_instances
    return {"type": "object", "required": ["instances"], "additionalProperties": False,
            "properties": {"instances": instances}}  # fmt: skip


_COLUMN_TYPES: dict[str, Any] = {
    "double": _NUMBER,
    "float": Annotated[float, Field(allow_inf_nan=False, strict=True, ge=-FLOAT32_MAX, le=FLOAT32_MAX)],
    "long": Annotated[int, Field(strict=True, ge=INT64_MIN, le=2**63 - 1), BeforeValidator(_integral)],
    "integer": Annotated[int, Field(strict=True, ge=-(2**31), le=2**31 - 1), BeforeValidator(_integral)],
    "boolean": StrictBool,
    "string": StrictStr,
}
"""Pydantic type of each MLflow column type: what ``mlflow.pyfunc``'s schema enforcement would accept
without changing a value (no string for a number, no fraction for an integer, nothing out of range)."""


def signature_model(columns: list[Column]) -> type[BaseModel]:
    """The pydantic model of one instance of a version described by its MLflow signature: every
    column, required ones non-null, optional ones null when absent, no other key."""
    fields: dict[str, Any] = {}
    for c in columns:
        py_type = _COLUMN_TYPES[c.type]
        note = f"{c.type} column" + ("" if c.required else "; optional (null when absent)")
        if c.required:
            fields[c.name] = (py_type, Field(..., description=note))
        else:
            fields[c.name] = (py_type | None, Field(None, description=note))
    return create_model("Instance", __config__=ConfigDict(extra="forbid"), **fields)  # type: ignore[call-overload,no-any-return]


def describe_instance(desc: dict[str, Any], entities: bool, title: str) -> dict[str, Any]:
    """JSON schema of one instance of a described version, whichever way it is described."""
    if desc.get("feature_spec") is None:
        schema = signature_model(columns_from(desc["signature"])).model_json_schema()
        schema["title"] = title
        return schema
    return instance_schema(FeatureSpec.model_validate(desc["feature_spec"]), entities, title)


@dataclass(frozen=True, slots=True)
class VersionInput:
    """How the instances of one version are validated and sent: encoded with its feature spec into a
    float32 matrix, or (a version described by an MLflow signature) packed as an Arrow table."""

    validator: TypeAdapter[Any]
    input_name: str
    output_name: str
    """The output whose rows are the predictions; "" for a model answering a frame: one object per row."""
    spec: FeatureSpec | None = None
    arrow: Any = None
    """The ``pyarrow.Schema`` of a signature version's table."""


class VersionSpecs:
    """How each (model, version) takes its instances, fetched once from a worker."""

    def __init__(self, pool: WorkerPool, entities: bool = False) -> None:
        self.pool = pool
        self.entities = entities
        self._inputs: dict[tuple[str, str], VersionInput] = {}

    async def get(self, conn: WorkerConn, model: str, version: str) -> VersionInput:
        key = (model, version)
        found = self._inputs.get(key)
        if found is None:
            found = self._inputs[key] = self.build(await self.pool.describe(conn, model, version))
        return found

    def build(self, desc: dict[str, Any]) -> VersionInput:
        if desc.get("feature_spec") is None:
            columns = columns_from(desc["signature"])
            outputs = [o["name"] for o in desc["outputs"]]
            return VersionInput(
                TypeAdapter(list[signature_model(columns)]),  # type: ignore[misc]
                TABLE_INPUT,
                "" if desc.get("frame_output") else outputs[0],
                arrow=arrow_schema(columns),
            )
        spec = FeatureSpec.model_validate(desc["feature_spec"])
        validator = TypeAdapter(list[request_model(spec, self.entities)])  # type: ignore[misc]
        return VersionInput(validator, spec.input_name, spec.output_name, spec=spec)
