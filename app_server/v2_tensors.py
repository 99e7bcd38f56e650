"""The Open Inference Protocol's tensor format: reading an inference request's header and tensor, and
writing output tensors, as JSON data or with the binary-data extension (raw little-endian bytes after
the JSON header, whose length ``Inference-Header-Content-Length`` gives).

A tensor is checked against the version's signature here, before any worker is involved: a bad name,
datatype or shape is an :class:`~shared.errors.InvalidInput` (a 400 on these routes) that never costs a
worker a thing.
"""

from __future__ import annotations

import math
import re
import time
import zlib
from typing import Any

import numpy as np
import orjson
from fastapi import Request

from app_server.http_io import MAX_TIMEOUT_MS, budget_s, read_body
from shared.errors import InvalidInput, TooLarge

HEADER_LENGTH = "inference-header-content-length"
HEADER_SAFE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,254}[\x21-\x7e])?")
"""A request id that can be echoed as a header value as it is: printable ASCII, at most 256 characters."""
# v2 datatypes of the outputs a worker may return (numpy dtype name -> v2 name).
DATATYPES = {
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "bool": "BOOL",
}
_DECOMPRESS_WBITS = {"gzip": 31, "deflate": 15}


async def read_v2_body(request: Request, max_bytes: int) -> bytes:
    """The body, inflated when it is gzip or deflate (``Content-Encoding``), bounded either way."""
    body = await read_body(request, max_bytes)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in _DECOMPRESS_WBITS:  # tritonclient's request_compression_algorithm
        inflater = zlib.decompressobj(_DECOMPRESS_WBITS[encoding])
        try:
            body = bytearray(inflater.decompress(body, max_bytes + 1))
        except zlib.error as exc:
            raise InvalidInput(f"body: not valid {encoding} data ({exc})") from None
        if len(body) > max_bytes or inflater.unconsumed_tail:
            raise TooLarge(f"body: more than {max_bytes} bytes once decompressed")
    elif encoding != "identity":
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    return bytes(body)


def parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header of an inference request and the binary section that follows it (if any)."""
    if header_length is None:
        split = len(body)
    elif header_length.isascii() and header_length.isdigit() and int(header_length) <= len(body):
        split = int(header_length)
    else:
        raise InvalidInput(f"Inference-Header-Content-Length: {header_length!r} is not a length within the body")
    try:
        header = orjson.loads(body[:split])
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body: invalid JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidInput('body: expected an object with an "inputs" list')
    if not isinstance(header.get("id", ""), str):
        raise InvalidInput("id: expected a string")
    _parameters(header, "parameters")
    return header, body[split:]


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """``obj["parameters"]``: absent is empty; anything present but an object (null included) is refused,
    as the document says, rather than read as empty."""
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput(f"{where}: expected an object")
    return params


def _flag(params: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = params.get(key, default)
    if type(value) is not bool:
        raise InvalidInput(f"{where}.{key}: expected a boolean")
    return value


def _dim(d: Any) -> int | None:
    """A JSON integer (``2`` or ``2.0``: JSON Schema's integers both) as an int; None for anything else."""
    if type(d) is int:
        return d
    if type(d) is float and d.is_integer():
        return int(d)
    return None


def _holds_bool(data: list[Any]) -> bool:
    """Whether a (nested) data list holds a boolean, which numpy would silently read as 0 or 1."""
    stack = [data]
    while stack:
        for v in stack.pop():
            if v is True or v is False:
                return True
            if type(v) is list:
                stack.append(v)
    return False


def decode_input(header: dict[str, Any], binary: bytes, spec: dict[str, Any], max_rows: int) -> np.ndarray:
    """The one input tensor of a request as float32[n, width], checked against the version's signature."""
    inputs = header["inputs"]
    name = spec["name"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput(f"inputs: expected exactly one input tensor, {name!r}; got {len(inputs)}")
    (tensor,) = inputs
    where = f"inputs[0] ({tensor.get('name')!r})"
    if tensor.get("name") != name:
        raise InvalidInput(f"inputs[0].name: unknown input {tensor.get('name')!r}; the model takes {name!r}")
    if tensor.get("datatype") != spec["datatype"]:
        raise InvalidInput(f"{where}: datatype {tensor.get('datatype')!r}, expected {spec['datatype']!r}")
    width = spec["shape"][-1]
    raw_shape = tensor.get("shape")
    shape = [_dim(d) for d in raw_shape] if isinstance(raw_shape, list) else None
    if not (shape is not None and len(shape) == 2 and all(d is not None and d >= 0 for d in shape)):
        raise InvalidInput(f"{where}: shape {raw_shape!r}, expected [n, {width}] (n rows)")
    if shape[1] != width:
        raise InvalidInput(f"{where}: shape {shape}, expected [n, {width}]: each row has {width} values")
    if shape[0] == 0:
        raise InvalidInput(f"{where}: shape {shape}: at least one row is required")
    if shape[0] > max_rows:
        raise TooLarge(f"{where}: {shape[0]} rows, at most {max_rows} per request")
    count = math.prod(shape)  # type: ignore[arg-type]
    params = _parameters(tensor, f"{where}.parameters")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if size != count * 4 or len(binary) != size:
            raise InvalidInput(
                f"{where}: binary_data_size {size!r} with {len(binary)} bytes after the header; "
                f"shape {shape} of FP32 takes {count * 4}"
            )
        return np.frombuffer(binary, dtype="<f4").astype(np.float32, copy=False).reshape(shape)
    if binary:
        raise InvalidInput(f"body: {len(binary)} bytes of binary data that no input claims (binary_data_size)")
    if "data" not in tensor:
        raise InvalidInput(f"{where}: no data (a JSON 'data' list or the binary_data_size parameter)")
    data = tensor["data"]
    if not isinstance(data, list):
        raise InvalidInput(f"{where}: data must be a list of numbers")
    try:
        arr = np.asarray(data)
    except ValueError:  # ragged nesting
        raise InvalidInput(f"{where}: data is not a rectangular list of numbers") from None
    if arr.dtype.kind not in "iuf" or _holds_bool(data):
        raise InvalidInput(f"{where}: data must hold only numbers for datatype FP32")
    if arr.ndim > 2 or (arr.ndim == 2 and list(arr.shape) != shape):
        raise InvalidInput(f"{where}: data nested as {list(arr.shape)}; give it flat or as shape {shape}")
    if arr.size != count:
        raise InvalidInput(f"{where}: data has {arr.size} values, shape {shape} takes {count}")
    with np.errstate(over="ignore"):
        x = arr.astype(np.float32).reshape(shape)
    if not np.isfinite(x).all():  # JSON has no inf or NaN: this is a number float32 cannot hold
        raise InvalidInput(f"{where}: data holds a number beyond float32's range (about 3.4e38)")
    return x


def deadline_of(request: Request, header: dict[str, Any], default_ms: float) -> float:
    """``parameters.timeout`` (microseconds, as tritonclient's ``timeout=`` sends it) or ``X-Timeout-Ms``."""
    params = _parameters(header, "parameters")
    if "timeout" not in params:
        return time.monotonic() + budget_s(request, default_ms)
    timeout_us = params["timeout"]
    if type(timeout_us) not in (int, float) or not 0 < timeout_us <= MAX_TIMEOUT_MS * 1000:
        raise InvalidInput(f"parameters.timeout: expected microseconds in (0, {MAX_TIMEOUT_MS * 1000:.0f}]")
    return time.monotonic() + timeout_us / 1e6


def requested_outputs(header: dict[str, Any], known: list[str]) -> list[tuple[str, bool]]:
    """(name, binary) per output to return; all outputs when none are named (absent or empty)."""
    default_binary = _flag(_parameters(header, "parameters"), "binary_data_output", "parameters", False)
    wanted = header.get("outputs", [])
    if wanted == []:
        return [(n, default_binary) for n in known]
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise InvalidInput('outputs: expected a list of {"name": ...} objects')
    out = []
    for i, o in enumerate(wanted):
        if o.get("name") not in known:
            raise InvalidInput(f"outputs[{i}].name: unknown output {o.get('name')!r}; the model has {known}")
        parameters = _parameters(o, f"outputs[{i}].parameters")
        out.append((o["name"], _flag(parameters, "binary_data", f"outputs[{i}].parameters", default_binary)))
    return out


def render_outputs(reply: dict[str, np.ndarray], wanted: list[tuple[str, bool]]) -> tuple[list[dict[str, Any]], bytes]:
    """Output tensors in the v2 format, JSON data or (binary-data extension) raw little-endian bytes."""
    outputs, chunks = [], []
    for name, binary in wanted:
        arr = reply[name]
        entry: dict[str, Any] = {"name": name, "datatype": DATATYPES.get(arr.dtype.name, "BYTES"), "shape": arr.shape}
        if binary and arr.dtype.kind == "U":  # BYTES: each element's length (4 bytes) then its UTF-8
            raw = b"".join(len(b).to_bytes(4, "little") + b for b in (v.encode() for v in arr.ravel().tolist()))
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif binary:
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        outputs.append(entry)
    return outputs, b"".join(chunks)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def infer_body_schema(
    signature: dict[str, Any] | None, outputs: list[str] | None, max_rows: int | None
) -> dict[str, Any]:
    """JSON schema of an inference request in the JSON form, for one version's input ``signature`` and
    ``outputs`` (``None``: any model, as far as the body's form goes), at most ``max_rows`` rows.

    What JSON Schema cannot say: ``data`` holds exactly ``shape[0] * shape[1]`` numbers, or ``shape[0]``
    rows (the schema bounds the length between one row and ``max_rows`` rows, and a row's width). The
    binary-data extension (raw bytes after the JSON header, ``Inference-Header-Content-Length``) and
    ``Content-Encoding: gzip`` are described in words: neither is a body JSON Schema can describe.
    """
    number = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    if signature is None:
        width: dict[str, Any] = {"type": "integer", "minimum": 1}
        name: dict[str, Any] = {"type": "string"}
        datatype: dict[str, Any] = {"type": "string"}
        flat: dict[str, Any] = {"type": "array", "items": number, "minItems": 1}
        row: dict[str, Any] = {"type": "array", "items": number, "minItems": 1}
    else:
        w = signature["shape"][-1]
        width, name, datatype = {"const": w}, {"const": signature["name"]}, {"const": signature["datatype"]}
        flat = {"type": "array", "items": number, "minItems": w} | _at_most(w * max_rows if max_rows else None)
        row = {"type": "array", "items": number, "minItems": w, "maxItems": w}
    rows = {"type": "array", "items": row, "minItems": 1} | _at_most(max_rows)
    tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape", "data"],
        "properties": {
            "name": name,
            "datatype": datatype,
            "shape": {
                "type": "array",
                "prefixItems": [{"type": "integer", "minimum": 1} | _at_most(max_rows, "maximum"), width],
                "items": False,
                "minItems": 2,
                "description": "[rows, values per row]",
            },
            "data": {
                "anyOf": [flat, rows],
                "description": "shape[0] * shape[1] numbers in float32's range: flat and row-major, or as "
                "shape[0] rows of shape[1].",
            },
            "parameters": {"type": "object", "properties": {"binary_data_size": False}},
        },
    }
    output_name = {"type": "string"} if outputs is None else {"enum": outputs}
    flag = {"type": "boolean"}
    return {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string", "description": "Echoed in the answer."},
            "parameters": {
                "type": "object",
                "properties": {
                    "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT_MS * 1000,
                                "description": "Deadline budget in microseconds; wins over X-Timeout-Ms."},
                    "binary_data_output": {**flag, "description": "Every output as raw bytes after the JSON."},
                },
            },
            "inputs": {"type": "array", "items": tensor, "minItems": 1, "maxItems": 1},
            "outputs": {
                "type": "array",
                "description": "Outputs to return (absent or empty: all).",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": output_name,
                                   "parameters": {"type": "object", "properties": {"binary_data": flag}}},
                },
            },
        },
    }  # fmt: skip


def _at_most(bound: int | None, keyword: str = "maxItems") -> dict[str, int]:
    return {} if bound is None else {keyword: bound}
