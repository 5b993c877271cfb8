"""Policy server: one GPU (or a Ray Serve fleet), many arms, over WebSocket with openpi's protocol.

Protocol (``wire.PROTOCOL_VERSION``), the one openpi's ``WebsocketPolicyServer`` speaks, so
``openpi_client.WebsocketClientPolicy(host, port, api_key=TOKEN)`` works unmodified:

- The client opens ``ws://HOST:PORT`` (``wss://`` with TLS) with ``Authorization: Api-Key <token>``
  (or ``Bearer <token>``). A missing or wrong token closes the connection with 1008 (policy
  violation) before anything else happens.
- The server sends its metadata (one binary msgpack message): model, dtype, statistics, step
  period, action dims, protocol version, max batch.
- Each binary message is one observation ``{"image": HxWx3 uint8, "prompt" | "instruction": str,
  "robot_id"?: str, "timeout_s"?: float}``; each reply is one binary message: the policy's result
  plus ``"actions"`` (float32 (1, 7)) and ``"server_timing"`` (``infer_ms``, ``queue_ms``,
  ``batch_size``). ``{"type": "reset"}`` forgets the state of the connection's own arm,
  ``{"type": "ping"}`` answers ``{"ok": true}``.
- Errors are one text message (openpi's clients raise on a text reply), one line, never a
  traceback. Malformed msgpack, a bad observation, an oversized message (1009) or a silent client
  (idle timeout) also close that connection; a busy server or a failed inference does not.

Limits: message size, connections, handshake and idle timeouts; decoding runs in a thread pool off
the event loop; requests wait in a bounded queue and one whose client has gone (or whose
``timeout_s`` has passed) is dropped before it reaches the engine; every connection has its own
task, so a slow client only delays itself. Per-arm state is keyed by ``robot_id`` (bound to the
connection by its first observation; an anonymous connection gets its own), and the least recently
used arms beyond ``max_robots`` are forgotten.

Run: ``MAGMA_ROS_TOKEN=... magma-ros serve --model PATH [--host 0.0.0.0] [--port 8765]
[--certfile C --keyfile K] [--ray]`` (``--port 0`` picks a free port; the address is printed as
``listening on ws://HOST:PORT``). See docs/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import inspect
import ipaddress
import itertools
import logging
import ssl
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from magma_ros.core.errors import ConfigError
from magma_ros.core.policy_api import canonical_observation, validate_robot_id
from magma_ros.serve.auth import TOKEN_ENV, load_token, token_from_header
from magma_ros.serve.wire import PROTOCOL_VERSION, WireError, WireLimits, packb, unpackb

log = logging.getLogger(__name__)

CLOSE_POLICY_VIOLATION = 1008  # RFC 6455: bad or missing token
CLOSE_INVALID_DATA = 1007  # malformed message or observation
CLOSE_TRY_AGAIN_LATER = 1013  # connection cap reached
CLOSE_GOING_AWAY = 1001  # idle timeout, server shutting down


def one_line(e: BaseException | str, limit: int = 300) -> str:
    """The first line of an error, bounded: what goes back over the network (never a traceback)."""
    s = str(e).strip().splitlines()
    s = s[0] if s else type(e).__name__
    return s[:limit]


def is_loopback(host: str) -> bool:
    """True for localhost / 127.x / ::1 (where ``--no-auth`` is allowed)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the policy server listens, and the limits it enforces."""

    host: str = "127.0.0.1"  # bind address; 0.0.0.0 serves other machines (token always checked)
    port: int = 8765  # TCP port; 0 picks a free one
    token: str = field(default="", repr=False)  # shared secret clients must send; '' only with no_auth
    no_auth: bool = False  # skip the token check: allowed only on a loopback host
    certfile: str = ""  # TLS certificate chain (PEM): serve wss:// (with keyfile)
    keyfile: str = ""  # TLS private key (PEM)
    max_batch: int = 4  # local engine: observations per forward pass (several arms)
    max_connections: int = 64  # open connections; more are closed with 1013 (try again later)
    max_queue: int = 64  # requests waiting for the engine; more are answered "server busy"
    max_robots: int = 256  # arms whose state (sticky gripper) is kept; least recently used forgotten
    handshake_timeout: float = 10.0  # [s] TCP accept -> WebSocket open (slow-loris headers)
    idle_timeout: float = 60.0  # [s] a connection that sends no complete message this long is closed
    request_timeout: float = 30.0  # [s] a request still queued after this (or its timeout_s) is dropped
    decode_workers: int = 2  # threads that decode and validate messages off the event loop
    limits: WireLimits = WireLimits()  # message / array size caps

    def check(self) -> ServerConfig:
        """Raise ConfigError for an unsafe or inconsistent configuration; return self."""
        if not self.no_auth and not self.token:
            raise ConfigError(f"a token is required: set {TOKEN_ENV} or --token-file "
                              "(--no-auth only on a loopback host)")
        if self.no_auth and not is_loopback(self.host):
            raise ConfigError(f"--no-auth is only allowed on a loopback host, not {self.host}")
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("TLS needs both --certfile and --keyfile")
        for name in ("max_batch", "max_connections", "max_queue", "max_robots", "decode_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        for name in ("handshake_timeout", "idle_timeout", "request_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 s")
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context, or None for plain ws://."""
        if not self.certfile:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load TLS certificate/key: {one_line(e)}") from None
        return ctx


# ---------------------------------------------------------------------------------- engines


def policy_metadata(policy) -> dict:
    """A policy's ``metadata()`` (when it has one) plus the model's dtype (when it has a model)."""
    meta = getattr(policy, "metadata", None)
    out = dict(meta()) if callable(meta) else {}
    model = getattr(policy, "model", None)
    if getattr(model, "dtype", None) is not None:
        out.setdefault("dtype", str(model.dtype).replace("torch.", ""))
    return out


def run_batch(policy, obs_list: list[dict]) -> list[dict]:
    """``policy.infer_batch(obs_list)``, or ``infer`` per observation for a policy without one."""
    if hasattr(policy, "infer_batch"):
        return list(policy.infer_batch(obs_list))
    return [policy.infer(o) for o in obs_list]


class LocalEngine:
    """A policy in this process: batches of up to ``max_batch`` run one at a time in one thread.

    ``policy``: ``infer_batch(list[obs]) -> list[dict]`` (or just ``infer``), optional ``reset``
    and ``metadata``.
    """

    def __init__(self, policy, max_batch: int = 4):
        self.policy = policy
        self.max_batch = int(max_batch)
        self.workers = 1  # one engine thread: the GPU runs one batch at a time
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="magma-infer")
        reset = getattr(policy, "reset", None)
        self._reset_takes_id = False
        if callable(reset):
            try:
                self._reset_takes_id = len(inspect.signature(reset).parameters) >= 1
            except (TypeError, ValueError):
                self._reset_takes_id = True

    def metadata(self) -> dict:
        """The policy's own metadata (statistics, step period, engine...)."""
        return policy_metadata(self.policy)

    async def infer_many(self, obs_list: list[dict]) -> list[dict]:
        """Run one batch in the engine thread; each result gets ``batch_size``."""
        res = await asyncio.get_running_loop().run_in_executor(self._pool, run_batch, self.policy, obs_list)
        for r in res:
            r["batch_size"] = len(obs_list)
        return res

    async def reset(self, robot_id: str) -> None:
        """Forget one arm's state."""
        reset = getattr(self.policy, "reset", None)
        if callable(reset):
            fn = (lambda: reset(robot_id)) if self._reset_takes_id else reset
            await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        """Stop the engine thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Request:
    obs: dict
    future: asyncio.Future
    ws: object  # the client's connection: a request whose client is gone is dropped
    deadline: float  # time.monotonic() after which nobody waits for the answer
    queued: float  # time.monotonic() when it entered the queue


class Stats:
    """Counters the server keeps (tests and benchmarks read them)."""

    def __init__(self):
        self.connections = 0  # open now
        self.accepted = 0
        self.rejected_auth = 0
        self.rejected_full = 0
        self.requests = 0
        self.dropped_gone = 0  # client had gone before its request reached the engine
        self.dropped_expired = 0
        self.busy = 0
        self.errors = 0
        self.batches: list[int] = []  # batch sizes the engine ran (last 1000)


# ---------------------------------------------------------------------------------- server


class PolicyServer:
    """Serve an engine (`LocalEngine` around any ``infer``/``infer_batch`` policy, or a Ray engine)."""

    def __init__(self, policy_or_engine, config: ServerConfig = ServerConfig()):
        self.config = config.check()
        eng = policy_or_engine
        self.engine = eng if hasattr(eng, "infer_many") else LocalEngine(eng, config.max_batch)
        self._ssl = config.ssl_context()
        self._token = config.token.encode()
        self._decode_pool = ThreadPoolExecutor(max_workers=config.decode_workers, thread_name_prefix="magma-decode")
        self._robots: OrderedDict[str, None] = OrderedDict()
        self._conn_ids = itertools.count(1)
        self.stats = Stats()
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._meta: dict | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ metadata
    def metadata(self) -> dict:
        """What every client gets on connect (openpi: ``get_server_metadata()``)."""
        if self._meta is None:
            try:
                meta = self.engine.metadata()
            except Exception as e:  # noqa: BLE001 - metadata is informative only
                log.warning("policy metadata failed: %s", one_line(e))
                meta = {}
            meta.update({"server": "magma_ros", "protocol": PROTOCOL_VERSION, "action_dim": 7,
                         "action_horizon": 1, "max_batch": self.engine.max_batch,
                         "auth": "none" if self.config.no_auth else "token"})
            self._meta = meta
        return self._meta

    @property
    def url(self) -> str:
        """``ws://host:port`` or ``wss://...`` once listening."""
        return f"{'wss' if self._ssl else 'ws'}://{self.config.host}:{self.port}"

    # ------------------------------------------------------------------ per-arm state
    async def _touch_robot(self, rid: str) -> None:
        self._robots[rid] = None
        self._robots.move_to_end(rid)
        while len(self._robots) > self.config.max_robots:
            old, _ = self._robots.popitem(last=False)
            log.info("forgetting the state of arm %r (least recently used)", old)
            try:
                await self.engine.reset(old)
            except Exception as e:  # noqa: BLE001
                log.warning("reset of %r failed: %s", old, one_line(e))

    # ------------------------------------------------------------------ engine workers
    async def _worker(self) -> None:
        q = self._queue
        while True:
            items = [await q.get()]
            while len(items) < self.engine.max_batch and not q.empty() and self.engine.workers == 1:
                items.append(q.get_nowait())
            now = time.monotonic()
            live = []
            for r in items:
                if r.future.done():
                    continue
                if getattr(r.ws, "state", None) is not None and r.ws.state.name != "OPEN":
                    self.stats.dropped_gone += 1  # client gone: never reaches the engine
                    r.future.cancel()
                elif now > r.deadline:
                    self.stats.dropped_expired += 1
                    r.future.set_exception(TimeoutError("request expired in the queue"))
                else:
                    live.append(r)
            if not live:
                continue
            t0 = time.monotonic()
            try:
                results = await self.engine.infer_many([r.obs for r in live])
            except Exception as e:  # noqa: BLE001 - one failed batch must not stop the server
                log.warning("inference failed (%d observations): %s", len(live), one_line(e))
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(RuntimeError(f"inference failed: {one_line(e)}"))
                continue
            dt = time.monotonic() - t0
            self.stats.batches = (self.stats.batches + [int(results[0].get("batch_size", len(live)))])[-1000:]
            for r, res in zip(live, results):
                if not r.future.done():
                    res["server_timing"] = {"infer_ms": dt * 1e3, "queue_ms": (t0 - r.queued) * 1e3,
                                            "batch_size": int(res.pop("batch_size", len(live)))}
                    r.future.set_result(res)

    async def _submit(self, obs: dict, ws, timeout_s) -> dict:
        now = time.monotonic()
        limit = self.config.request_timeout
        if isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and timeout_s > 0:
            limit = min(limit, float(timeout_s))
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Request(obs, fut, ws, now + limit, now))
        except asyncio.QueueFull:
            self.stats.busy += 1
            raise RuntimeError(f"server busy: {self.config.max_queue} requests queued, try again") from None
        return await fut

    # ------------------------------------------------------------------ connections
    def _authorized(self, ws) -> bool:
        if self.config.no_auth:
            return True
        tok = token_from_header(ws.request.headers.get("Authorization"))
        given = (tok or "").encode()
        return hmac.compare_digest(given, self._token) and tok is not None

    def _decode(self, data) -> tuple[str, dict]:
        """(kind, payload) from one message: ('obs', canonical observation + extras) or a control."""
        msg = unpackb(data, self.config.limits)
        if not isinstance(msg, dict):
            raise ValueError(f"a message must be a map (an observation), got {type(msg).__name__}")
        kind = msg.get("type", "infer")
        if kind == "ping":
            return kind, msg
        if kind == "reset":
            return kind, {"robot_id": validate_robot_id(msg["robot_id"])} if "robot_id" in msg else {}
        if kind != "infer":
            raise ValueError(f"unknown message type {kind!r}; valid: infer (default), reset, ping")
        obs = canonical_observation(msg)
        if "robot_id" not in msg:
            obs.pop("robot_id")
        return "obs", {"obs": obs, "timeout_s": msg.get("timeout_s")}

    async def _handler(self, ws) -> None:
        peer = ws.remote_address
        if not self._authorized(ws):
            self.stats.rejected_auth += 1
            log.warning("client %s: missing or wrong token, closed", peer)
            await ws.close(CLOSE_POLICY_VIOLATION, "unauthorized: missing or wrong token")
            return
        if self.stats.connections >= self.config.max_connections:
            self.stats.rejected_full += 1
            await ws.close(CLOSE_TRY_AGAIN_LATER, f"server full ({self.config.max_connections} connections)")
            return
        self.stats.connections += 1
        self.stats.accepted += 1
        cid = next(self._conn_ids)
        robot_id = None  # bound by the first observation that names one
        loop = asyncio.get_running_loop()
        log.info("client %s connected (#%d)", peer, cid)
        from websockets.exceptions import ConnectionClosed

        try:
            await ws.send(packb(self.metadata()))
            while True:
                try:
                    data = await asyncio.wait_for(ws.recv(), self.config.idle_timeout)
                except TimeoutError:
                    await ws.close(CLOSE_GOING_AWAY, f"idle for {self.config.idle_timeout:g} s")
                    return
                if isinstance(data, str):
                    await self._fail(ws, "expected a binary msgpack message, got text", close=True)
                    return
                try:
                    kind, msg = await loop.run_in_executor(self._decode_pool, self._decode, data)
                except (WireError, ValueError) as e:
                    await self._fail(ws, f"bad message: {one_line(e)}", close=True)
                    return
                if kind == "ping":
                    await ws.send(packb({"ok": True}))
                    continue
                obs = msg["obs"] if kind == "obs" else msg
                rid = obs.get("robot_id")
                if rid is None:
                    rid = robot_id or f"anon-{cid}"
                if robot_id is None:  # the first message that names an arm binds the connection to it
                    robot_id = rid
                elif rid != robot_id:
                    await self._fail(ws, f"robot_id {rid!r} differs from this connection's {robot_id!r}; "
                                     "use one connection per arm")
                    continue
                if kind == "reset":  # only the caller's own arm
                    await self.engine.reset(rid)
                    await ws.send(packb({"ok": True, "robot_id": rid}))
                    continue
                obs["robot_id"] = rid
                await self._touch_robot(rid)
                self.stats.requests += 1
                try:
                    res = await self._submit(obs, ws, msg["timeout_s"])
                except asyncio.CancelledError:
                    if ws.state.name != "OPEN":
                        return
                    raise
                except (RuntimeError, TimeoutError, ValueError) as e:
                    await self._fail(ws, one_line(e))
                    continue
                res["actions"] = np.asarray(res["action"], np.float32).reshape(1, -1)
                await ws.send(packb(res))
        except ConnectionClosed:
            pass
        finally:
            self.stats.connections -= 1
            anon = f"anon-{cid}"
            if anon in self._robots:  # nobody can come back for an anonymous arm's state
                self._robots.pop(anon, None)
                try:
                    await self.engine.reset(anon)
                except Exception as e:  # noqa: BLE001
                    log.debug("reset of %s failed: %s", anon, one_line(e))
            log.info("client %s disconnected (#%d)", peer, cid)

    async def _fail(self, ws, message: str, close: bool = False) -> None:
        self.stats.errors += 1
        log.info("client %s: %s", ws.remote_address, message)
        await ws.send(message)
        if close:
            await ws.close(CLOSE_INVALID_DATA, message[:100])

    @staticmethod
    def _health(connection, request):
        import http

        if request.path == "/healthz":  # like openpi's server; tells nothing about the policy
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    # ------------------------------------------------------------------ lifecycle
    async def serve(self, ready: threading.Event | None = None) -> None:
        """Listen until :meth:`stop` (or cancellation)."""
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._queue = asyncio.Queue(maxsize=self.config.max_queue)
        workers = [asyncio.create_task(self._worker()) for _ in range(self.engine.workers)]
        c = self.config
        tls = {"ssl": self._ssl, "ssl_handshake_timeout": c.handshake_timeout} if self._ssl else {}
        try:
            async with serve(self._handler, c.host, c.port, **tls, compression=None,
                             max_size=c.limits.max_message_bytes, open_timeout=c.handshake_timeout, close_timeout=2.0,
                             process_request=self._health, server_header="magma_ros") as server:
                self.port = next(iter(server.sockets)).getsockname()[1]
                print(f"listening on {self.url}", flush=True)
                if ready is not None:
                    ready.set()
                await self._stop.wait()
        finally:
            for w in workers:
                w.cancel()

    def start_in_thread(self, timeout: float = 60.0) -> int:
        """Run the server in a daemon thread (tests, in-process use); returns the port."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run():
            try:
                asyncio.run(self.serve(ready))
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                errors.append(e)
                ready.set()

        self._thread = threading.Thread(target=run, daemon=True, name="magma-policy-server")
        self._thread.start()
        if not ready.wait(timeout) or errors:
            raise RuntimeError(f"policy server did not start: {one_line(errors[0]) if errors else 'timeout'}")
        return self.port

    def stop(self) -> None:
        """Close the listener and every connection (thread-safe); the engine thread ends too."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # loop already closed
                pass
        if self._thread is not None:
            self._thread.join(15)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()


# ---------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """``magma-ros serve`` options."""
    ap = argparse.ArgumentParser(prog="magma-ros serve",
                                 description="Serve MagmaPolicy over WebSocket (openpi's protocol), token-protected.")
    ap.add_argument("--model", required=True, help="checkpoint directory or hub id")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0: all interfaces)")
    ap.add_argument("--port", type=int, default=8765, help="TCP port (0: pick a free one)")
    ap.add_argument("--token-file", default=None, help=f"file holding the shared token (default: ${TOKEN_ENV})")
    ap.add_argument("--no-auth", action="store_true", help="no token check (loopback host only)")
    ap.add_argument("--certfile", default="", help="TLS certificate chain (PEM): serve wss://")
    ap.add_argument("--keyfile", default="", help="TLS private key (PEM)")
    ap.add_argument("--max-connections", type=int, default=64, help="open connections at most")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting for the engine at most")
    ap.add_argument("--max-message-mb", type=float, default=32.0, help="largest message accepted (MiB)")
    ap.add_argument("--idle-timeout", type=float, default=60.0, help="[s] close a connection silent this long")
    ap.add_argument("--max-robots", type=int, default=256, help="arms whose per-arm state is kept (LRU)")
    ap.add_argument("--ray", action="store_true", help="run the engine as a Ray Serve deployment (fleet)")
    ap.add_argument("--ray-address", default=None, help="--ray: cluster address (default: start/join local)")
    ap.add_argument("--replicas", type=int, default=1, help="--ray: engine replicas (one GPU each when CUDA)")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="--ray: how long a batch waits to fill")
    ap.add_argument("--stats", default="bridge_orig", help="bridge_orig | google_robot | stats JSON path")
    ap.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    ap.add_argument("--engine", default="auto", help="auto | fast | plain")
    ap.add_argument("--constrained", action="store_true", help="only action tokens at the 7 action positions")
    ap.add_argument("--max-batch", type=int, default=4, help="observations per forward pass")
    ap.add_argument("--compile", default=None, help="fast engine: default | reduce-overhead (CUDA graphs)")
    ap.add_argument("--quant", default=None, help="fast engine: int8 | int4 (language-model weights)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy; > 0: sample (Magma's evaluation: 0.7 with --top-k 50)")
    ap.add_argument("--top-k", type=int, default=50, help="sampling: keep the k largest logits (0: all)")
    ap.add_argument("--seed", type=int, default=None, help="sampling: generator seed")
    ap.add_argument("--log-level", default="INFO")
    return ap


def config_from_args(a) -> ServerConfig:
    """`ServerConfig` from parsed ``magma-ros serve`` arguments (ConfigError when unsafe)."""
    mb = int(a.max_message_mb * 1024 * 1024)
    return ServerConfig(host=a.host, port=a.port, token=load_token(a.token_file), no_auth=a.no_auth,
                        certfile=a.certfile, keyfile=a.keyfile, max_batch=a.max_batch,
                        max_connections=a.max_connections, max_queue=a.max_queue, max_robots=a.max_robots,
                        idle_timeout=a.idle_timeout,
                        limits=WireLimits(max_message_bytes=mb, max_array_bytes=mb)).check()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``magma-ros serve``; one-line errors, exit status 2 for user mistakes."""
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(a)
        if a.ray and a.replicas < 1:
            raise ConfigError("--replicas must be >= 1")
        policy_kw = dict(stats=a.stats, device=a.device, dtype=a.dtype, engine=a.engine,
                         constrained=a.constrained, max_batch=a.max_batch, compile=a.compile, quant=a.quant,
                         temperature=a.temperature, top_k=a.top_k, seed=a.seed)
        if a.ray:
            from magma_ros.serve.ray_engine import RayEngine, magma_factory

            engine = RayEngine(magma_factory(a.model, **policy_kw), max_batch=a.max_batch,
                               batch_wait_s=a.batch_wait_ms / 1e3, replicas=a.replicas, address=a.ray_address)
        else:
            from magma_ros.model.policy import MagmaPolicy

            engine = LocalEngine(MagmaPolicy(a.model, **policy_kw), a.max_batch)
    except ConfigError as e:
        print(f"error: {one_line(e)}", flush=True)
        return 2
    server = PolicyServer(engine, cfg)
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"error: cannot listen on {a.host}:{a.port}: {one_line(e)}", flush=True)
        return 2
    finally:
        close = getattr(engine, "close", None)
        if callable(close):
            close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
