"""The Open Inference Protocol for a version described by its MLflow signature: one 1-D tensor per
column (``FP64`` for ``double``, ``BYTES`` for ``string``...), as MLServer's pandas codec and
``tritonclient`` send a frame. The tensors become instances, which then go the way of ``/predict``'s
(validated against the signature, packed as an Arrow table), so both routes accept exactly the same
values and give the same answers. JSON data only: the binary extension's ``BYTES`` layout buys nothing
for the few columns of a tabular request.
"""

from __future__ import annotations

from typing import Any

from shared.errors import InvalidInput, TooLarge
from shared.signature import V2_DATATYPES, columns_from


def decode_columns(header: dict[str, Any], binary: bytes, desc: dict[str, Any], max_rows: int) -> list[dict[str, Any]]:
    """The request's column tensors as instances (one mapping per row); every name, datatype and length
    checked against the signature in ``desc``. Values themselves are checked by the instance validator."""
    columns = {c.name: c for c in columns_from(desc["signature"])}
    inputs = header["inputs"]
    if binary:
        raise InvalidInput("body: binary tensor data is not taken for a model described by a signature; send JSON data")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput(f"inputs: expected one tensor per column ({', '.join(columns)})")
    data: dict[str, list[Any]] = {}
    rows: int | None = None
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict):
            raise InvalidInput(f"{where}: expected a tensor object")
        name = tensor.get("name")
        column = columns.get(name) if isinstance(name, str) else None
        if column is None:
            raise InvalidInput(f"{where}.name: unknown column {name!r}; the model takes {', '.join(columns)}")
        if name in data:
            raise InvalidInput(f"{where}.name: column {name!r} given twice")
        if tensor.get("datatype") != V2_DATATYPES[column.type]:
            want = V2_DATATYPES[column.type]
            raise InvalidInput(
                f"{where}: datatype {tensor.get('datatype')!r}, expected {want!r} ({column.type} column)"
            )
        shape = tensor.get("shape")
        if not (isinstance(shape, list) and shape and type(shape[0]) is int and all(d == 1 for d in shape[1:])):
            raise InvalidInput(f"{where}: shape {shape!r}, expected [n] (one value per row)")
        values = tensor.get("data")
        if not isinstance(values, list) or len(values) != shape[0] or any(isinstance(v, list) for v in values):
            raise InvalidInput(f"{where}.data: expected a flat list of {shape[0]} values")
        if rows is not None and shape[0] != rows:
            raise InvalidInput(f"{where}: {shape[0]} rows, the other columns have {rows}")
        rows = shape[0]
        data[name] = values
    if not rows:
        raise InvalidInput("inputs: at least one row is required")
    if rows > max_rows:
        raise TooLarge(f"inputs: {rows} rows, at most {max_rows} per request")
    return [{name: values[r] for name, values in data.items()} for r in range(rows)]
