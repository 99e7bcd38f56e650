"""The Open Inference Protocol's tensor format: reading an inference request's header and tensor, and
writing output tensors, as JSON data or with the binary-data extension (raw little-endian bytes after
the JSON header, whose length ``Inference-Header-Content-Length`` gives).

A tensor is checked against the version's signature here, before any worker is involved: a bad name,
datatype or shape is an :class:`~shared.errors.InvalidInput` (a 400 on these routes) that never costs a
worker a thing.
"""

from __future__ import annotations

import math
import time
import zlib
from typing import Any

import numpy as np
import orjson
from fastapi import Request

from app_server.http_io import MAX_TIMEOUT_MS, budget_s, read_body
from shared.errors import InvalidInput, TooLarge

HEADER_LENGTH = "inference-header-content-length"
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
    if not isinstance(header.get("parameters") or {}, dict):
        raise InvalidInput("parameters: expected an object")
    return header, body[split:]


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
    shape = tensor.get("shape")
    width = spec["shape"][-1]
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d >= 0 for d in shape)):
        raise InvalidInput(f"{where}: shape {shape!r}, expected [n, {width}] (n rows)")
    if shape[1] != width:
        raise InvalidInput(f"{where}: shape {shape}, expected [n, {width}]: each row has {width} values")
    if shape[0] == 0:
        raise InvalidInput(f"{where}: shape {shape}: at least one row is required")
    if shape[0] > max_rows:
        raise TooLarge(f"{where}: {shape[0]} rows, at most {max_rows} per request")
    count = math.prod(shape)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput(f"{where}.parameters: expected an object")
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
    try:
        arr = np.asarray(tensor["data"])
    except ValueError:  # ragged nesting
        raise InvalidInput(f"{where}: data is not a rectangular list of numbers") from None
    if arr.dtype.kind not in "iuf":
        raise InvalidInput(f"{where}: data must hold only numbers for datatype FP32")
    if arr.size != count:
        raise InvalidInput(f"{where}: data has {arr.size} values, shape {shape} takes {count}")
    with np.errstate(over="ignore"):
        x = arr.astype(np.float32).reshape(shape)
    if not np.isfinite(x).all():  # JSON has no inf or NaN: this is a number float32 cannot hold
        raise InvalidInput(f"{where}: data holds a number beyond float32's range (about 3.4e38)")
    return x


def deadline_of(request: Request, header: dict[str, Any], default_ms: float) -> float:
    """``parameters.timeout`` (microseconds, as tritonclient's ``timeout=`` sends it) or ``X-Timeout-Ms``."""
    timeout_us = (header.get("parameters") or {}).get("timeout")
    if timeout_us is None:
        return time.monotonic() + budget_s(request, default_ms)
    if type(timeout_us) not in (int, float) or not 0 < timeout_us <= MAX_TIMEOUT_MS * 1000:
        raise InvalidInput(f"parameters.timeout: expected microseconds in (0, {MAX_TIMEOUT_MS * 1000:.0f}]")
    return time.monotonic() + timeout_us / 1e6


def requested_outputs(header: dict[str, Any], known: list[str]) -> list[tuple[str, bool]]:
    """(name, binary) per output to return; all outputs when none are named."""
    default_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    wanted = header.get("outputs")
    if wanted is None:
        return [(n, default_binary) for n in known]
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise InvalidInput('outputs: expected a list of {"name": ...} objects')
    out = []
    for i, o in enumerate(wanted):
        if o.get("name") not in known:
            raise InvalidInput(f"outputs[{i}].name: unknown output {o.get('name')!r}; the model has {known}")
        parameters = o.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput(f"outputs[{i}].parameters: expected an object")
        out.append((o["name"], bool(parameters.get("binary_data", default_binary))))
    return out


def render_outputs(reply: dict[str, np.ndarray], wanted: list[tuple[str, bool]]) -> tuple[list[dict[str, Any]], bytes]:
    """Output tensors in the v2 format, JSON data or (binary-data extension) raw little-endian bytes."""
    outputs, chunks = [], []
    for name, binary in wanted:
        arr = reply[name]
        entry: dict[str, Any] = {"name": name, "datatype": DATATYPES.get(arr.dtype.name, "BYTES"), "shape": arr.shape}
        if binary:
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        outputs.append(entry)
    return outputs, b"".join(chunks)
