"""The engine as a Ray Serve deployment (``magma-ros serve --ray``): dynamic batching, one replica per GPU.

The WebSocket front (``serve.server.PolicyServer``: auth, limits, per-arm state) stays the same;
only the engine changes. Each validated observation becomes one call on the deployment handle,
and ``@serve.batch`` on the replica groups concurrent calls into ``infer_batch`` batches of up to
the engine's ``max_batch`` (waiting at most ``batch_wait_s`` for a batch to fill).
``max_ongoing_requests`` is twice the batch, so a replica can hold a full batch while it runs one.
A replica asks for one GPU (``ray_actor_options={"num_gpus": 1}``) when CUDA is present, none
otherwise; a lab scales from one workstation to a Ray cluster by pointing ``--ray-address`` at it.

Ray moves data between its own processes with its own (pickle-based) serialization: keep the Ray
cluster on a trusted network (Ray 2.60 also enables its own cluster token). Only the WebSocket
front faces clients, and it validates every observation before anything reaches Ray.
Per-arm state (the sticky gripper) lives in each replica: with several replicas, one arm's
requests may land on different replicas (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import functools
import logging

from magma_ros.core.errors import ConfigError
from magma_ros.serve.server import policy_metadata, run_batch

log = logging.getLogger(__name__)

APP_NAME = "magma_ros"


def _make_magma(model: str, kwargs: dict):
    from magma_ros.model.policy import MagmaPolicy

    return MagmaPolicy(model, **kwargs)


def magma_factory(model: str, **kwargs):
    """A picklable ``() -> MagmaPolicy`` that each replica calls once (loads the checkpoint there)."""
    return functools.partial(_make_magma, str(model), dict(kwargs))


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


class PolicyDeployment:
    """A Ray Serve replica holding one policy; ``infer`` calls are batched by ``@serve.batch``."""

    def __init__(self, factory, max_batch: int, batch_wait_s: float):
        self.policy = factory()
        self.max_batch = int(max_batch)  # the subclass RayEngine builds decorates infer_batched with it
        self.batch_wait_s = float(batch_wait_s)

    async def infer_batched(self, obs_list: list[dict]) -> list[dict]:
        """One batch -> one result each (``batch_size`` added); the model runs off the replica's loop."""
        res = await asyncio.to_thread(run_batch, self.policy, obs_list)
        for r in res:
            r["batch_size"] = len(obs_list)
        return res

    async def infer(self, obs: dict) -> dict:
        """One observation (batched with concurrent ones)."""
        return await self.infer_batched(obs)

    def reset(self, robot_id: str) -> None:
        """Forget one arm's state in this replica."""
        reset = getattr(self.policy, "reset", None)
        if callable(reset):
            try:
                reset(robot_id)
            except TypeError:
                reset()

    def metadata(self) -> dict:
        """The policy's metadata, as the local engine reports it."""
        return policy_metadata(self.policy)


class RayEngine:
    """The front's engine backed by a Ray Serve deployment (same interface as `LocalEngine`).

    ``factory``: picklable ``() -> policy`` (``magma_factory(...)`` for Magma); ``address``:
    an existing Ray cluster (None: join the one this process already started, or start a local one).
    """

    def __init__(self, factory, max_batch: int = 4, batch_wait_s: float = 0.005, replicas: int = 1,
                 address: str | None = None, num_gpus: float | None = None, num_cpus: float = 1.0):
        try:
            import ray
            from ray import serve
        except ImportError as e:
            raise ConfigError(f"--ray needs Ray Serve: pip install 'ray[serve]' ({e})") from None
        if max_batch < 1 or replicas < 1 or not batch_wait_s >= 0:
            raise ConfigError("max_batch and replicas must be >= 1, batch_wait_s >= 0")
        self._ray, self._serve = ray, serve
        self._started_ray = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._started_ray = True
        gpus = (1.0 if _cuda_available() else 0.0) if num_gpus is None else float(num_gpus)
        self.max_batch = int(max_batch)
        self.max_ongoing = 2 * self.max_batch  # >= the batch: a batch can fill while one runs
        self.workers = self.max_ongoing * int(replicas)  # front coroutines: one call in flight each
        dep = serve.deployment(name="MagmaPolicy")(
            type("MagmaPolicyDeployment", (PolicyDeployment,), {
                "infer_batched": serve.batch(max_batch_size=self.max_batch, batch_wait_timeout_s=batch_wait_s)(
                    PolicyDeployment.infer_batched)}))
        app = dep.options(num_replicas=int(replicas), max_ongoing_requests=self.max_ongoing,
                          ray_actor_options={"num_gpus": gpus, "num_cpus": float(num_cpus)}
                          ).bind(factory, self.max_batch, batch_wait_s)
        serve.start(proxy_location="Disabled")
        self.handle = serve.run(app, name=APP_NAME, route_prefix=None)
        self._meta = dict(self.handle.metadata.remote().result())
        self._meta.update({"engine_backend": "ray_serve", "replicas": int(replicas), "num_gpus_per_replica": gpus})
        log.info("Ray Serve deployment up: %d replica(s), batch %d, %.0f GPU each", replicas, self.max_batch, gpus)

    def metadata(self) -> dict:
        """The replicas' policy metadata plus the deployment's shape."""
        return dict(self._meta)

    async def infer_many(self, obs_list: list[dict]) -> list[dict]:
        """Each observation as its own call; the replica's ``@serve.batch`` groups concurrent ones."""
        return list(await asyncio.gather(*(self.handle.infer.remote(o) for o in obs_list)))

    async def reset(self, robot_id: str) -> None:
        """Forget one arm's state (in the replica the call lands on)."""
        await self.handle.reset.remote(robot_id)

    def close(self) -> None:
        """Delete the application; shut Ray down when this engine started it."""
        try:
            self._serve.delete(APP_NAME)
        except Exception as e:  # noqa: BLE001 - shutting down anyway
            log.debug("serve.delete failed: %s", e)
        if self._started_ray:
            self._serve.shutdown()
            self._ray.shutdown()
