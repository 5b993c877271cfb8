"""`RemotePolicy`: the ``infer(obs) -> dict`` contract over WebSocket to `magma-ros serve`.

Blocking, ``websockets`` + msgpack + numpy only (no torch on the robot side). It speaks the
server's openpi protocol (``Authorization: Api-Key <token>``, metadata on connect, one message per
observation) and adds what a robot needs:

- a per-request ``timeout``: no answer in time raises `PolicyTimeout` and closes the connection,
  so a late answer is dropped (the server drops the request too once it sees the close); the
  policy node then publishes nothing and the safety node holds the arm;
- reconnection with exponential backoff: a call during the backoff fails at once (no pile-up);
- its ``robot_id`` (the policy node sends its namespace) on every observation, so per-arm state on
  the server stays apart and ``reset()`` touches only this arm;
- ``status()`` for ``/diagnostics`` (state, reconnects, timeouts, last error, round trip).

Thread-safe (one request at a time per client).
"""

from __future__ import annotations

import os
import ssl
import threading
import time

from magma_ros.core.policy_api import DEFAULT_ROBOT_ID, canonical_observation, validate_robot_id
from magma_ros.serve.auth import TOKEN_ENV
from magma_ros.serve.wire import DEFAULT_LIMITS, PROTOCOL_VERSION, WireError, WireLimits, packb, unpackb


class RemotePolicyError(RuntimeError):
    """The policy server could not be reached, dropped the connection or replied with an error."""


class PolicyTimeout(RemotePolicyError, TimeoutError):
    """No reply within the client's timeout."""


class AuthError(RemotePolicyError):
    """The server refused the token (close code 1008)."""


class RemotePolicy:
    """Client for the policy server; same ``infer(obs) -> dict`` as `MagmaPolicy`.

    ``token``: the shared secret (None: ``$MAGMA_ROS_TOKEN``; '' sends none). ``timeout`` bounds
    each request [s] (inference included); ``connect_timeout`` the TCP + TLS + WebSocket handshake
    and the metadata. ``tls``: ``wss://``; ``ca_file`` a CA bundle (or the server's self-signed
    certificate) to trust. ``backoff``/``max_backoff`` [s]: wait after a failed connect, doubling.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8765, *, token: str | None = None,
                 timeout: float = 10.0, connect_timeout: float = 5.0, robot_id: str = DEFAULT_ROBOT_ID,
                 tls: bool = False, ca_file: str | None = None, backoff: float = 0.2, max_backoff: float = 5.0,
                 limits: WireLimits = DEFAULT_LIMITS):
        if not timeout > 0 or not connect_timeout > 0:
            raise ValueError("timeouts must be > 0 s")
        if not 0 <= backoff <= max_backoff:
            raise ValueError("need 0 <= backoff <= max_backoff")
        self.host, self.port = host, int(port)
        self.token = os.environ.get(TOKEN_ENV, "") if token is None else str(token)
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self.robot_id = validate_robot_id(robot_id)
        self.tls = bool(tls or ca_file)
        self._ssl = None
        if self.tls:
            self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.limits = limits
        self._ws = None
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._next_backoff = self.backoff
        self.metadata: dict = {}
        self.state = "disconnected"  # connected | disconnected | backoff
        self.reconnects = 0  # successful connects after the first
        self.timeouts = 0
        self.failures = 0  # failed connects and lost connections
        self.last_error = ""
        self.last_rtt_s = float("nan")
        self._connected_once = False
        self._reset_pending = False  # reset() not yet delivered (server unreachable at the time)

    @property
    def url(self) -> str:
        """The server's ``ws://`` / ``wss://`` address."""
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}"

    def _where(self) -> str:
        return f"policy server {self.url}"

    # ------------------------------------------------------------------ connection
    def connect(self) -> dict:
        """Open the connection (done lazily by the first request); returns the server's metadata."""
        with self._lock:
            return self._connect()

    def _connect(self) -> dict:
        if self._ws is not None:
            return self.metadata
        now = time.monotonic()
        if now < self._retry_at:
            raise RemotePolicyError(f"{self._where()}: reconnecting in {self._retry_at - now:.1f} s "
                                    f"(last error: {self.last_error})")
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
        from websockets.sync.client import connect

        headers = {"Authorization": f"Api-Key {self.token}"} if self.token else None
        try:
            ws = connect(self.url, ssl=self._ssl, additional_headers=headers, open_timeout=self.connect_timeout,
                         max_size=self.limits.max_message_bytes, compression=None, proxy=None,
                         close_timeout=1.0)
        except TimeoutError:
            raise self._failed(PolicyTimeout(f"{self._where()}: connect timed out after "
                                             f"{self.connect_timeout:.1f} s")) from None
        except (OSError, InvalidHandshake, InvalidURI, ssl.SSLError) as e:
            raise self._failed(RemotePolicyError(f"{self._where()}: cannot connect ({_reason(e)})")) from None
        try:
            first = ws.recv(timeout=self.connect_timeout)
            meta = unpackb(first, self.limits) if isinstance(first, bytes) else first
        except TimeoutError:
            ws.close()
            raise self._failed(PolicyTimeout(f"{self._where()}: no metadata within "
                                             f"{self.connect_timeout:.1f} s")) from None
        except ConnectionClosed as e:
            raise self._failed(_closed_error(self._where(), e)) from None
        except (OSError, WireError) as e:
            ws.close()
            raise self._failed(RemotePolicyError(f"{self._where()}: bad metadata ({_reason(e)})")) from None
        if not isinstance(meta, dict) or meta.get("server") != "magma_ros":
            ws.close()
            raise self._failed(RemotePolicyError(f"{self._where()}: not a magma_ros policy server"))
        if meta.get("protocol") != PROTOCOL_VERSION:
            ws.close()
            raise self._failed(RemotePolicyError(f"{self._where()}: protocol {meta.get('protocol')} "
                                                 f"!= {PROTOCOL_VERSION}"))
        self._ws, self.metadata, self.state = ws, meta, "connected"
        self._next_backoff, self._retry_at = self.backoff, 0.0
        if self._connected_once:
            self.reconnects += 1
        self._connected_once = True
        return meta

    def _failed(self, err: RemotePolicyError) -> RemotePolicyError:
        """Record a failed connect: back off before the next attempt."""
        self.failures += 1
        self.last_error = str(err)
        self._retry_at = time.monotonic() + self._next_backoff
        self._next_backoff = min(self.max_backoff, max(self._next_backoff * 2, 0.05))
        self.state = "backoff"
        return err

    def _drop(self, why: str = "") -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
        self.state = "disconnected"
        if why:
            self.last_error = why

    def close(self) -> None:
        """Close the connection (a later request reconnects)."""
        with self._lock:
            self._drop()

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def _request(self, msg: dict):
        from websockets.exceptions import ConnectionClosed

        with self._lock:
            if self._ws is not None and self._ws.state.name != "OPEN":
                self._drop()  # the server closed it while we were quiet (idle timeout): reconnect now
            self._connect()
            try:
                payload = packb(msg)
            except WireError as e:
                raise ValueError(f"cannot send observation: {e}") from None
            t0 = time.monotonic()
            try:
                self._ws.send(payload)
                reply = self._ws.recv(timeout=self.timeout)
            except TimeoutError:
                self.timeouts += 1
                err = PolicyTimeout(f"{self._where()}: no reply within {self.timeout:.1f} s")
                self._drop(str(err))  # the late answer is dropped with the connection
                raise err from None
            except ConnectionClosed as e:
                err = _closed_error(self._where(), e)
                self.failures += 1
                self._drop(str(err))
                raise err from None
            except OSError as e:
                err = RemotePolicyError(f"{self._where()}: connection lost ({_reason(e)})")
                self.failures += 1
                self._drop(str(err))
                raise err from None
            self.last_rtt_s = time.monotonic() - t0
            if isinstance(reply, str):  # the server's one-line error
                self.last_error = reply
                raise RemotePolicyError(f"{self._where()}: {reply}")
            try:
                out = unpackb(reply, self.limits)
            except WireError as e:
                self._drop(str(e))
                raise RemotePolicyError(f"{self._where()}: malformed reply ({e})") from None
        if not isinstance(out, dict):
            raise RemotePolicyError(f"{self._where()}: reply is not a map")
        return out

    def infer(self, obs: dict) -> dict:
        """Send one observation, return the action result. ValueError for a malformed observation."""
        msg = canonical_observation(obs)  # checked before sending
        if "robot_id" not in obs:
            msg["robot_id"] = self.robot_id
        msg["timeout_s"] = self.timeout  # the server drops it unanswered once we have given up
        if self._reset_pending:  # a reset that could not be delivered goes first
            self._send_reset()
        return self._request(msg)

    def reset(self, robot_id: str | None = None) -> None:
        """Forget this arm's state on the server (sticky gripper). Only the own ``robot_id`` can be reset."""
        if robot_id is not None and robot_id != self.robot_id:
            raise ValueError(f"can only reset this client's own robot_id {self.robot_id!r}")
        self._reset_pending = True
        try:
            self._send_reset()
        except RemotePolicyError:
            pass  # still pending: sent before the next observation, so no action uses the old state

    def _send_reset(self) -> None:
        self._request({"type": "reset", "robot_id": self.robot_id})
        self._reset_pending = False

    def ping(self) -> float:
        """Round-trip time (s) of an empty request."""
        t0 = time.perf_counter()
        self._request({"type": "ping"})
        return time.perf_counter() - t0

    def status(self) -> dict:
        """Connection state for diagnostics (strings and numbers)."""
        return {"server": self.url, "state": self.state, "robot_id": self.robot_id,
                "reconnects": self.reconnects, "timeouts": self.timeouts, "failures": self.failures,
                "last_rtt_s": self.last_rtt_s, "last_error": self.last_error}

    @property
    def step_period(self) -> float:
        """Seconds per action, as the server's statistics say (connects if needed)."""
        if not self.metadata:
            self.connect()
        try:
            return float(self.metadata["step_period"])
        except (KeyError, TypeError, ValueError):
            raise RemotePolicyError(f"{self._where()}: server did not report a step_period") from None


def _reason(e: BaseException) -> str:
    return (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()[0][:200]


def _closed_error(where: str, e) -> RemotePolicyError:
    rcvd = getattr(e, "rcvd", None)
    code, reason = (rcvd.code, rcvd.reason) if rcvd is not None else (None, "")
    if code == 1008:
        return AuthError(f"{where}: {reason or 'unauthorized'} (close 1008)")
    if code is None:
        return RemotePolicyError(f"{where}: connection lost")
    return RemotePolicyError(f"{where}: connection closed ({code}{': ' + reason if reason else ''})")
