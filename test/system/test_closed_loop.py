"""The whole graph in separate processes over DDS, started from launch/sim.launch.yaml.

MuJoCo + the tiny random-weight Magma checkpoint (constrained decoding, so it emits actions):
the arm moves, every command at the controller topic is inside the robot's limits, a stale camera
makes the arm hold and it resumes when images return, ``safety/estop`` stops it until
``safety/reset``, and killing the policy process leaves the arm holding.

The policy listens to ``test/image_raw`` (launch arg ``image_topic``); this test relays the
simulator's real camera images there, so it can make the camera go stale and come back.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

ROBOT = "fr3"
STEPS = 100  # policy actions the run must reach (acceptance: >= 100 control steps)
STILL = 2e-3  # [rad] a holding arm moves less than this (largest joint excursion) over the window
MOVED = 5e-3  # [rad] "the arm moves": largest joint excursion at least this


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from magma_ros.demo import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _still_for(probe, seconds: float, alive) -> float:
    """Largest joint excursion [rad] over the next ``seconds`` of wall time."""
    t0 = time.monotonic()
    probe.wait_for(lambda: False, seconds, alive=alive)
    return probe.motion(t0)


def _settles(probe, alive, window: float = 1.5, timeout: float = 60.0) -> bool:
    """True once the arm moved less than STILL over some ``window`` seconds (a stop decelerates first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and alive():
        if _still_for(probe, window, alive) < STILL:
            return True
    return False


def _moves_again(probe, alive, timeout=150.0) -> bool:
    t0 = time.monotonic()
    return probe.wait_for(lambda: probe.motion(t0) > MOVED, timeout, alive=alive)


def test_limit_oracle_flags_what_it_must():
    """The checker the system test trusts: it must catch out-of-range positions and too-fast moves."""
    from magma_ros.core.robot import load_robot
    from magma_ros.demo import LimitCheck

    r = load_robot(ROBOT)
    chk = LimitCheck(r)
    q = r.home.copy()
    chk.check(q, 0.01)
    step = 0.9 * r.velocity_max * 0.01  # 90 % of every joint's limit over 10 ms
    chk.check(q + step, 0.01)
    chk.check(q, 0.01)
    assert chk.violations == []
    chk.check(q + 1.2 * r.velocity_max * 0.01, 0.01)  # 20 % too fast
    assert len(chk.violations) == r.dof and "rad/s" in chk.violations[0]
    bad = r.home.copy()
    bad[3] = r.position_max[3] + 0.01
    chk2 = LimitCheck(r)
    chk2.check(bad, None)
    assert len(chk2.violations) == 1 and r.arm_joints[3] in chk2.violations[0]
    chk2.check(np.full(r.dof, np.nan), 0.01)
    assert "malformed" in chk2.violations[-1]


@pytest.mark.slow
def test_closed_loop_holds_stops_and_resumes(ros_env, tmp_path, tiny_ckpt):
    from sensor_msgs.msg import Image

    from magma_ros.demo import GraphProbe
    from magma_ros.launch_runner import LaunchRunner

    probe = GraphProbe(ROBOT, "jtc")
    relay = {"on": True}
    relay_pub = probe.node.create_publisher(Image, "test/image_raw", 2)
    probe.image_callbacks.append(lambda m: relay["on"] and relay_pub.publish(m))
    args = {"robot": ROBOT, "policy": "local", "model": str(tiny_ckpt), "constrained": "true",
            "step_period": "0.1", "image_topic": "test/image_raw", "tom_rate": "0.0",
            "width": "320", "height": "240"}  # small images: the relay through this process stays cheap
    runner = LaunchRunner("sim.launch.yaml", args, env=ros_env, log_dir=tmp_path / "logs", echo=False,
                          required=("sim", "safety", "servo"))
    runner.start()
    alive = runner.running

    def explain(what: str) -> str:
        logs = "\n".join(f"--- {k} ---\n" + runner.log_text(k)[-2500:] for k in runner.processes)
        return (f"{what}; twists={len(probe.twists)} commands={probe.limits.count} "
                f"states={probe.states[-6:]} sources={probe.sources[-3:]}\n{logs}")

    try:
        # 1. Magma drives the arm through servo and safety.
        assert probe.wait_for(lambda: len(probe.twists) >= 5, 240, alive=alive), explain("no policy actions")
        assert _moves_again(probe, alive), explain("arm did not move")
        # a late joint-state message (state_timeout 0.2 s) on a loaded 2-core machine makes the safety
        # node hold for a moment, which is its job; while driving it must be back to ok right after
        assert probe.wait_for(lambda: probe.state == "ok", 15, alive=alive), explain("safety not ok while driving")

        # 2. Stale camera: the policy publishes nothing, the safety watchdog holds the arm.
        relay["on"] = False
        n = len(probe.twists)
        assert probe.wait_for(lambda: probe.state.startswith("holding"), 120, alive=alive), \
            explain("safety did not hold when the camera went stale")
        assert _settles(probe, alive), explain("arm did not come to rest with a stale camera")
        assert len(probe.twists) - n <= 2, explain("policy kept acting on a stale camera")
        assert _still_for(probe, 2.0, alive) < STILL, explain("arm moved with a stale camera")
        # ... and resumes when images return (reset is harmless when nothing is latched)
        relay["on"] = True
        probe.call("reset")
        assert _moves_again(probe, alive), explain("arm did not resume after the camera came back")

        # 3. E-stop latches: the arm stops although the policy keeps sending actions.
        probe.estop()
        assert probe.wait_for(lambda: probe.state == "estopped", 60, alive=alive), explain("no estop")
        assert _settles(probe, alive), explain("arm did not stop after the e-stop")
        n = len(probe.twists)
        assert _still_for(probe, 3.0, alive) < STILL, explain("arm moved while e-stopped")
        assert len(probe.twists) > n, explain("policy stopped acting during the e-stop window")
        ok, msg = probe.call("reset")
        assert ok, explain(f"reset refused: {msg}")
        probe.call("resume_policy")
        assert probe.wait_for(lambda: probe.state != "estopped", 30, alive=alive), explain("still estopped")
        assert _moves_again(probe, alive), explain("arm did not resume after reset")

        # 4. Enough steps, then kill the policy process: the arm holds.
        assert probe.wait_for(lambda: len(probe.twists) >= STEPS, 300, alive=alive), explain("too few steps")
        os.killpg(runner.processes["policy"].pid, signal.SIGKILL)
        assert probe.wait_for(lambda: probe.state.startswith("holding"), 60, alive=alive), \
            explain("safety did not hold after the policy died")
        assert _settles(probe, alive), explain("arm did not come to rest after the policy died")
        assert _still_for(probe, 2.0, alive) < STILL, explain("arm moved after the policy died")
        assert runner.processes["sim"].poll() is None and runner.processes["safety"].poll() is None

        # Every command that reached the controller topic was inside the limits.
        assert probe.limits.count > STEPS, explain("too few controller commands")
        assert not probe.limits.violations, probe.limits.violations[:10]
    finally:
        runner.stop()
        probe.close()
