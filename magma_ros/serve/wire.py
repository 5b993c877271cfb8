"""Safe wire format: msgpack with numpy arrays, in length-prefixed frames. Never pickle.

An array travels as the map ``{"__ndarray__": True, "dtype": "<f4", "shape": [H, W, 3], "data":
bytes}`` (like openpi's ``msgpack_numpy``); a numpy scalar as ``{"__npgeneric__": True, "dtype",
"data"}``. Decoding accepts only a whitelist of plain numeric dtypes (no object, void or string
dtypes), checks that shape and byte count agree and caps array and frame sizes, so a peer can
send nothing but data. A frame is a 4-byte big-endian payload length followed by the payload.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")  # payload length, bytes
ALLOWED_DTYPES = frozenset(np.dtype(t).str for t in (
    np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64,
    np.float16, np.float32, np.float64,
)) | frozenset(np.dtype(t).newbyteorder(">").str for t in (
    np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64, np.float16, np.float32, np.float64,
))


class WireError(ValueError):
    """A frame or message that is not valid under this format (the peer gets an error reply)."""


@dataclass(frozen=True)
class WireLimits:
    """Size caps applied while decoding (a hostile peer cannot make us allocate more)."""

    max_frame_bytes: int = 64 * 1024 * 1024  # one message, bytes (a 4K RGB frame is 25 MB)
    max_array_bytes: int = 64 * 1024 * 1024  # one array's data, bytes
    max_ndim: int = 8  # dimensions per array
    max_items: int = 100_000  # entries per map/list


DEFAULT_LIMITS = WireLimits()


def _encode(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.str not in ALLOWED_DTYPES:
            raise WireError(f"cannot send arrays of dtype {obj.dtype}")
        return {"__ndarray__": True, "dtype": obj.dtype.str, "shape": list(obj.shape),
                "data": np.ascontiguousarray(obj).tobytes()}
    if isinstance(obj, np.generic):
        if obj.dtype.str not in ALLOWED_DTYPES:
            raise WireError(f"cannot send scalars of dtype {obj.dtype}")
        return {"__npgeneric__": True, "dtype": obj.dtype.str, "data": obj.tobytes()}
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise WireError(f"cannot send objects of type {type(obj).__name__}")


def _decoder(limits: WireLimits):
    def hook(d: dict):
        if d.get("__ndarray__") is True:
            dtype, shape, data = d.get("dtype"), d.get("shape"), d.get("data")
            if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
                raise WireError(f"array dtype {dtype!r} not allowed")
            if (not isinstance(shape, list) or len(shape) > limits.max_ndim
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
                raise WireError(f"bad array shape {shape!r}")
            if not isinstance(data, bytes):
                raise WireError("array data must be bytes")
            dt = np.dtype(dtype)
            n = int(np.prod(shape, dtype=np.float64))  # float: no int overflow on huge claims
            if n * dt.itemsize > limits.max_array_bytes:
                raise WireError(f"array of {n * dt.itemsize} bytes exceeds {limits.max_array_bytes}")
            if n * dt.itemsize != len(data):
                raise WireError(f"array shape {shape} {dtype} needs {n * dt.itemsize} bytes, got {len(data)}")
            return np.frombuffer(data, dtype=dt).reshape(shape).astype(dt.newbyteorder("="), copy=True)
        if d.get("__npgeneric__") is True:
            dtype, data = d.get("dtype"), d.get("data")
            if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES or not isinstance(data, bytes):
                raise WireError(f"scalar dtype {dtype!r} not allowed")
            dt = np.dtype(dtype)
            if len(data) != dt.itemsize:
                raise WireError("scalar data has the wrong size")
            return np.frombuffer(data, dtype=dt)[0]
        return d

    return hook


def packb(obj) -> bytes:
    """Serialize ``obj`` (dicts, lists, str, bytes, numbers, numpy arrays/scalars) to msgpack bytes."""
    try:
        return msgpack.packb(obj, default=_encode, use_bin_type=True)
    except WireError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"cannot encode message: {e}") from e


def unpackb(data: bytes, limits: WireLimits = DEFAULT_LIMITS):
    """Deserialize msgpack bytes; any malformed or over-limit input raises WireError."""
    if len(data) > limits.max_frame_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds {limits.max_frame_bytes}")
    try:
        return msgpack.unpackb(
            data, raw=False, object_hook=_decoder(limits), strict_map_key=False,
            max_bin_len=limits.max_array_bytes, max_str_len=limits.max_frame_bytes,
            max_array_len=limits.max_items, max_map_len=limits.max_items, max_ext_len=0,
        )
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - msgpack raises many types on garbage; all mean "malformed"
        raise WireError(f"malformed message ({type(e).__name__}: {e})") from None


def frame(payload: bytes) -> bytes:
    """Length-prefixed frame around ``payload``."""
    return HEADER.pack(len(payload)) + payload


# ---------------------------------------------------------------------------------- asyncio


async def read_frame(reader: asyncio.StreamReader, limits: WireLimits = DEFAULT_LIMITS) -> bytes | None:
    """Next frame's payload, or None at a clean end of stream. WireError if the length is over the cap."""
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ConnectionError("connection closed inside a frame header") from None
    (n,) = HEADER.unpack(head)
    if n > limits.max_frame_bytes:
        raise WireError(f"frame of {n} bytes exceeds {limits.max_frame_bytes}")
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise ConnectionError("connection closed inside a frame") from None


async def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    """Write one frame and drain."""
    writer.write(frame(payload))
    await writer.drain()


# ---------------------------------------------------------------------------------- blocking


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed by the peer")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    """Blocking read of one frame (the socket's timeout applies to each recv)."""
    (n,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    if n > limits.max_frame_bytes:
        raise WireError(f"frame of {n} bytes exceeds {limits.max_frame_bytes}")
    return _recv_exactly(sock, n)


def send_frame(sock: socket.socket, payload: bytes) -> None:
    """Blocking write of one frame."""
    sock.sendall(frame(payload))
