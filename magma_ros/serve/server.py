"""Policy server: one GPU, many arms, over plain asyncio TCP with msgpack frames (``serve.wire``).

Protocol (version 1). On connect the server sends ``{"type": "metadata", "protocol": 1, ...policy
metadata (stats, step_period, engine)...}``. Each request is a frame holding
``{"id": n, "type": "infer", "obs": {...}}`` (or ``"infer_batch"`` with ``"obs": [...]``,
``"reset"`` with an optional ``"robot_id"``, ``"metadata"``, ``"ping"``); each reply is
``{"id": n, "ok": true, "result": ...}`` or
``{"id": n, "ok": false, "error": "one line"}``. Malformed frames and bad observations get an error
reply; a frame over the size cap also closes that connection (it cannot be skipped safely).

Inference runs off the event loop in one worker thread; requests that arrive while it is busy are
served together with ``infer_batch`` (up to ``max_batch``), so several arms share one forward pass.

Run: ``python -m magma_ros.serve.server --model PATH --port 8765`` (``--port 0`` picks a free port;
the chosen address is printed as ``listening on HOST:PORT``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from magma_ros.core.errors import ConfigError
from magma_ros.serve import validate_observation
from magma_ros.serve.wire import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    WireError,
    WireLimits,
    packb,
    read_frame,
    unpackb,
    write_frame,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the policy server listens."""

    host: str = "127.0.0.1"  # bind address; 0.0.0.0 to serve other machines (no auth: trusted networks only)
    port: int = 8765  # TCP port; 0 picks a free one
    max_batch: int = 4  # observations per forward pass (several arms)
    limits: WireLimits = DEFAULT_LIMITS  # frame / array size caps


class PolicyServer:
    """Serve any object with ``infer_batch(list[obs]) -> list[dict]`` (or just ``infer``) over TCP."""

    def __init__(self, policy, config: ServerConfig = ServerConfig()):
        self.policy = policy
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="magma-infer")
        self._queue: asyncio.Queue | None = None
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.port: int | None = None

    # ------------------------------------------------------------------ metadata
    def metadata(self) -> dict:
        meta = {}
        if hasattr(self.policy, "metadata"):
            try:
                meta = dict(self.policy.metadata())
            except Exception as e:  # noqa: BLE001 - metadata is informative only
                log.warning("policy metadata failed: %s", e)
        meta.update({"type": "metadata", "protocol": PROTOCOL_VERSION, "server": "magma_ros",
                     "max_batch": self.config.max_batch})
        return meta

    # ------------------------------------------------------------------ inference worker
    def _run_batch(self, obs_list: list[dict]) -> list[dict]:
        if hasattr(self.policy, "infer_batch"):
            return self.policy.infer_batch(obs_list)
        return [self.policy.infer(o) for o in obs_list]

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            while len(items) < self.config.max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [o for o, _ in items])
                for (_, fut), r in zip(items, results):
                    if not fut.done():
                        fut.set_result(r)
            except Exception as e:  # noqa: BLE001 - one failed batch must not stop the server
                if len(items) > 1:  # retry one by one so one bad observation fails only itself
                    for o, fut in items:
                        try:
                            r = await loop.run_in_executor(self._executor, self._run_batch, [o])
                            if not fut.done():
                                fut.set_result(r[0])
                        except Exception as e1:  # noqa: BLE001
                            if not fut.done():
                                fut.set_exception(e1)
                else:
                    fut = items[0][1]
                    if not fut.done():
                        fut.set_exception(e)

    async def _infer(self, obs: dict) -> dict:
        validate_observation(obs)  # bad input answered before it reaches the batch
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((obs, fut))
        return await fut

    # ------------------------------------------------------------------ connections
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        log.info("client connected: %s", peer)
        try:
            await write_frame(writer, packb(self.metadata()))
            while True:
                try:
                    payload = await read_frame(reader, self.config.limits)
                except WireError as e:  # oversized frame: reply, then drop the connection
                    await write_frame(writer, packb({"id": None, "ok": False, "error": str(e)}))
                    break
                if payload is None:
                    break
                reply = await self._reply(payload)
                try:
                    data = packb(reply)
                except WireError as e:
                    data = packb({"id": reply.get("id"), "ok": False, "error": f"cannot encode result: {e}"})
                await write_frame(writer, data)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            log.info("client %s dropped: %s", peer, e)
        finally:
            log.info("client disconnected: %s", peer)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _reply(self, payload: bytes) -> dict:
        rid = None
        try:
            msg = unpackb(payload, self.config.limits)
            if not isinstance(msg, dict):
                raise ValueError("request must be a map with 'type'")
            rid = msg.get("id")
            if not (rid is None or isinstance(rid, (int, str))):
                rid = None
                raise ValueError("request 'id' must be an int or a string")
            kind = msg.get("type")
            if kind == "infer":
                return {"id": rid, "ok": True, "result": await self._infer(msg.get("obs"))}
            if kind == "infer_batch":
                obs = msg.get("obs")
                if not isinstance(obs, list) or not obs:
                    raise ValueError("infer_batch needs 'obs': a non-empty list of observations")
                if len(obs) > 64:
                    raise ValueError("infer_batch takes at most 64 observations")
                res = await asyncio.gather(*(self._infer(o) for o in obs))
                return {"id": rid, "ok": True, "result": list(res)}
            if kind == "reset":  # forget per-arm state (sticky gripper) on a new instruction/episode
                robot_id = msg.get("robot_id")
                if robot_id is not None and not isinstance(robot_id, str):
                    raise ValueError("reset 'robot_id' must be a string")
                if hasattr(self.policy, "reset"):
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(self._executor, self.policy.reset, robot_id)
                return {"id": rid, "ok": True, "result": None}
            if kind == "metadata":
                return {"id": rid, "ok": True, "result": self.metadata()}
            if kind == "ping":
                return {"id": rid, "ok": True, "result": "pong"}
            raise ValueError(f"unknown request type {kind!r}; "
                             "valid: infer, infer_batch, reset, metadata, ping")
        except (WireError, ValueError, ConfigError) as e:
            return {"id": rid, "ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - an inference failure is reported, never fatal
            log.exception("request failed")
            return {"id": rid, "ok": False, "error": f"internal error: {type(e).__name__}: {e}"}

    # ------------------------------------------------------------------ lifecycle
    async def serve(self, ready: threading.Event | None = None) -> None:
        """Listen until :meth:`stop` (or cancellation)."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        worker = asyncio.create_task(self._worker())
        self._server = await asyncio.start_server(self._handle, self.config.host, self.config.port,
                                                  limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        print(f"listening on {self.config.host}:{self.port}", flush=True)
        if ready is not None:
            ready.set()
        try:
            async with self._server:
                await self._server.serve_forever()
        except asyncio.CancelledError:
            pass
        finally:
            worker.cancel()
            self._stopped.set()

    def start_in_thread(self, timeout: float = 30.0) -> int:
        """Run the server in a daemon thread (tests, in-process use); returns the port."""
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve(ready)), daemon=True,
                                        name="magma-policy-server")
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("policy server did not start")
        return self.port

    def stop(self) -> None:
        """Stop listening, cancel open connections and the worker (thread-safe)."""
        loop = self._loop
        if loop is not None and not self._stopped.is_set() and not loop.is_closed():
            def _shutdown():
                if self._server is not None:
                    self._server.close()
                for t in asyncio.all_tasks():
                    if t is not asyncio.current_task():
                        t.cancel()

            try:
                loop.call_soon_threadsafe(_shutdown)
            except RuntimeError:  # loop already closed
                pass
        if self._thread is not None:
            self._thread.join(10)
        self._executor.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="magma-ros serve", description="Serve MagmaPolicy over TCP (msgpack).")
    ap.add_argument("--model", required=True, help="checkpoint directory or hub id")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0: all interfaces; no auth)")
    ap.add_argument("--port", type=int, default=8765, help="TCP port (0: pick a free one)")
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
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if a.max_batch < 1:
            raise ConfigError("--max-batch must be >= 1")
        from magma_ros.model.policy import MagmaPolicy

        policy = MagmaPolicy(a.model, stats=a.stats, device=a.device, dtype=a.dtype, engine=a.engine,
                             constrained=a.constrained, max_batch=a.max_batch, compile=a.compile,
                             quant=a.quant, temperature=a.temperature, top_k=a.top_k, seed=a.seed)
    except ConfigError as e:
        print(f"error: {e}", flush=True)
        return 2
    server = PolicyServer(policy, ServerConfig(host=a.host, port=a.port, max_batch=a.max_batch))
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"error: cannot listen on {a.host}:{a.port}: {e}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
