"""Kill and restart the policy server during a closed loop in MuJoCo (launch/sim.launch.yaml, policy:=remote).

The server is its own process (a real `PolicyServer` serving a looping scripted policy: the test is
about the transport and the safety path, not the model). SIGKILL it: the policy node's requests
fail within ``remote_timeout``, it publishes nothing, the safety node holds the arm. Restart it on
the same port: the node reconnects by itself, and the arm drives again after the hand-back through
``safety/resume_policy`` (docs/safety.md).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROBOT = "fr3"
TOKEN = "closed-loop-token"
STILL = 2e-3  # [rad] largest joint excursion of a holding arm over the window
MOVED = 5e-3  # [rad] "the arm moves"
SERVER = r"""
import sys
from magma_ros.core.policy_loop import ScriptedPolicy
from magma_ros.serve.server import PolicyServer, ServerConfig
import asyncio, os
script = [[0.01, 0, 0.005, 0, 0, 0, 1.0]] * 4 + [[-0.01, 0, -0.005, 0, 0, 0, 1.0]] * 4
srv = PolicyServer(ScriptedPolicy(script, loop=True, step_period=0.2),
                   ServerConfig(port=int(sys.argv[1]), token=os.environ["MAGMA_ROS_TOKEN"]))
asyncio.run(srv.serve())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(script, port, env, log):
    p = subprocess.Popen([sys.executable, str(script), str(port)], env=env, stdout=open(log, "a"),
                         stderr=subprocess.STDOUT, start_new_session=True)
    end = time.monotonic() + 120
    while time.monotonic() < end and p.poll() is None:
        if "listening on" in log.read_text():
            return p
        time.sleep(0.1)
    raise AssertionError(f"policy server did not start:\n{log.read_text()[-2000:]}")


@pytest.mark.slow
def test_server_killed_mid_run_arm_holds_then_resumes_after_hand_back(ros_env, tmp_path):
    from magma_ros.demo import GraphProbe
    from magma_ros.launch_runner import LaunchRunner

    env = dict(ros_env, MAGMA_ROS_TOKEN=TOKEN)
    script, log = tmp_path / "server.py", tmp_path / "server.log"
    script.write_text(SERVER)
    log.write_text("")
    port = _free_port()
    server = _start_server(script, port, env, log)
    probe = GraphProbe(ROBOT, "jtc")
    args = {"robot": ROBOT, "policy": "remote", "host": "127.0.0.1", "port": str(port), "remote_timeout": "1.0",
            "step_period": "0.2", "tom_rate": "0.0", "width": "160", "height": "120", "image_timeout": "2.0"}
    runner = LaunchRunner("sim.launch.yaml", args, env=env, log_dir=tmp_path / "logs", echo=False,
                          required=("sim", "safety", "servo", "policy"))
    runner.start()
    alive = runner.running

    def explain(what: str) -> str:
        logs = "\n".join(f"--- {k} ---\n" + runner.log_text(k)[-2500:] for k in runner.processes)
        return (f"{what}; twists={len(probe.twists)} states={probe.states[-6:]} sources={probe.sources[-4:]}\n"
                f"--- server ---\n{log.read_text()[-1500:]}\n{logs}")

    def still_for(seconds: float) -> float:
        t0 = time.monotonic()
        probe.wait_for(lambda: False, seconds, alive=alive)
        return probe.motion(t0)

    def settles(timeout: float = 60.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and alive():
            if still_for(1.5) < STILL:
                return True
        return False

    def moves(timeout: float = 120.0) -> bool:
        t0 = time.monotonic()
        return probe.wait_for(lambda: probe.motion(t0) > MOVED, timeout, alive=alive)

    def policy_drives() -> bool:
        return probe.state == "ok" and (probe.sources[-1:] or [""])[0] == "policy"

    try:
        # 1. The remote policy drives the arm.
        assert probe.wait_for(lambda: len(probe.twists) >= 5, 240, alive=alive), explain("no remote actions")
        assert moves(), explain("arm did not move")
        assert probe.wait_for(policy_drives, 30, alive=alive), \
            explain("safety not driving from the policy")

        # 2. The server dies: nothing more is published, the safety node holds, the arm comes to rest.
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
        assert probe.wait_for(lambda: probe.state.startswith("holding"), 60, alive=alive), \
            explain("safety did not hold after the server died")
        assert settles(), explain("arm did not come to rest without a server")
        n = len(probe.twists)
        assert still_for(3.0) < STILL, explain("arm moved without a server")
        assert len(probe.twists) - n <= 1, explain("policy kept publishing without a server")
        assert runner.processes["policy"].poll() is None  # the node stays up and keeps trying

        # 3. The server is back: the node reconnects by itself; the hand-back resumes the arm.
        server = _start_server(script, port, env, log)
        n = len(probe.twists)
        assert probe.wait_for(lambda: len(probe.twists) >= n + 3, 120, alive=alive), \
            explain("policy node did not reconnect")
        probe.call("resume_policy")  # the documented hand-back (docs/safety.md)
        assert probe.wait_for(policy_drives, 60, alive=alive), \
            explain("policy did not get control back")
        assert moves(), explain("arm did not resume after the server came back")
        assert not probe.limits.violations, probe.limits.violations[:10]
    finally:
        runner.stop()
        probe.close()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
