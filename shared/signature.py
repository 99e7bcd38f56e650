"""Columns described by an MLflow signature: the input of a version that has no Tandem feature spec.

A model logged the ordinary MLflow way (``mlflow.sklearn.log_model(..., signature=...)``) says what it
takes as a column schema: names, MLflow types (``double``, ``long``, ``string``...) and whether each
column is required. Both tiers read that schema from here: the app server validates JSON instances
against it and packs them as one Arrow record batch (:func:`to_record_batch`); the worker turns the
batches of a model batch into the pandas frame the flavour expects. See docs/models.md.

Arrow, because it is the columnar format pandas, MLflow and the tree libraries already speak: numeric
columns travel as their raw buffers (read on the worker without a copy), string columns as one offsets
buffer plus one data buffer, and nulls as a bitmap, none of which a home-made format would do better.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

TABLE_INPUT = "table"
"""Wire name of the one input of a signature version: the Arrow record batch of its columns."""

TYPES: dict[str, str] = {
    "double": "float64",
    "float": "float32",
    "long": "int64",
    "integer": "int32",
    "boolean": "bool",
    "string": "string",
}
"""MLflow column type -> Arrow type name. Others (``binary``, ``datetime``, arrays, objects) are refused
at load with a message naming the column, until JSON has an agreed way to carry them."""

V2_DATATYPES: dict[str, str] = {
    "double": "FP64",
    "float": "FP32",
    "long": "INT64",
    "integer": "INT32",
    "boolean": "BOOL",
    "string": "BYTES",
}
"""The Open Inference Protocol datatype of each column type (one 1-D tensor per column)."""


class UnsupportedSignature(ValueError):
    """The signature cannot be served (tensor inputs, unnamed columns, a type JSON cannot carry)."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    """An MLflow column type, one of :data:`TYPES`."""
    required: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "required": self.required}


def columns_from(inputs: Sequence[Mapping[str, Any]]) -> list[Column]:
    """Columns of an MLflow input schema in its JSON form (``Schema.to_dict()``, as ``MLmodel`` stores it).

    Raises :class:`UnsupportedSignature` naming what cannot be served.
    """
    if not inputs:
        raise UnsupportedSignature("the signature has no inputs")
    columns: list[Column] = []
    for i, spec in enumerate(inputs):
        kind, name = spec.get("type"), spec.get("name")
        if kind == "tensor":
            raise UnsupportedSignature("the signature takes tensors, not named columns: log it with a column signature")
        if not isinstance(name, str) or not name:
            raise UnsupportedSignature(f"input {i} has no name: Tandem takes named columns")
        if kind not in TYPES:
            raise UnsupportedSignature(
                f"column {name!r} has type {kind!r}; Tandem takes {', '.join(TYPES)} columns over JSON"
            )
        columns.append(Column(name, str(kind), bool(spec.get("required", True))))
    if len({c.name for c in columns}) != len(columns):
        raise UnsupportedSignature("the signature names a column twice")
    return columns


def arrow_schema(columns: Sequence[Column]) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([pa.field(c.name, pa.type_for_alias(TYPES[c.type]), nullable=not c.required) for c in columns])


def to_record_batch(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.RecordBatch:
    """One record batch of validated rows (each a mapping with every column, ``None`` for a null)."""
    import pyarrow as pa

    arrays = [pa.array([row[f.name] for row in rows], type=f.type) for f in schema]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
