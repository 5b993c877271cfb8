"""The WidowX started exactly at its singular all-zeros home, in MuJoCo (issue 10 acceptance).

Path as in the nodes: ``Servo.on_twist`` -> a JTC-like trajectory follower -> MuJoCo position
servos; joint states come from the simulator. A pure yaw and a sideways translation are commanded,
each from the home pose; the arm must move, leave the singularity (the Jacobian's condition number
drops below MoveIt Servo's hard stop) and no joint may exceed its velocity limit, neither in the
commands nor in the velocities MuJoCo measures.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from magma_ros.core.kinematics import Kinematics, pose_error
from magma_ros.core.servo import Servo, ServoConfig

T = 0.2  # Bridge: 5 Hz
HARD_STOP = 30.0  # MoveIt Servo's hard_stop_singularity_threshold (default)


def test_widowx_leaves_its_singular_home_under_yaw_and_sideways_twists_in_mujoco():
    from magma_ros.sim.arm import ArmSim
    from magma_ros.sim.follower import TrajectoryFollower
    from magma_ros.sim.scene import load_sim_config

    cfg = dataclasses.replace(load_sim_config(), objects={})  # the arm alone: no contacts
    sim = ArmSim("wx250s", width=64, height=48, config=cfg)
    rb = sim.robot
    kin = Kinematics(rb)
    peak = np.zeros(rb.dof)  # largest |qd| MuJoCo measured per joint
    cmd_peak = np.zeros(rb.dof)  # largest commanded joint speed per joint

    def run(seconds: float) -> None:
        for _ in range(int(round(seconds / sim.timestep))):
            q, qd = follower.sample(sim.time)
            sim.set_targets(q, rb.gripper.open, qd)
            sim.step(1)
            np.maximum(peak, np.abs(sim.qd()), out=peak)

    phases = {"yaw": ((0.0, 0.0, 0.0), (0.0, 0.0, 0.2)), "sideways": ((0.0, 0.05, 0.0), (0.0, 0.0, 0.0))}
    report = {}
    for name, (v, w) in phases.items():
        sim.reset(rb.home)  # exactly the singular home (not the simulator's sim_start)
        s = np.linalg.svd(kin.jacobian(sim.q()), compute_uv=False)
        assert s[-1] < 1e-9, s  # rank lost: forearm_roll and wrist_rotate collinear
        servo = Servo(rb, kin, ServoConfig(robot="wx250s", step_period=T, points=4))
        follower = TrajectoryFollower(sim.q())
        run(0.3)
        before = sim.tcp_pose()
        for _ in range(25):
            names, pos, _, _ = sim.joint_state()
            servo.update_state(names, pos, sim.time)
            res = servo.on_twist(sim.time, v, w, now=sim.time)
            assert res.command is not None, f"{name}: servo held: {res.reason}"
            cmd = res.command
            path = np.vstack([follower.sample(sim.time)[0], cmd.positions[:, : rb.dof]])
            dts = np.diff(np.concatenate([[0.0], cmd.times]))
            np.maximum(cmd_peak, (np.abs(np.diff(path, axis=0)) / dts[:, None]).max(axis=0), out=cmd_peak)
            follower.set_trajectory(sim.time, cmd.times, cmd.positions[:, : rb.dof])
            run(T)
        dp, dr = pose_error(sim.tcp_pose(), before)
        s = np.linalg.svd(kin.jacobian(sim.q()), compute_uv=False)
        report[name] = (dp, dr, s[0] / s[-1])
    print({k: (np.round(dp, 3), np.round(dr, 3), round(float(c), 1)) for k, (dp, dr, c) in report.items()},
          "peak |qd| / limit", np.round(peak / rb.velocity_max, 2))
    dp, dr, kappa_yaw = report["yaw"]
    assert dr[2] > 0.4 and np.linalg.norm(dp) < 0.04  # of 1.0 rad commanded, although a yaw is lost at home
    dp, dr, kappa = report["sideways"]
    assert dp[1] > 0.12 and abs(dp[2]) < 0.02  # of 0.25 m commanded, at its height
    assert kappa < HARD_STOP and kappa_yaw < HARD_STOP  # out of the singularity
    assert np.all(cmd_peak <= rb.velocity_max + 1e-9), cmd_peak
    assert np.all(peak <= rb.velocity_max), peak / rb.velocity_max  # MuJoCo's measured velocities
