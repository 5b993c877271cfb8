"""Shared test fixtures: ROS 2 isolation (random domain, localhost discovery) and node processes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# triton (imported by torch._dynamo, e.g. through torchvision) segfaults in its module init when it is
# first imported after a MuJoCo EGL context exists in the process (test/core renders the sim before
# test/model loads the model): import it first. It is part of the torch CUDA wheel.
try:
    import triton  # noqa: F401
except ImportError:  # a torch build without triton
    pass

from hypothesis import settings as _hyp_settings

# Property tests draw the same examples on every run by default (a CI gate must not pass or fail by
# the luck of a random seed); HYPOTHESIS_PROFILE=explore draws fresh random examples on each run to
# search for new counterexamples (benchmarks/safety.py also fuzzes the safety core at random).
_hyp_settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
_hyp_settings.register_profile("explore", derandomize=False, print_blob=True)
_hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def ros_environment(domain_id: int | None = None) -> dict:
    """Environment for an isolated ROS 2 graph on this host."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(domain_id if domain_id is not None else random.randint(1, 230))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
    env["FASTDDS_BUILTIN_TRANSPORTS"] = "LARGE_DATA"
    env.setdefault("MUJOCO_GL", "egl")
    env["PYOPENGL_PLATFORM"] = env["MUJOCO_GL"]
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def ros_env(monkeypatch):
    """Put this test process on its own ROS domain; returns the env dict for child processes."""
    env = ros_environment()
    for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "RMW_IMPLEMENTATION", "FASTDDS_BUILTIN_TRANSPORTS"):
        monkeypatch.setenv(k, env[k])
    return env


class NodeProcesses:
    """Start ``python -m magma_ros.nodes.<name>`` processes; all are stopped at teardown."""

    def __init__(self, env: dict, logdir: Path):
        self.env = env
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, params: dict | None = None, remaps: dict | None = None,
              namespace: str | None = None, module: str | None = None, extra_env: dict | None = None):
        cmd = [sys.executable, "-m", module or f"magma_ros.nodes.{name}", "--ros-args"]
        for k, v in (params or {}).items():
            if isinstance(v, bool):
                v = "true" if v else "false"
            elif isinstance(v, (list, tuple)):
                v = "[" + ",".join(str(x) for x in v) + "]"
            cmd += ["-p", f"{k}:={v}"]
        for k, v in (remaps or {}).items():
            cmd += ["-r", f"{k}:={v}"]
        if namespace:
            cmd += ["-r", f"__ns:={namespace}"]
        log = self.logdir / f"{name}-{len(self.procs)}.log"
        env = dict(self.env, **(extra_env or {}))
        p = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append((name, p, log))
        return p

    def log(self, p: subprocess.Popen) -> str:
        for _, q, log in self.procs:
            if q is p:
                return log.read_text()
        return ""

    def stop(self, p: subprocess.Popen, sig=signal.SIGINT, timeout: float = 5.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
                p.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()

    def stop_all(self) -> None:
        for _, p, _ in self.procs:
            self.stop(p)

    def dump(self) -> str:
        return "\n".join(f"===== {n} (rc={p.poll()}) =====\n{log.read_text()[-4000:]}" for n, p, log in self.procs)


@pytest.fixture
def nodes(ros_env, tmp_path, request):
    procs = NodeProcesses(ros_env, tmp_path)
    yield procs
    procs.stop_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(procs.dump())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep
    return rep


@pytest.fixture
def rclpy_node(ros_env):
    """An in-test rclpy node on its own context (for publishing/subscribing to node processes)."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node(f"test_probe_{random.randint(0, 1_000_000)}", context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    node.executor_ = ex

    def spin_until(pred, timeout=10.0, step=0.02):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ex.spin_once(timeout_sec=step)
            for _ in range(50):  # drain what is already queued: a 100 Hz stream must not pile up
                if pred():
                    return True
                ex.spin_once(timeout_sec=0)
            if pred():
                return True
        return bool(pred())

    node.spin_until = spin_until
    yield node
    ex.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=ctx)


def aux_python(name: str) -> str:
    """The python of the second venv ``name`` (test/aux_venvs/NAME.txt), built on first use.

    Real third-party readers and clients that pin other versions (LeRobot, openpi-client) live
    there; a failure to build it fails the test that needs it (never a skip).
    """
    out = subprocess.run(["bash", str(REPO / "scripts" / "aux_venv.sh"), name], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"building the {name} venv failed:\n{out.stderr[-4000:]}")
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """One small random-weight Magma checkpoint (real format, real Llama-3 tokenizer) shared by the session.

    Seed 0: with these random weights unconstrained greedy decoding emits non-action tokens.
    """
    from magma_ros.model.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_magma") / "ckpt", seed=0)
