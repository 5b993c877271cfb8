"""Every robot moves under the random-weight policy in the MuJoCo demo graph (issue 10 acceptance).

The graph of ``launch/sim.launch.yaml`` (sim, safety, servo, policy as separate processes over DDS,
on the simulator's clock) with the tiny random-weight Magma checkpoint, constrained decoding so that
it emits actions. For each robot, from its ``sim_start`` (the WidowX: SimplerEnv's Bridge pose):

- at least STEPS policy actions reach the servo and the arm moves;
- the servo holds (sends no step for an action) on fewer than 5 % of them: near singularities and
  limits it carries out the feasible part instead of refusing the step;
- every command at the controller topic is inside the robot's limits: the JTC stream is run through
  the independent :class:`~magma_ros.core.limit_audit.LimitAudit` (robot YAML limits and margin, on
  the messages' own stamps: real elapsed time).

Holds are counted as the actions the probe saw on ``magma/ee_twist`` less the steps the servo reports
as applied in its diagnostics (or the drops it reports, if more), after the policy process is stopped
(so the counts are final).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

STEPS = 100  # policy actions per robot
MAX_HOLDS = 0.05  # fraction of the actions the servo may hold on
MOVED = 0.05  # [rad] largest joint excursion at least this


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from magma_ros.demo import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("robot", ["fr3", "panda", "wx250s"])
def test_random_policy_moves_the_arm_with_few_servo_holds(robot, ros_env, tmp_path, tiny_ckpt):
    from diagnostic_msgs.msg import DiagnosticArray
    from trajectory_msgs.msg import JointTrajectory

    from magma_ros.core.limit_audit import LimitAudit
    from magma_ros.demo import GraphProbe
    from magma_ros.launch_runner import LaunchRunner

    probe = GraphProbe(robot, "jtc")
    rb = probe.robot
    # safety output_rate 100 Hz; this probe may join the stream after the arm started moving
    audit = LimitAudit(rb, 0.01, position_margin=rb.position_margin, starts_at_rest=False)
    audited = []  # [number of JTC messages]

    def on_jtc(m):
        start = m.header.stamp.sec + m.header.stamp.nanosec * 1e-9  # the safety node stamps each message
        order = [list(m.joint_names).index(j) for j in rb.arm_joints]
        audit.trajectory(start, [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in m.points],
                         [[p.positions[i] for i in order] for p in m.points])
        audited.append(start)

    probe.node.create_subscription(JointTrajectory, f"{rb.arm_controller}/joint_trajectory", on_jtc, 1000)
    servo_diag: dict[str, str] = {}

    def on_diag(m):
        for st in m.status:
            if st.name == "magma_ros: servo":
                servo_diag.clear()
                servo_diag.update({kv.key: kv.value for kv in st.values})

    probe.node.create_subscription(DiagnosticArray, "diagnostics", on_diag, 50)
    args = {"robot": robot, "policy": "local", "model": str(tiny_ckpt), "constrained": "true",
            "step_period": "0.1", "tom_rate": "0.0", "image_timeout": "1.0", "width": "160", "height": "120"}
    runner = LaunchRunner("sim.launch.yaml", args, env=ros_env, log_dir=tmp_path / "logs", echo=False,
                          required=("sim", "safety", "servo"))
    runner.start()
    alive = runner.running

    def explain(what: str) -> str:
        logs = "\n".join(f"--- {k} ---\n" + runner.log_text(k)[-2500:] for k in runner.processes)
        return f"{robot}: {what}; twists={len(probe.twists)} servo={servo_diag}\n{logs}"

    try:
        assert probe.wait_for(lambda: len(probe.twists) >= 1, 300, alive=alive), explain("no policy action")
        t_first = time.monotonic()
        assert probe.wait_for(lambda: len(probe.twists) >= STEPS, 400, alive=alive), explain("too few steps")
        os.killpg(runner.processes["policy"].pid, signal.SIGKILL)  # no more actions: the counts settle
        n = len(probe.twists)

        def settled() -> bool:
            return bool(servo_diag) and int(servo_diag.get("applied", 0)) + sum(
                int(v) for k, v in servo_diag.items() if k.startswith("dropped_")) >= n

        probe.wait_for(settled, 10, alive=alive)
        time.sleep(1.5)  # one more diagnostics period
        n = len(probe.twists)
        applied = int(servo_diag.get("applied", 0))
        dropped = {k: int(v) for k, v in servo_diag.items() if k.startswith("dropped_")}
        # twists the probe saw but the servo did not apply, or that the servo counted as dropped; the
        # larger (the probe may have matched the policy a moment after the servo did)
        holds = max(n - applied, sum(dropped.values()))
        moved = probe.motion(t_first)
        print(f"{robot}: {n} actions, {applied} applied, holds {holds} ({holds / n:.1%}) {dropped}, "
              f"scaled {servo_diag.get('scaled')}, last condition number {servo_diag.get('condition_number')}, "
              f"motion {moved:.3f} rad, {len(audited)} controller commands, peak velocity "
              f"{audit.peak_velocity:.2f} / acceleration {audit.peak_acceleration:.2f} of the limits")
        assert applied >= STEPS - MAX_HOLDS * n, explain("too few applied steps")
        assert holds < MAX_HOLDS * n, explain(f"servo held on {holds} of {n} actions: {dropped}")
        assert moved > MOVED, explain(f"arm moved only {moved:.4f} rad")
        assert len(audited) > STEPS and all(t > 0 for t in audited), explain("too few / unstamped commands")
        assert not audit.violations, explain(f"limit violations {audit.violations[:10]}")
    finally:
        runner.stop()
        probe.close()
