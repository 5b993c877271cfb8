"""Policy serving: round-trip overhead over loopback and throughput with 1/4/8 clients (plain and Ray Serve).

1. Overhead: a 640x480 RGB observation through `RemotePolicy` -> `magma-ros serve`'s `PolicyServer`
   (token auth, msgpack-numpy, WebSocket, decode + validation in the server's thread pool) and back,
   against the same policy's direct in-process ``infer``. The policy returns a fixed action, so the
   figures exclude model time; ``server infer`` (the engine's own time) is subtracted as well.
2. Throughput: N clients in threads, each sending 640x480 observations back to back for a fixed
   time, against an engine whose batch costs a fixed ``--batch-cost`` seconds whatever its size up
   to 4 (a GPU running a small batch): the plain server (its own batching worker) and Ray Serve
   (``@serve.batch``, one replica, CPU) behind the same front.

Run: ``PYTHONPATH=$PWD .venv/bin/python benchmarks/serving.py [--no-ray]`` (writes RESULTS.md's section).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _results import machine, write_section  # noqa: E402

from magma_ros.serve.client import RemotePolicy  # noqa: E402
from magma_ros.serve.server import PolicyServer, ServerConfig  # noqa: E402

TOKEN = "benchmark-token"
MAX_BATCH = 4


class FixedPolicy:
    """Returns one fixed action; ``batch_cost`` [s] per ``infer_batch`` call whatever its size (a GPU)."""

    def __init__(self, batch_cost: float = 0.0):
        self.batch_cost = batch_cost

    def _result(self) -> dict:
        return {"action": np.array([0.01, 0, 0, 0, 0, 0, 1], np.float32), "tokens": [1, 2, 3, 4, 5, 6, 7],
                "latency_s": self.batch_cost, "valid": True, "reason": ""}

    def infer(self, obs: dict) -> dict:
        return self.infer_batch([obs])[0]

    def infer_batch(self, observations: list[dict]) -> list[dict]:
        if self.batch_cost:
            time.sleep(self.batch_cost)
        return [self._result() for _ in observations]

    def metadata(self) -> dict:
        return {"policy": "fixed", "step_period": 0.2}


def _pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def overhead(n: int) -> dict:
    """Direct in-process infer vs round trip over loopback (ms)."""
    from magma_ros.core.policy_api import canonical_observation

    rng = np.random.default_rng(0)
    obs = {"image": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), "instruction": "pick up the can"}
    pol = FixedPolicy()
    direct = []
    for _ in range(n):
        t0 = time.perf_counter()
        pol.infer(canonical_observation(obs))
        direct.append(time.perf_counter() - t0)
    srv = PolicyServer(pol, ServerConfig(port=0, token=TOKEN))
    port = srv.start_in_thread()
    rtt, net = [], []
    try:
        with RemotePolicy("127.0.0.1", port, token=TOKEN, timeout=10) as c:
            for _ in range(20):
                c.infer(obs)  # warm up
            for _ in range(n):
                t0 = time.perf_counter()
                r = c.infer(obs)
                dt = time.perf_counter() - t0
                rtt.append(dt)
                net.append(dt - r["server_timing"]["infer_ms"] / 1e3)
    finally:
        srv.stop()
    return {"direct": direct, "rtt": rtt, "net": net}


def throughput(port: int, clients: int, seconds: float, image) -> tuple[float, int, float]:
    """(requests/s over all clients, errors, mean batch size)."""
    counts, errors, sizes = [0] * clients, [0], []
    stop = threading.Event()
    go = threading.Barrier(clients + 1)

    def run(i):
        with RemotePolicy("127.0.0.1", port, token=TOKEN, timeout=30, robot_id=f"arm{i}") as c:
            c.connect()
            go.wait()
            while not stop.is_set():
                try:
                    r = c.infer({"image": image, "instruction": "pick up the can"})
                    counts[i] += 1
                    sizes.append(r["server_timing"]["batch_size"])
                except Exception:  # noqa: BLE001 - counted
                    errors[0] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    return sum(counts) / (time.perf_counter() - t0), errors[0], float(np.mean(sizes)) if sizes else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300, help="overhead: round trips timed")
    ap.add_argument("--seconds", type=float, default=5.0, help="throughput: seconds per configuration")
    ap.add_argument("--batch-cost", type=float, default=0.05, help="[s] throughput engine: cost of one batch")
    ap.add_argument("--no-ray", action="store_true", help="skip Ray Serve")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    a = ap.parse_args(argv)
    load = os.getloadavg()
    o = overhead(a.requests)
    rows = [("direct in-process `infer` (validation + policy)", o["direct"]),
            ("`RemotePolicy.infer` round trip", o["rtt"]),
            ("round trip minus the engine's own time", o["net"])]
    lines = [f"Machine: {machine()}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) "
             "before the run (a shared machine: other jobs inflate every figure).", "",
             f"Overhead: 640x480 RGB observation (900 KiB), {a.requests} requests, one client, loopback, "
             "token auth, no TLS; the policy returns a fixed action (no model time).", "",
             "| path | p50 [ms] | p99 [ms] |", "|---|---|---|"]
    lines += [f"| {name} | {_pct(xs, 50):.2f} | {_pct(xs, 99):.2f} |" for name, xs in rows]
    image = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    results: dict[str, list] = {}
    srv = PolicyServer(FixedPolicy(a.batch_cost), ServerConfig(port=0, token=TOKEN, max_batch=MAX_BATCH))
    port = srv.start_in_thread()
    try:
        results["plain server"] = [throughput(port, n, a.seconds, image) for n in (1, 4, 8)]
    finally:
        srv.stop()
    if not a.no_ray:
        import ray
        from ray import serve

        from magma_ros.serve.ray_engine import RayEngine

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            eng = RayEngine(lambda: FixedPolicy(a.batch_cost), max_batch=MAX_BATCH, batch_wait_s=0.005, num_gpus=0)
            srv = PolicyServer(eng, ServerConfig(port=0, token=TOKEN, max_batch=MAX_BATCH))
            port = srv.start_in_thread()
            try:
                results["Ray Serve (1 replica)"] = [throughput(port, n, a.seconds, image) for n in (1, 4, 8)]
            finally:
                srv.stop()
        finally:
            serve.shutdown()
            ray.shutdown()
    lines += ["", f"Throughput: clients sending 640x480 observations back to back for {a.seconds:g} s each; "
              f"the engine costs {a.batch_cost * 1e3:.0f} ms per batch of up to {MAX_BATCH} (a GPU's small "
              f"batch), so the ceiling is {MAX_BATCH / a.batch_cost:.0f} requests/s.", "",
              "| front + engine | 1 client [req/s] | 4 clients [req/s] | 8 clients [req/s] | mean batch at 8 "
              "| errors |",
              "|---|---|---|---|---|---|"]
    for name, rs in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[0]:.1f}" for r in rs)
                     + f" | {rs[-1][2]:.2f} | {sum(r[1] for r in rs)} |")
    lines += ["", f"Load average after the run: {os.getloadavg()[0]:.1f}. "
              "Run: `PYTHONPATH=$PWD .venv/bin/python benchmarks/serving.py`."]
    md = "## Policy serving (`benchmarks/serving.py`)\n\n" + "\n".join(lines)
    print(md)
    if not a.no_write:
        write_section("serving", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
