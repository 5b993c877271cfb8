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
    """The oracle the system tests and the demo trust (LimitAudit, from the robot YAML alone): it must
    catch positions out of range, moves too fast and velocity changes too large on real elapsed time,
    both for set-point streams and for JTC messages, and malformed commands."""
    from magma_ros.core.limit_audit import LimitAudit
    from magma_ros.core.robot import load_robot

    r = load_robot(ROBOT)
    dt = 0.01
    ok = LimitAudit(r, dt)
    q = r.home.copy()
    for k in range(21):  # accelerate at 90 % of the acceleration limit for 0.1 s, then brake to rest
        speed = 0.9 * r.acceleration_max * dt * min(k, 20 - k) * np.where(np.arange(r.dof) % 2, -1.0, 1.0)
        q = q + speed * dt
        ok.point(k * dt, q)
    assert ok.violations == [] and ok.peak_acceleration > 0.85
    fast = LimitAudit(r, dt)
    fast.point(0.0, r.home)
    fast.point(dt, r.home + 1.2 * r.velocity_max * dt)  # from rest to 120 % of the velocity limit at once
    assert any("rad/s over" in x for x in fast.violations) and any("rad/s^2" in x for x in fast.violations)
    bunched = LimitAudit(r, dt)  # the same step as before, but 1 ms after the last one: 10x too fast
    bunched.point(0.0, r.home)
    bunched.point(0.001, r.home + 0.5 * r.velocity_max * dt)
    assert any("rad/s over 1.00 ms" in x for x in bunched.violations)
    bad = r.home.copy()
    bad[3] = r.position_max[3] + 0.01
    pos = LimitAudit(r, dt)
    pos.trajectory(0.0, [dt], [bad])
    assert len(pos.violations) == 1 and r.arm_joints[3] in pos.violations[0]
    pos.point(1.0, np.full(r.dof, np.nan))
    assert "malformed" in pos.violations[-1]
    jtc = LimitAudit(r, dt)  # a JTC message that ends at speed: the controller's abrupt stop is caught
    v = np.full(r.dof, 0.5)
    jtc.start_at(0.0, r.home, v)  # moving at 0.5 rad/s
    jtc.trajectory(0.0, [dt, 2 * dt], [r.home + v * dt, r.home + 2 * v * dt])
    assert not jtc.violations
    assert jtc.finish() and "velocity changes" in jtc.violations[-1]


@pytest.mark.parametrize("kind", ["jtc", "points"])
def test_limit_oracle_joining_a_moving_stream(kind):
    """A probe that subscribes after the arm started moving sees neither the velocity before its first
    command nor how long it was held. Assuming rest there reports a false stop-to-speed change (seen
    in the system tests when the probe's first message came mid-motion); starts_at_rest=False judges
    nothing it cannot know (the first piece, and the first change unless a period of steady motion
    was seen before it) and every change after that."""
    from magma_ros.core.limit_audit import LimitAudit
    from magma_ros.core.robot import load_robot

    r = load_robot(ROBOT)
    dt = 0.01
    v = np.full(r.dof, 0.3)  # cruising at 0.3 rad/s (a 0.3 rad/s change in 10 ms is 3x the FR3's A)

    def feed(audit, first_stamp, jump_at=None):
        q = r.home.copy()
        for k in range(30):
            t = first_stamp + k * dt
            vk = v if jump_at is None or k < jump_at else 2 * v  # from jump_at on twice as fast
            if kind == "jtc":  # joined 2 ms after a message: the first message seen starts mid-period
                audit.trajectory(t, [dt, 2 * dt], [q + vk * dt, q + 2 * vk * dt])
            else:
                audit.point(t, q)
            q = q + vk * dt

    assumed = LimitAudit(r, dt)
    feed(assumed, 0.002)
    assert any("velocity changes" in x for x in assumed.violations)  # the false finding
    joined = LimitAudit(r, dt, starts_at_rest=False)
    feed(joined, 0.002)
    assert joined.violations == [] and joined.pieces > 20
    real = LimitAudit(r, dt, starts_at_rest=False)
    feed(real, 0.002, jump_at=15)  # after a steady period was seen: judged
    assert any("velocity changes" in x for x in real.violations), real.violations


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
        return (f"{what}; twists={len(probe.twists)} commands={probe.command_count} "
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

        # Every command that reached the controller topic was inside the limits (position, velocity,
        # acceleration on the commands' own stamps, as the controller executes them).
        assert probe.command_count > STEPS, explain("too few controller commands")
        audit = probe.limits
        assert audit.pieces > STEPS and not audit.violations, audit.violations[:10]
    finally:
        runner.stop()
        probe.close()
