"""Safe wire format: msgpack with numpy arrays exactly as openpi's ``msgpack_numpy`` encodes them.

An array travels as the map ``{b"__ndarray__": True, b"data": bytes, b"dtype": "<f4", b"shape":
[H, W, 3]}`` and a numpy scalar as ``{b"__npgeneric__": True, b"data": <python scalar>, b"dtype":
"<f4"}`` (openpi-client packs these keys as bytes; string keys are accepted too). Decoding accepts
only plain numeric and bool dtypes (no object, void, complex or string dtypes), checks that shape
and byte count agree and caps array sizes and list/map lengths, so a peer can send nothing
but data. Never pickle. The message size itself is capped by the WebSocket layer (``max_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

PROTOCOL_VERSION = 2  # 1 was the home-made TCP framing (gone)
_BASE = (np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64,
         np.float16, np.float32, np.float64)
ALLOWED_DTYPES = frozenset(np.dtype(t).str for t in _BASE) | frozenset(
    np.dtype(t).newbyteorder(">").str for t in _BASE if np.dtype(t).itemsize > 1)
_ND, _NG, _DATA, _DTYPE, _SHAPE = b"__ndarray__", b"__npgeneric__", b"data", b"dtype", b"shape"


class WireError(ValueError):
    """A message that is not valid under this format (the peer gets a one-line error)."""


@dataclass(frozen=True)
class WireLimits:
    """Caps applied while decoding (a hostile peer cannot make us allocate more)."""

    max_message_bytes: int = 32 * 1024 * 1024  # one message, bytes (a 1920x1080 RGB frame is 6.2 MB)
    max_array_bytes: int = 32 * 1024 * 1024  # one array's data, bytes
    max_ndim: int = 8  # dimensions per array
    max_items: int = 10_000  # entries per map/list


DEFAULT_LIMITS = WireLimits()


def _encode(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.str not in ALLOWED_DTYPES:
            raise WireError(f"cannot send arrays of dtype {obj.dtype}")
        return {_ND: True, _DATA: np.ascontiguousarray(obj).tobytes(), _DTYPE: obj.dtype.str,
                _SHAPE: list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.str not in ALLOWED_DTYPES:
            raise WireError(f"cannot send scalars of dtype {obj.dtype}")
        return {_NG: True, _DATA: obj.item(), _DTYPE: obj.dtype.str}
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise WireError(f"cannot send objects of type {type(obj).__name__}")


def _get(d: dict, key: bytes):
    v = d.get(key)
    return d.get(key.decode()) if v is None else v


def _dtype(d: dict) -> np.dtype:
    dtype = _get(d, _DTYPE)
    if isinstance(dtype, bytes):
        dtype = dtype.decode("ascii", "replace")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise WireError(f"array dtype {dtype!r} not allowed (plain numeric or bool only)")
    return np.dtype(dtype)


def _decoder(limits: WireLimits):
    def hook(d: dict):
        if _get(d, _ND) is True:
            dt, shape, data = _dtype(d), _get(d, _SHAPE), _get(d, _DATA)
            if (not isinstance(shape, list) or len(shape) > limits.max_ndim
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
                raise WireError(f"bad array shape {shape!r}")
            if not isinstance(data, bytes):
                raise WireError("array data must be bytes")
            n = float(np.prod(shape, dtype=np.float64)) * dt.itemsize  # float: no overflow on huge claims
            if n > limits.max_array_bytes:
                raise WireError(f"array of {n:.0f} bytes exceeds {limits.max_array_bytes}")
            if int(n) != len(data):
                raise WireError(f"array shape {shape} {dt.str} needs {int(n)} bytes, got {len(data)}")
            return np.frombuffer(data, dtype=dt).reshape(shape).astype(dt.newbyteorder("="), copy=True)
        if _get(d, _NG) is True:
            dt, data = _dtype(d), _get(d, _DATA)
            if isinstance(data, bytes) and len(data) == dt.itemsize:  # magma_ros protocol 1 form
                return np.frombuffer(data, dtype=dt)[0]
            if isinstance(data, (bool, int, float)):  # openpi's form: the Python value
                try:
                    return dt.type(data)
                except (OverflowError, ValueError):
                    raise WireError(f"scalar {data!r} does not fit {dt.str}") from None
            raise WireError("bad scalar data")
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
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("expected a binary message")
    if len(data) > limits.max_message_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds {limits.max_message_bytes}")
    try:
        return msgpack.unpackb(
            data, raw=False, object_hook=_decoder(limits), strict_map_key=False,
            max_bin_len=limits.max_array_bytes, max_str_len=limits.max_message_bytes,
            max_array_len=limits.max_items, max_map_len=limits.max_items, max_ext_len=0,
        )
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - msgpack raises many types on garbage; all mean "malformed"
        raise WireError(f"malformed message ({type(e).__name__}: {str(e)[:120]})") from None
