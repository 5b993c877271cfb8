"""`RemotePolicy`: the ``infer(obs) -> dict`` contract over TCP to a `magma_ros.serve.server`.

Blocking, standard library + msgpack + numpy only (no torch on the robot side). Connects lazily,
reconnects on the next call after a disconnect, and raises a clear error on timeout, disconnect or
a server-side error. Thread-safe (one request at a time per client).
"""

from __future__ import annotations

import socket
import threading
import time

from magma_ros.serve import validate_observation
from magma_ros.serve.wire import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    WireError,
    WireLimits,
    packb,
    recv_frame,
    send_frame,
    unpackb,
)


class RemotePolicyError(RuntimeError):
    """The policy server could not be reached, timed out, dropped the connection or replied with an error."""


class PolicyTimeout(RemotePolicyError, TimeoutError):
    """No reply within the client's timeout."""


class RemotePolicy:
    """Client for the policy server; same ``infer(obs) -> dict`` as `MagmaPolicy`.

    ``timeout`` bounds each request (seconds, including inference); ``connect_timeout`` bounds the
    TCP connect and the server's greeting. ``step_period`` and ``metadata`` come from the server.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8765, timeout: float = 10.0,
                 connect_timeout: float = 5.0, limits: WireLimits = DEFAULT_LIMITS):
        if not timeout > 0 or not connect_timeout > 0:
            raise ValueError("timeouts must be > 0 s")
        self.host, self.port = host, int(port)
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self.limits = limits
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._next_id = 0
        self.metadata: dict = {}

    # ------------------------------------------------------------------ connection
    def _where(self) -> str:
        return f"policy server {self.host}:{self.port}"

    def connect(self) -> dict:
        """Open the connection (done lazily by the first request); returns the server's metadata."""
        with self._lock:
            return self._connect()

    def _connect(self) -> dict:
        if self._sock is not None:
            return self.metadata
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except TimeoutError:
            msg = f"{self._where()}: connect timed out after {self.connect_timeout:.1f} s"
            raise PolicyTimeout(msg) from None
        except OSError as e:
            raise RemotePolicyError(f"{self._where()}: cannot connect ({e.strerror or e})") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            meta = unpackb(recv_frame(sock, self.limits), self.limits)
        except TimeoutError:
            sock.close()
            raise PolicyTimeout(f"{self._where()}: no greeting within {self.connect_timeout:.1f} s") from None
        except (ConnectionError, OSError, WireError) as e:
            sock.close()
            raise RemotePolicyError(f"{self._where()}: bad greeting ({e})") from None
        if not isinstance(meta, dict) or meta.get("type") != "metadata":
            sock.close()
            raise RemotePolicyError(f"{self._where()}: not a magma_ros policy server")
        if meta.get("protocol") != PROTOCOL_VERSION:
            sock.close()
            raise RemotePolicyError(f"{self._where()}: protocol {meta.get('protocol')} != {PROTOCOL_VERSION}")
        self._sock, self.metadata = sock, meta
        return meta

    def close(self) -> None:
        """Close the connection (a later request reconnects)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def _request(self, msg: dict):
        with self._lock:
            self._connect()
            self._next_id += 1
            msg = dict(msg, id=self._next_id)
            try:
                payload = packb(msg)
            except WireError as e:
                raise ValueError(f"cannot send observation: {e}") from None
            t0 = time.monotonic()
            try:
                self._sock.settimeout(self.timeout)
                send_frame(self._sock, payload)
                while True:
                    left = self.timeout - (time.monotonic() - t0)
                    if left <= 0:
                        raise TimeoutError()
                    self._sock.settimeout(left)
                    reply = unpackb(recv_frame(self._sock, self.limits), self.limits)
                    if isinstance(reply, dict) and reply.get("id") in (msg["id"], None):
                        break  # replies to older, timed-out requests are skipped
            except TimeoutError:
                self._drop()  # a late reply would desynchronize the stream
                raise PolicyTimeout(f"{self._where()}: no reply within {self.timeout:.1f} s") from None
            except (ConnectionError, OSError) as e:
                self._drop()
                raise RemotePolicyError(f"{self._where()}: connection lost ({e})") from None
            except WireError as e:
                self._drop()
                raise RemotePolicyError(f"{self._where()}: malformed reply ({e})") from None
        if not reply.get("ok"):
            raise RemotePolicyError(f"{self._where()}: {reply.get('error', 'unknown error')}")
        return reply.get("result")

    def infer(self, obs: dict) -> dict:
        """Send one observation, return the action result. ValueError for a malformed observation."""
        validate_observation(obs)
        return self._request({"type": "infer", "obs": obs})

    def infer_batch(self, observations: list[dict]) -> list[dict]:
        """Several observations in one request (served in one batch when they fit)."""
        for o in observations:
            validate_observation(o)
        return self._request({"type": "infer_batch", "obs": list(observations)})

    def reset(self, robot_id: str | None = None) -> None:
        """Forget per-arm state on the server (sticky gripper) for one arm, or all arms."""
        self._request({"type": "reset", "robot_id": robot_id})

    def ping(self) -> float:
        """Round-trip time (s) of an empty request."""
        t0 = time.perf_counter()
        self._request({"type": "ping"})
        return time.perf_counter() - t0

    @property
    def step_period(self) -> float:
        """Seconds per action, as the server's statistics say (connects if needed)."""
        if not self.metadata:
            self.connect()
        try:
            return float(self.metadata["step_period"])
        except (KeyError, TypeError, ValueError):
            raise RemotePolicyError(f"{self._where()}: server did not report a step_period") from None
