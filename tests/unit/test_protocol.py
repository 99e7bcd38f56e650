"""Wire protocol: the frame layout is a tested contract."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from shared import protocol
from shared.errors import ProtocolError
from shared.protocol import DTYPES, Kind, Status
from shared.signature import arrow_schema, columns_from, to_record_batch


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_every_supported_dtype_round_trips(dtype):
    rng = np.random.default_rng(0)
    x = (rng.random((3, 5)) * 100).astype(dtype)
    frames = protocol.request(Kind.INFER, "m1", model="demo", version="2", budget_ms=50, inputs={"input": x})
    assert len(frames) == 2
    msg = protocol.parse_request(frames)
    assert msg.id == "m1"
    assert msg.header["kind"] == "infer" and msg.header["version"] == "2" and msg.header["budget_ms"] == 50
    got = msg.tensors["input"]
    assert got.dtype == x.dtype and got.shape == x.shape
    np.testing.assert_array_equal(got, x)


def test_non_contiguous_empty_and_many_tensors():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {"strided": base[:, ::2], "empty": np.zeros((0, 6), np.float32), "scalar": np.array(7, np.int64)}
    frames = protocol.reply("r", Status.OK, version="1", outputs=tensors)
    assert len(frames) == 4
    msg = protocol.parse_reply(frames)
    np.testing.assert_array_equal(msg.tensors["strided"], base[:, ::2])
    assert msg.tensors["empty"].shape == (0, 6)
    assert msg.tensors["scalar"] == 7
    assert msg.header["status"] == "ok" and "outputs" not in msg.header


def test_received_zmq_style_memoryviews_are_not_copied():
    x = np.arange(10, dtype=np.float32)
    frames = [bytes(f) for f in protocol.request(Kind.INFER, "z", inputs={"x": x})]
    msg = protocol.parse_request([memoryview(f) for f in frames])
    assert not msg.tensors["x"].flags.owndata  # a view on the received buffer


@pytest.mark.parametrize("dtype", [">f4", ">i8", ">f2", "<f8"])
def test_arrays_in_either_byte_order_arrive_with_their_values(dtype):
    x = np.array([[1.5, -2.0, 3.25]]).astype(dtype)
    msg = protocol.parse_request(protocol.request(Kind.INFER, "b", inputs={"x": x}))
    got = msg.tensors["x"]
    assert got.dtype.isnative and got.dtype.name == x.dtype.name
    np.testing.assert_array_equal(got, x)


def test_unsupported_dtype_is_refused_when_packing():
    with pytest.raises(ProtocolError, match="unsupported dtype"):
        protocol.request(Kind.INFER, "x", inputs={"s": np.array([{"a": 1}], dtype=object)})


def test_unicode_tensors_and_arrow_tables_round_trip():
    """Class labels travel as fixed-width unicode; signature models' inputs as one Arrow record batch."""
    labels = np.array(["fraud", "ok", ""])
    got = protocol.parse_reply(_bytes(protocol.reply("r", Status.OK, outputs={"label": labels})))
    np.testing.assert_array_equal(got.tensors["label"], labels)
    schema = arrow_schema(columns_from([{"type": "double", "name": "x"}, {"type": "string", "name": "c"}]))
    table = to_record_batch([{"x": 1.5, "c": "a"}, {"x": -2.0, "c": None}], schema)
    msg = protocol.parse_request(_bytes(protocol.request(Kind.INFER, "q", inputs={"t": table})))
    assert msg.tensors["t"].equals(table)


@pytest.mark.parametrize(
    ("dtype", "shape", "payload"),
    [("arrow", [2], b"not arrow"), ("U0", [1], b""), ("U99999999", [1], b"x"), ("Ufoo", [1], b"x")],
)
def test_malformed_tables_and_strings_are_protocol_errors(dtype, shape, payload):
    head = _header(inputs=[{"name": "t", "dtype": dtype, "shape": shape}])
    with pytest.raises(ProtocolError):
        protocol.parse_request([head, payload])


def _bytes(frames):
    return [bytes(f) for f in frames]


def _header(**fields):
    return msgpack.packb({"v": 1, "kind": "infer", "id": "abc", **fields})


@pytest.mark.parametrize(
    ("frames", "match", "has_id"),
    [
        ([], "empty message", False),
        ([b"\xc1\xff garbage"], "not msgpack", False),
        ([msgpack.packb([1, 2])], "not a map", False),
        ([msgpack.packb({"v": 2, "kind": "ping", "id": "abc"})], "unsupported protocol version", True),
        ([msgpack.packb({"kind": "ping", "id": "abc"})], "unsupported protocol version", True),
        (
            [_header(inputs=[{"name": "x", "dtype": "float32", "shape": [2]}])],
            "describes 1 tensors, message has 0",
            True,
        ),
        ([_header(inputs=[{"name": "x", "dtype": "float32", "shape": [2]}]), b"\x00" * 7], "7 bytes", True),
        ([_header(inputs=[{"name": "x", "dtype": "object", "shape": [1]}]), b"\x00" * 8], "unsupported dtype", True),
        ([_header(inputs=[{"name": "x", "dtype": "float32", "shape": [-1]}]), b""], "bad shape", True),
        ([_header(inputs=[{"nom": "x"}]), b""], "bad tensor descriptor", True),
        ([msgpack.packb({"v": 1, "kind": "dance", "id": "abc"})], "unknown kind", True),
    ],
)
def test_malformed_messages_raise_protocol_error_keeping_the_id(frames, match, has_id):
    with pytest.raises(ProtocolError, match=match) as info:
        protocol.parse_request(frames)
    assert protocol.protocol_error_id(info.value) == ("abc" if has_id else None)


def test_truncated_frames_are_errors_not_crashes():
    good = [bytes(f) for f in protocol.request(Kind.INFER, "t", inputs={"x": np.ones((4, 4), np.float32)})]
    for cut in range(len(good[0])):
        with pytest.raises(ProtocolError):
            protocol.parse_request([good[0][:cut], good[1]])


def test_a_batch_envelope_splits_into_its_messages_with_parsed_headers():
    messages = [protocol.request(Kind.INFER, f"m{i}", inputs={"x": np.full((1, 3), i, np.float32)}) for i in range(3)]
    messages.append(protocol.request(Kind.PING, "p"))  # no tensors: one frame
    parts = protocol.split([bytes(f) for f in protocol.pack_batch(messages)])
    assert [header["id"] for header, _ in parts] == ["m0", "m1", "m2", "p"]
    for i, (header, frames) in enumerate(parts[:3]):
        msg = protocol.parse_request(frames, header)
        np.testing.assert_array_equal(msg.tensors["x"], np.full((1, 3), i, np.float32))
    assert protocol.parse_request(*reversed(parts[3])).header["kind"] == "ping"


def test_an_ordinary_message_splits_into_itself():
    frames = protocol.request(Kind.INFER, "one", inputs={"x": np.ones((2, 2), np.float32)})
    [(header, same)] = protocol.split(frames)
    assert same is frames and header["id"] == "one"
    [(header, _)] = protocol.split([b"\xc1 not msgpack"])
    assert header is None  # left for parse_request to report


@pytest.mark.parametrize(
    "counts",
    [[3], [1, 1, 1], [0, 2], [-1, 3], ["2"], [True, 1], "2", None],
)
def test_malformed_envelopes_are_protocol_errors(counts):
    frames = [msgpack.packb({"v": 1, "kind": "batch", "frames": counts}), _header(), _header()]
    with pytest.raises(ProtocolError, match="malformed batch envelope"):
        protocol.split(frames)


def test_a_bad_message_inside_an_envelope_does_not_spoil_its_neighbours():
    good = protocol.request(Kind.INFER, "good", inputs={"x": np.ones((1, 2), np.float32)})
    parts = protocol.split(protocol.pack_batch([[b"\xc1 garbage"], good]))
    with pytest.raises(ProtocolError, match="not msgpack"):
        protocol.parse_request(parts[0][1], parts[0][0])
    assert protocol.parse_request(parts[1][1], parts[1][0]).id == "good"
