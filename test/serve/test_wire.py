"""The msgpack-numpy codec: openpi's array encoding, only plain numeric dtypes, size caps, never pickle."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magma_ros.serve.wire import WireError, WireLimits, packb, unpackb


def test_round_trip_keeps_arrays_scalars_and_structure():
    rng = np.random.default_rng(0)
    msg = {
        "image": rng.integers(0, 256, (4, 5, 3), dtype=np.uint8),
        "f32": rng.standard_normal(7).astype(np.float32),
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "bool": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float64),
        "scalar": np.float32(1.5),
        "nested": [{"x": np.int64(3)}, "text", 1, 2.5, None, b"raw"],
        "tuple": (1, 2),
    }
    out = unpackb(packb(msg))
    for k in ("image", "f32", "bool", "empty"):
        assert out[k].dtype == msg[k].dtype and out[k].shape == msg[k].shape
        np.testing.assert_array_equal(out[k], msg[k])
    np.testing.assert_array_equal(out["big_endian"], msg["big_endian"])
    assert out["big_endian"].dtype.isnative
    assert out["scalar"] == np.float32(1.5) and out["scalar"].dtype == np.float32
    assert out["nested"][0]["x"] == 3 and out["nested"][1:] == ["text", 1, 2.5, None, b"raw"]
    assert out["tuple"] == [1, 2]
    out["image"][0, 0, 0] = 1  # decoded arrays are writable copies


def test_openpi_encoding_both_ways():
    """openpi's msgpack_numpy writes bytes keys and scalars as Python values; we read and write that form."""
    img = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    openpi_bytes = msgpack.packb({"image": {b"__ndarray__": True, b"data": img.tobytes(), b"dtype": "|u1",
                                            b"shape": (2, 4, 3)},
                                  "t": {b"__npgeneric__": True, b"data": 0.25, b"dtype": "<f8"},
                                  "prompt": "pick"})
    out = unpackb(openpi_bytes)
    np.testing.assert_array_equal(out["image"], img)
    assert out["t"] == 0.25 and out["t"].dtype == np.float64 and out["prompt"] == "pick"
    # what we send, read the way openpi's unpack_array reads it (bytes keys, np.ndarray(buffer=...))
    raw = msgpack.unpackb(packb({"a": np.float32([1, 2]), "s": np.int32(7)}))
    a = raw["a"]
    got = np.ndarray(buffer=a[b"data"], dtype=np.dtype(a[b"dtype"]), shape=a[b"shape"])
    np.testing.assert_array_equal(got, [1, 2])
    assert np.dtype(raw["s"][b"dtype"]).type(raw["s"][b"data"]) == 7


@pytest.mark.parametrize("arr", [np.array([object()], dtype=object), np.zeros(2, np.complex64),
                                 np.zeros(2, dtype="V4"), np.array(["ab"])])
def test_unsafe_or_unsupported_dtypes_are_never_sent(arr):
    with pytest.raises(WireError, match="dtype"):
        packb({"a": arr})


def test_unknown_objects_are_never_sent():
    with pytest.raises(WireError, match="type"):
        packb({"a": object()})


def _arr(dtype, shape, data):
    return msgpack.packb({"x": {b"__ndarray__": True, b"dtype": dtype, b"shape": shape, b"data": data}})


@pytest.mark.parametrize("payload,msg", [
    (_arr("|O", [1], b"\0" * 8), "not allowed"),
    (_arr("|V8", [1], b"\0" * 8), "not allowed"),
    (_arr("<c8", [1], b"\0" * 8), "not allowed"),
    (_arr("<U4", [1], b"\0" * 16), "not allowed"),
    (_arr("<f4", [2, 2], b"\0" * 12), "needs 16 bytes"),
    (_arr("<f4", [2**40, 2**40], b""), "exceeds"),
    (_arr("<f4", [-1], b""), "bad array shape"),
    (_arr("<f4", [1], "text"), "bytes"),
    (msgpack.packb({"__npgeneric__": True, "dtype": "|i1", "data": 1000}), "does not fit"),
    (b"\xc1", "malformed"),
    (msgpack.packb({"a": 1})[:-1], "malformed"),
])
def test_malformed_payloads_raise_wire_error(payload, msg):
    with pytest.raises(WireError, match=msg):
        unpackb(payload)


def test_size_caps():
    small = WireLimits(max_message_bytes=1000, max_array_bytes=100)
    with pytest.raises(WireError, match="exceeds"):
        unpackb(packb({"a": np.zeros(200, np.uint8)}), small)
    with pytest.raises(WireError, match="exceeds"):
        unpackb(b"\0" * 2000, small)
    with pytest.raises(WireError, match="binary"):
        unpackb("text")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_wire_error(data):
    try:
        unpackb(data)
    except WireError:
        pass
