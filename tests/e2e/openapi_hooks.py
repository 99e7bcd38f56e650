"""Schemathesis hooks (``schemathesis.toml`` loads this file): what the OpenAPI document states in words
because JSON Schema cannot, applied to the bodies the fuzzer generates as valid."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """A valid v2 inference body's ``data`` holds ``shape[0] * shape[1]`` numbers, or ``shape[0]`` rows:
    the document says so in words (the schema bounds the length, not the product). Repeat or cut the
    generated values (or rows) to that length; every value and both bounds stay valid. Negative cases
    are left as they are."""
    meta = case.meta
    path = case.operation.path
    if meta is None or not meta.generation.mode.is_positive or not path.endswith("/infer") or "{name}" in path:
        return case  # the templated routes' tensors are any model's: their sizes are not a model's
    try:
        tensor = case.body["inputs"][0]
        rows, width = (int(d) for d in tensor["shape"])
        data = list(tensor["data"])
    except (KeyError, IndexError, TypeError, ValueError):
        return case
    nested = bool(data) and isinstance(data[0], list)  # the schema's other form: shape[0] rows of shape[1]
    n = rows if nested else rows * width
    if data and len(data) != n:
        tensor["data"] = (data * (n // len(data) + 1))[:n]
    return case
