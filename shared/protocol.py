"""The wire protocol between app servers and workers (docs/architecture.md, "The wire").

A message is a ZeroMQ multipart: frame 0 is a msgpack header, frames 1..n are the raw bytes of the
tensors the header describes (``inputs`` on a request, ``outputs`` on a reply), in order. Tensors never
go through msgpack or pickle, so a receiver rebuilds them with ``np.frombuffer`` without a copy.
Besides numbers and booleans, a tensor may hold fixed-width unicode (dtype ``U<n>``: string outputs such
as class labels), and an input may be a *table*: one Arrow IPC stream holding a record batch (dtype
``arrow``), the columns of a model described by an MLflow signature (``shared.signature``).

Several messages may travel in one *batch envelope* (:func:`pack_batch`, opened by :func:`split`): a
header ``{"v": 1, "kind": "batch", "frames": [n1, n2, ...]}`` followed by each message's frames. App
servers put the requests that leave in the same event-loop turn into one envelope, and a worker
answers a batch's requests from one app server in one, when they asked for it (``batch_replies``).
ZeroMQ, pyzmq and the event loop then pay their per-message costs once per envelope.

Every parse failure raises :class:`~shared.errors.ProtocolError`, carrying the message id when the
header got that far, so a reader can always answer instead of crashing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack
import numpy as np

from shared.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_DIMS = 8

# dtypes a tensor may have on the wire: what ONNX Runtime and TorchScript take as plain buffers.
DTYPES: frozenset[str] = frozenset(
    ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"]
)
_NAMES: dict[np.dtype, str] = {np.dtype(name): name for name in DTYPES}
"""Wire name of each allowed dtype: ``dtype.name`` runs Python code in numpy, on every tensor sent."""
_NUMPY: dict[str, np.dtype] = {name: np.dtype(name) for name in DTYPES}
ARROW = "arrow"
"""dtype of a table: the frame is an Arrow IPC stream of one record batch; ``shape`` is ``[rows]``."""
MAX_STRING_CHARS = 1 << 16
"""Widest unicode tensor element (``U<n>``) a receiver accepts."""


def wire_dtype(dtype: np.dtype) -> str | None:
    """The wire name of ``dtype`` (native byte order), or ``None`` where the wire cannot carry it."""
    name = _NAMES.get(dtype)
    if name is None and dtype.kind == "U" and dtype.byteorder in "=|<" and 0 < dtype.itemsize // 4 <= MAX_STRING_CHARS:
        name = f"U{dtype.itemsize // 4}"
    return name


class Kind(StrEnum):
    INFER = "infer"
    PING = "ping"
    DESCRIBE = "describe"
    CANCEL = "cancel"


class Status(StrEnum):
    OK = "ok"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    VERSION_UNAVAILABLE = "version_unavailable"
    BAD_REQUEST = "bad_request"
    ERROR = "error"
    MODEL_NOT_FOUND = "model_not_found"
    """This worker does not serve the model named in the request (it may have just left the set)."""
    MODEL_LOADING = "model_loading"
    """The model is not in memory here and cannot be loaded within the request's budget; the reply's
    ``retry_after_ms`` says when it should be."""


Frame = bytes | memoryview

BATCH = "batch"
"""``kind`` of a batch envelope; not a :class:`Kind`, since it is opened before a message is handled."""


@dataclass(slots=True)
class Message:
    """A parsed message: its header (tensor descriptors removed) and its tensors by name."""

    header: dict[str, Any]
    tensors: dict[str, Any] = field(default_factory=dict)
    """Arrays by name; a table input (dtype ``arrow``) is a ``pyarrow.RecordBatch``."""
    received: float = 0.0
    """When a reply reached the app server (its ``time.monotonic()``; 0 where nobody stamped it): the
    time from there to the awaiting request resuming is the app server's own, not the worker's."""

    @property
    def id(self) -> str:
        return str(self.header.get("id", ""))


def _tensor_frame(array: np.ndarray) -> memoryview:
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat.view(np.uint8).data


def _table_frame(batch: Any) -> memoryview:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return memoryview(sink.getvalue())


def _table(name: Any, shape: Any, buf: memoryview) -> Any:
    import pyarrow as pa

    if not isinstance(shape, list) or len(shape) != 1 or not isinstance(shape[0], int):
        raise ProtocolError(f"table {name!r}: bad shape {shape!r}")
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(buf))  # numeric columns stay views of the frame
        batch = reader.read_next_batch()
    except Exception as exc:
        raise ProtocolError(f"table {name!r}: not an Arrow IPC stream ({exc.__class__.__name__})") from None
    if batch.num_rows != shape[0]:
        raise ProtocolError(f"table {name!r}: {batch.num_rows} rows, descriptor says {shape[0]}")
    return batch


def pack(
    header: Mapping[str, Any], tensors: Mapping[str, np.ndarray] | None = None, *, field_name: str = "inputs"
) -> list[Frame]:
    """Frames for ``header`` plus ``tensors``; the header gains ``v`` and the tensor descriptors."""
    head = dict(header)
    head["v"] = PROTOCOL_VERSION
    frames: list[Frame] = []
    descriptors = []
    for name, array in (tensors or {}).items():
        if not isinstance(array, np.ndarray):  # a table (pyarrow.RecordBatch)
            descriptors.append({"name": name, "dtype": ARROW, "shape": [array.num_rows]})
            frames.append(_table_frame(array))
            continue
        dtype = _NAMES.get(array.dtype) or wire_dtype(array.dtype)
        if dtype is None and (native := array.dtype.newbyteorder("=")) in _NAMES:
            array = array.astype(native)  # the wire carries native byte order; a swapped array is converted
            dtype = _NAMES[native]
        if dtype is None:
            raise ProtocolError(f"tensor {name!r}: unsupported dtype {array.dtype.name}")
        descriptors.append({"name": name, "dtype": dtype, "shape": list(array.shape)})
        frames.append(_tensor_frame(array))
    head[field_name] = descriptors
    return [msgpack.packb(head, use_bin_type=True), *frames]


def _buffer(frame: Any) -> memoryview:
    # zmq.Frame (received with copy=False) exposes .buffer; bytes and memoryview pass through.
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _header(frame: Any) -> Any:
    try:
        return msgpack.unpackb(_buffer(frame), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not msgpack: {exc.__class__.__name__}") from None


def pack_batch(messages: Sequence[Sequence[Frame]]) -> list[Frame]:
    """Several messages (each as :func:`pack` made it) in one ZeroMQ message."""
    head = msgpack.packb({"v": PROTOCOL_VERSION, "kind": BATCH, "frames": [len(m) for m in messages]})
    out: list[Frame] = [head]
    for m in messages:
        out.extend(m)
    return out


def split(frames: Sequence[Any]) -> list[tuple[dict[str, Any] | None, Sequence[Any]]]:
    """The messages in ``frames``, each with its header already parsed (``None`` where it does not
    parse, for :func:`unpack` to report): ``frames`` itself, or every message of a batch envelope.

    Raises ProtocolError for a malformed envelope; a bad message inside a good envelope is left for
    its own parse to report, so its neighbours are still answered.
    """
    if not frames:
        raise ProtocolError("empty message")
    try:
        header = _header(frames[0])
    except ProtocolError:
        return [(None, frames)]
    if not isinstance(header, dict) or header.get("kind") != BATCH:
        return [(header if isinstance(header, dict) else None, frames)]
    counts = header.get("frames")
    if (
        header.get("v") != PROTOCOL_VERSION
        or not isinstance(counts, list)
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts)
        or sum(counts) != len(frames) - 1
    ):
        raise ProtocolError(f"malformed batch envelope: frame counts {counts!r:.80} for {len(frames) - 1} frames")
    out: list[tuple[dict[str, Any] | None, Sequence[Any]]] = []
    start = 1
    for count in counts:
        sub = frames[start : start + count]
        start += count
        try:
            head = _header(sub[0])
        except ProtocolError:
            head = None
        out.append((head if isinstance(head, dict) else None, sub))
    return out


def unpack(frames: Sequence[Any], *, field_name: str = "inputs", header: dict[str, Any] | None = None) -> Message:
    """Parse frames from :func:`pack` (``header``: frame 0, when :func:`split` parsed it already).
    Raises ProtocolError on anything malformed."""
    if not frames:
        raise ProtocolError("empty message")
    if header is None:
        header = _header(frames[0])
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    msg_id = header.get("id")
    if header.get("v") != PROTOCOL_VERSION:
        raise _with_id(ProtocolError(f"unsupported protocol version {header.get('v')!r}"), msg_id)
    descriptors = header.pop(field_name, None) or []
    if not isinstance(descriptors, list) or len(descriptors) != len(frames) - 1:
        raise _with_id(
            ProtocolError(
                f"header describes {len(descriptors) if isinstance(descriptors, list) else '?'} tensors, "
                f"message has {len(frames) - 1}"
            ),
            msg_id,
        )
    tensors: dict[str, np.ndarray] = {}
    for desc, frame in zip(descriptors, frames[1:], strict=True):
        try:
            tensors[desc["name"]] = _tensor(desc, _buffer(frame))
        except ProtocolError as exc:
            raise _with_id(exc, msg_id) from None
        except Exception:
            raise _with_id(ProtocolError(f"bad tensor descriptor {desc!r:.200}"), msg_id) from None
    return Message(header, tensors)


def _tensor(desc: Mapping[str, Any], buf: memoryview) -> Any:
    name, dtype, shape = desc["name"], desc["dtype"], desc["shape"]
    if dtype == ARROW and isinstance(name, str):
        return _table(name, shape, buf)
    np_dtype = _NUMPY.get(dtype) if isinstance(dtype, str) else None
    unicode = np_dtype is None and isinstance(dtype, str) and dtype[:1] == "U" and dtype[1:].isdigit()
    if unicode and 0 < int(dtype[1:]) <= MAX_STRING_CHARS:
        np_dtype = np.dtype(dtype)
    if not isinstance(name, str) or np_dtype is None:
        raise ProtocolError(f"tensor {name!r}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}")
    expected = np_dtype.itemsize
    for d in shape:
        expected *= d
    if buf.nbytes != expected:
        raise ProtocolError(f"tensor {name!r}: {buf.nbytes} bytes, shape {shape} needs {expected}")
    return np.frombuffer(buf, dtype=np_dtype).reshape(shape)


def _with_id(exc: ProtocolError, msg_id: Any) -> ProtocolError:
    exc.msg_id = msg_id if isinstance(msg_id, str) else None  # type: ignore[attr-defined]
    return exc


def protocol_error_id(exc: ProtocolError) -> str | None:
    return getattr(exc, "msg_id", None)


# Convenience constructors: the header fields of every message kind in one place.


def request(
    kind: Kind,
    msg_id: str,
    *,
    model: str = "",
    version: str | None = None,
    budget_ms: float = 0.0,
    inputs: Mapping[str, np.ndarray] | None = None,
    **extra: Any,
) -> list[Frame]:
    header = {
        "kind": str(kind),
        "id": msg_id,
        "budget_ms": float(budget_ms),
        "model": model,
        "version": version,
        **extra,
    }
    return pack(header, inputs, field_name="inputs")


def reply(
    msg_id: str | None,
    status: Status,
    *,
    message: str = "",
    version: str | None = None,
    outputs: Mapping[str, np.ndarray] | None = None,
    timing: Mapping[str, float] | None = None,
    **extra: Any,
) -> list[Frame]:
    header = {
        "id": msg_id,
        "status": str(status),
        "message": message,
        "version": version,
        "timing": dict(timing or {}),
        **extra,
    }
    return pack(header, outputs, field_name="outputs")


def parse_request(frames: Sequence[Any], header: dict[str, Any] | None = None) -> Message:
    msg = unpack(frames, field_name="inputs", header=header)
    if msg.header.get("kind") not in Kind.__members__.values():
        raise _with_id(ProtocolError(f"unknown kind {msg.header.get('kind')!r}"), msg.header.get("id"))
    if not isinstance(msg.header.get("id"), str):
        raise ProtocolError("message id must be a string")
    return msg


def parse_reply(frames: Sequence[Any], header: dict[str, Any] | None = None) -> Message:
    return unpack(frames, field_name="outputs", header=header)
