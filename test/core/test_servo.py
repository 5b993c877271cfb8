"""Servo core: twist x step period = the TCP delta (FK check), target vs measured mode, holds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _geometry import exp_so3

from magma_ros.core.errors import ConfigError
from magma_ros.core.kinematics import Kinematics, pose_error, rotvec_to_matrix
from magma_ros.core.robot import load_robot
from magma_ros.core.servo import Servo, ServoConfig, apply_delta

# A comfortable working pose per robot: home for the Frankas; the WidowX in its sim start (SimplerEnv's Bridge
# pose, condition number 12; its home is a wrist singularity).
WORK_Q = {"fr3": None, "panda": None, "wx250s": np.array([0.0, 0.04, 0.22, 0.0, 1.37, 0.0])}
T = 0.2


@pytest.fixture(scope="module", params=["fr3", "panda", "wx250s"])
def robot_kin(request):
    rb = load_robot(request.param)
    return rb, Kinematics(rb)


def start_q(rb):
    q = WORK_Q[rb.name]
    return rb.home.copy() if q is None else q.copy()


def state(servo, rb, q, t, finger=None):
    names = list(rb.arm_joints) + ([rb.gripper.joint] if finger is not None else [])
    pos = list(q) + ([finger] if finger is not None else [])
    # any order, extra joints ignored
    assert servo.update_state(names[::-1] + ["some_other_joint"], pos[::-1] + [1.0], t)


def check_delta(kin, q_from, q_to, dpos, drot, tol_p=2e-4, tol_r=2e-3):
    """FK(q_to) == (FK(q_from).p + dpos, Exp(drot) FK(q_from).R) within tolerance."""
    a, b = kin.fk(q_from), kin.fk(q_to)
    want = np.eye(4)
    want[:3, 3] = a[:3, 3] + dpos
    want[:3, :3] = rotvec_to_matrix(drot) @ a[:3, :3]  # pinocchio's exp3, not the servo's
    dp, dr = pose_error(want, b)
    assert np.linalg.norm(dp) < tol_p, f"position off by {np.linalg.norm(dp) * 1e3:.3f} mm"
    assert np.linalg.norm(dr) < tol_r, f"rotation off by {np.degrees(np.linalg.norm(dr)):.3f} deg"


def arm(cmd, rb):
    return cmd.positions[-1, : rb.dof]


def test_twist_times_step_period_moves_the_tcp_by_exactly_that_delta(robot_kin):
    rb, kin = robot_kin
    servo = Servo(rb, kin, ServoConfig(robot=rb.name, step_period=T))
    q0 = start_q(rb)
    state(servo, rb, q0, 10.0)
    v, w = np.array([0.05, -0.03, 0.02]), np.array([0.1, -0.2, 0.15])  # -> 1 cm, 0.6 cm, 0.4 cm; ~3 deg
    res = servo.on_twist(10.0, v, w, now=10.05)
    assert res.reason == "applied", res.reason
    cmd = res.command
    assert cmd.joint_names[: rb.dof] == rb.arm_joints
    assert cmd.times == (pytest.approx(T),) and cmd.stamp == 10.05
    check_delta(kin, q0, arm(cmd, rb), v * T, w * T)


def test_several_points_follow_a_straight_tcp_line(robot_kin):
    rb, kin = robot_kin
    servo = Servo(rb, kin, ServoConfig(robot=rb.name, step_period=T, points=4))
    q0 = start_q(rb)
    state(servo, rb, q0, 1.0)
    v, w = np.array([0.0, 0.1, -0.05]), np.array([0.0, 0.0, 0.3])
    cmd = servo.on_twist(1.0, v, w, now=1.0).command
    assert cmd.times == pytest.approx((0.05, 0.1, 0.15, 0.2))
    for k in range(4):
        check_delta(kin, q0, cmd.positions[k, : rb.dof], v * T * (k + 1) / 4, w * T * (k + 1) / 4)


def test_target_mode_chains_deltas_on_the_previous_target_not_the_sagging_arm(robot_kin):
    rb, kin = robot_kin
    servo = Servo(rb, kin, ServoConfig(robot=rb.name, step_period=T, delta_mode="target"))
    q0 = start_q(rb)
    state(servo, rb, q0, 0.0)
    d1, d2 = np.array([0.05, 0.0, 0.0]), np.array([0.0, 0.0, 0.05])
    q1 = arm(servo.on_twist(0.0 + 1e-3, d1, np.zeros(3), now=0.01).command, rb)
    # the arm lags/sags 3 mm below the first target
    sag = kin.solve_delta(q1, [0, 0, -0.003], [0, 0, 0]).q
    state(servo, rb, sag, 0.2)
    q2 = arm(servo.on_twist(0.2, d2, np.zeros(3), now=0.21).command, rb)
    check_delta(kin, q1, q2, d2 * T, np.zeros(3))  # from the previous TARGET
    check_delta(kin, q0, q2, (d1 + d2) * T, np.zeros(3))  # no accumulated sag


def test_measured_mode_applies_each_delta_to_the_measured_pose(robot_kin):
    rb, kin = robot_kin
    servo = Servo(rb, kin, ServoConfig(robot=rb.name, step_period=T, delta_mode="measured"))
    q0 = start_q(rb)
    state(servo, rb, q0, 0.0)
    d = np.array([0.05, 0.0, 0.0])
    q1 = arm(servo.on_twist(0.001, d, np.zeros(3), now=0.01).command, rb)
    lagged = kin.solve_delta(q1, [0, 0, -0.003], [0, 0, 0]).q
    state(servo, rb, lagged, 0.2)
    q2 = arm(servo.on_twist(0.2, d, np.zeros(3), now=0.21).command, rb)
    check_delta(kin, lagged, q2, d * T, np.zeros(3))


def test_robot_yaml_picks_the_delta_mode():
    assert Servo(load_robot("wx250s"), Kinematics("wx250s")).delta_mode == "target"  # Bridge
    assert Servo(load_robot("fr3"), Kinematics("fr3")).delta_mode == "measured"  # RT-1
    with pytest.raises(ConfigError):
        ServoConfig(delta_mode="absolute").validate()
    with pytest.raises(ConfigError):
        ServoConfig(step_period=0.0).validate()


def test_target_mode_reanchors_when_the_arm_was_moved_away():
    rb = load_robot("wx250s")
    kin = Kinematics(rb)
    servo = Servo(rb, kin, ServoConfig(robot=rb.name, step_period=T))
    q0 = start_q(rb)
    state(servo, rb, q0, 0.0)
    servo.on_twist(0.01, [0.05, 0, 0], [0, 0, 0], now=0.01)
    moved = kin.solve_delta(q0, [0.0, 0.08, 0.0], [0, 0, 0]).q  # teleop moved it 8 cm sideways
    state(servo, rb, moved, 1.0)
    q2 = arm(servo.on_twist(1.0, [0, 0, 0.05], [0, 0, 0], now=1.0).command, rb)
    check_delta(kin, moved, q2, [0, 0, 0.01], np.zeros(3))


def test_each_twist_is_used_once_and_old_or_bad_twists_hold(robot_kin):
    rb, kin = robot_kin
    servo = Servo(rb, kin, ServoConfig(robot=rb.name, step_period=T, max_action_age=2.0))
    state(servo, rb, start_q(rb), 100.0)
    v = [0.02, 0, 0]
    assert servo.on_twist(99.5, v, [0, 0, 0], now=100.0).command is not None
    for stamp, now, why in [
        (99.5, 100.1, "duplicate"),  # same action again
        (99.3, 100.1, "duplicate"),  # out of order
        (97.9, 100.1, "stale"),  # 2.2 s old > max_action_age
        (101.0, 100.1, "future"),
    ]:
        state(servo, rb, start_q(rb), now)
        res = servo.on_twist(stamp, v, [0, 0, 0], now=now)
        assert res.command is None and res.reason.startswith(why), (stamp, res.reason)
    res = servo.on_twist(100.2, [float("nan"), 0, 0], [0, 0, 0], now=100.2)
    assert res.command is None and "NaN" in res.reason
    res = servo.on_twist(100.2, [0.9, 0, 0], [0, 0, 0], now=100.2)  # 18 cm in one step
    assert res.command is None and res.reason.startswith("too large")
    assert servo.stats.applied == 1 and sum(servo.stats.dropped.values()) == 6


def test_no_or_stale_joint_states_hold():
    rb = load_robot("fr3")
    servo = Servo(rb, Kinematics(rb), ServoConfig(step_period=T, state_timeout=0.5))
    assert servo.on_twist(1.0, [0.01, 0, 0], [0, 0, 0], now=1.0).reason == "no joint states yet"
    state(servo, rb, rb.home, 1.0)
    res = servo.on_twist(2.0, [0.01, 0, 0], [0, 0, 0], now=2.0)
    assert res.command is None and res.reason.startswith("joint states stale")
    assert servo.stats.dropped == {"no joint states yet": 1, "joint states stale": 1}  # kinds, not figures
    assert not servo.update_state(["fr3_joint1"], [0.0], 2.0)  # missing arm joints refused


def test_beyond_reach_the_feasible_part_is_carried_out_and_the_target_is_the_reached_pose():
    """Scale, don't reject: a step past the workspace edge moves the arm as far as it goes; the target
    is where it got to, so the next step starts there (the unreachable rest is not kept)."""
    rb = load_robot("wx250s")
    kin = Kinematics(rb)
    servo = Servo(rb, kin, ServoConfig(robot=rb.name, step_period=T, max_delta_pos=2.0))
    q0 = start_q(rb)
    state(servo, rb, q0, 0.0)
    res = servo.on_twist(0.01, [4.0, 0, 0], [0, 0, 0], now=0.01)  # 0.8 m further out: beyond reach
    assert res.reason == "applied" and res.command is not None
    q1 = arm(res.command, rb)
    p0, p1 = kin.fk(q0)[:3, 3], kin.fk(q1)[:3, 3]
    assert p1[0] - p0[0] > 0.02  # it moved outwards, a lot less than 0.8 m
    assert 0.0 < res.step.fraction < 0.5 and res.step.limited
    assert np.allclose(servo.target_q, q1)
    state(servo, rb, q1, 0.2)
    q2 = arm(servo.on_twist(0.2, [0, 0, -0.05], [0, 0, 0], now=0.2).command, rb)
    check_delta(kin, q1, q2, [0, 0, -0.01], np.zeros(3), tol_p=1e-3, tol_r=1e-2)


def test_late_twist_is_counted_and_the_arm_held_in_between():
    rb = load_robot("panda")
    servo = Servo(rb, Kinematics(rb), ServoConfig(robot="panda", step_period=T))
    state(servo, rb, rb.home, 0.0)
    servo.on_twist(0.0001, [0.01, 0, 0], [0, 0, 0], now=0.0)
    state(servo, rb, rb.home, 0.15)
    servo.on_twist(0.15, [0.01, 0, 0], [0, 0, 0], now=0.15)  # early: no hold
    state(servo, rb, rb.home, 0.9)
    servo.on_twist(0.9, [0.01, 0, 0], [0, 0, 0], now=0.9)  # after 0.35 s with nothing new: held
    assert servo.stats.applied == 3 and servo.stats.held_late == 1
    assert servo.last_spacing == pytest.approx(0.75)


def test_gripper_maps_to_metres_and_updates_the_running_step():
    rb = load_robot("fr3")
    servo = Servo(rb, Kinematics(rb), ServoConfig(step_period=T))
    state(servo, rb, rb.home, 0.0, finger=0.04)
    # gripper alone: arm holds the measured position, finger 0.5 -> 0.02 m
    res = servo.on_gripper(0.5, 0.0, now=0.0)
    assert res.reason == "gripper"
    assert res.command.joint_names == rb.arm_joints + (rb.gripper.joint,)
    assert np.allclose(res.command.positions[0], list(rb.home) + [0.02])
    assert servo.on_gripper(0.5, 0.0, now=0.01).command is None  # unchanged: nothing to send
    cmd = servo.on_twist(0.05, [0.02, 0, 0], [0, 0, 0], now=0.05).command
    assert cmd.positions[-1, -1] == pytest.approx(0.02)
    res = servo.on_gripper(0.0, 0.0, now=0.15)  # 0.1 s into the step: the remaining 0.1 s re-sent
    assert res.command.times == (pytest.approx(0.1),)
    assert np.allclose(res.command.positions[0, :-1], cmd.positions[-1, :-1])
    assert res.command.positions[0, -1] == pytest.approx(rb.gripper.closed)
    assert servo.on_gripper(float("inf"), 0.0, now=0.2).command is None


def test_finger_joint_absent_until_known():
    rb = load_robot("wx250s")
    servo = Servo(rb, Kinematics(rb), ServoConfig(robot="wx250s", step_period=T))
    state(servo, rb, start_q(rb), 0.0)  # joint states without the finger
    cmd = servo.on_twist(0.01, [0.01, 0, 0], [0, 0, 0], now=0.01).command
    assert cmd.joint_names == rb.arm_joints
    servo.on_gripper(1.0, 0.0, now=0.02)
    cmd = servo.on_twist(0.2, [0.01, 0, 0], [0, 0, 0], now=0.2).command
    assert cmd.joint_names[-1] == "left_finger" and cmd.positions[-1, -1] == pytest.approx(0.037)


def test_apply_delta_is_base_frame_left_multiplication():
    pose = np.eye(4)
    pose[:3, :3] = exp_so3([0.0, 0.0, np.pi / 2])
    out = apply_delta(pose, [0.1, 0, 0], [np.pi / 2, 0, 0])
    assert np.allclose(out[:3, 3], [0.1, 0, 0])
    assert np.allclose(out[:3, :3], exp_so3([np.pi / 2, 0, 0]) @ exp_so3([0, 0, np.pi / 2]))
    assert dataclasses.is_dataclass(ServoConfig)


def test_keepalive_resends_the_same_target_only_while_settling():
    rb = load_robot("fr3")
    servo = Servo(rb, Kinematics(rb), ServoConfig(step_period=T, settle_time=1.0, keepalive_period=0.2))
    assert servo.keepalive(0.0).command is None  # nothing applied yet
    state(servo, rb, rb.home, 0.0)
    cmd = servo.on_twist(0.001, [0.05, 0, 0], [0, 0, 0], now=0.0).command
    assert servo.keepalive(0.1).command is None  # the step is still running
    sent = [servo.keepalive(t) for t in np.arange(0.2, 1.5, 0.05)]
    got = [r.command for r in sent if r.command is not None]
    assert 5 <= len(got) <= 6  # every 0.2 s from 0.2 s to 1.2 s, then silence
    for c in got:
        assert np.allclose(c.positions[-1], cmd.positions[-1]) and c.times == (pytest.approx(0.2),)
    assert all(r.command is None for r in sent[-5:])


# ----------------------------------------------------------------------------- velocity-level stepping
def condition_number(kin, q) -> float:
    s = np.linalg.svd(kin.jacobian(q), compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")


def moveit_scale(kappa: float, into: bool, lower=17.0, hard=30.0, mult=2.0, floor=0.25) -> float:
    """MoveIt Servo's velocityScalingFactorForSingularity (common.cpp), written out independently;
    ``floor`` is this project's: motion that does not head into the singularity is never stopped."""
    if kappa <= lower:
        return 1.0
    if into:
        return max(0.0, 1.0 - (kappa - lower) / (hard - lower))
    return max(floor, 1.0 - (kappa - lower) / (lower + (hard - lower) * mult - lower))


@pytest.mark.parametrize("twist", [((0, 0, 0), (0, 0, 0.2)), ((0, 0.05, 0), (0, 0, 0)),
                                   ((0, 0, 0), (0, 0, -0.2)), ((0, -0.05, 0), (0, 0, 0))],
                         ids=["yaw+", "y+", "yaw-", "y-"])
def test_widowx_from_its_singular_home_a_pure_yaw_or_sideways_twist_moves_it_out_of_the_singularity(twist):
    """Issue 10: at the all-zeros home the wrist rolls are collinear (rank 5) and a yaw or sideways
    move needs a large roll / counter-roll first. The servo must move (not hold every step), leave
    the singularity, never exceed a joint's velocity limit, and then carry out whole steps."""
    rb = load_robot("wx250s")
    kin = Kinematics(rb)
    assert np.linalg.matrix_rank(kin.jacobian(rb.home), tol=1e-9) == 5  # exactly singular
    v, w = np.array(twist[0], float), np.array(twist[1], float)
    servo = Servo(rb, kin, ServoConfig(robot=rb.name, step_period=T, points=10))  # every 20 ms cycle
    q, t, steps = rb.home.copy(), 0.0, 25
    for _ in range(steps):
        state(servo, rb, q, t)
        res = servo.on_twist(t, v, w, now=t)
        assert res.command is not None, res.reason
        path = np.vstack([q, res.command.positions[:, : rb.dof]])
        dt = np.diff(np.concatenate([[0.0], res.command.times]))
        speed = np.abs(np.diff(path, axis=0)) / dt[:, None]
        assert np.all(speed <= rb.velocity_max + 1e-9), speed.max(axis=0)
        q, t = path[-1], t + T
    dp, dr = pose_error(kin.fk(q), kin.fk(rb.home))
    want_p, want_r = v * T * steps, w * T * steps
    assert condition_number(kin, q) < 30.0  # below MoveIt's hard stop: out of the singularity
    if np.any(w):
        assert dr @ want_r / (want_r @ want_r) > 0.5  # more than half of the commanded yaw
        assert np.linalg.norm(dp) < 0.04 and abs(dr[0]) + abs(dr[1]) < 0.02
    else:
        assert dp @ want_p / (want_p @ want_p) > 0.5  # more than half of the commanded 25 cm
        assert abs(dp[0]) + abs(dp[2]) < 0.02 and np.linalg.norm(dr) < 0.03
    assert servo.stats.applied == steps and res.step.fraction > 0.9  # whole steps once out


def widowx_near_wrist_singularity():
    """A WidowX pose with the wrist almost straight (condition number between 17 and 30) and the joint
    direction that bends the wrist further (leaving) or straightens it (into the singularity)."""
    rb = load_robot("wx250s")
    kin = Kinematics(rb)
    q = np.array([0.0, 0.3, -0.3, 0.0, 0.0, 0.0])
    for wa in np.linspace(0.3, 0.0, 301):  # the smallest wrist bend still below the hard stop
        q[4] = wa
        if condition_number(kin, q) > 25.0:
            q[4] = wa + 0.001
            break
    return rb, kin, q


def test_singularity_slow_down_applies_only_when_heading_into_it():
    rb, kin, q = widowx_near_wrist_singularity()
    kappa = condition_number(kin, q)
    assert 17.0 < kappa < 30.0
    J = kin.jacobian(q)
    servo = Servo(rb, kin, ServoConfig(robot=rb.name, step_period=T, control_period=T))  # one cycle
    bend = np.zeros(rb.dof)
    bend[4] = 0.002  # [rad] wrist_angle: > 0 bends away from the straight (singular) wrist
    into_d = J @ -bend  # the TCP deltas that joint motion gives: into / out of the singularity
    out_d = J @ bend
    q_in, info_in = servo.plan_step(q, kin.fk(q), into_d[:3], into_d[3:])
    q_out, info_out = servo.plan_step(q, kin.fk(q), out_d[:3], out_d[3:])
    assert info_in.singularity_scale == pytest.approx(moveit_scale(kappa, True), abs=1e-6)
    assert info_out.singularity_scale == pytest.approx(moveit_scale(kappa, False), abs=1e-6)
    assert info_in.singularity_scale < info_out.singularity_scale
    assert info_in.fraction == pytest.approx(info_in.singularity_scale, abs=0.05)
    assert info_in.limited == "singularity"
    # deeper in (past the hard stop): heading in stops, backing out still moves
    q_deep = q.copy()
    q_deep[4] = 0.004
    assert condition_number(kin, q_deep) > 30.0
    J = kin.jacobian(q_deep)
    into_d, out_d = J @ -bend, J @ bend
    _, stop = servo.plan_step(q_deep, kin.fk(q_deep), into_d[:3], into_d[3:])
    q_back, back = servo.plan_step(q_deep, kin.fk(q_deep), out_d[:3], out_d[3:])
    assert stop.singularity_scale == 0.0 and stop.fraction < 0.05
    assert back.fraction >= 0.25 - 0.05 and q_back[-1][4] > q_deep[4]
    assert condition_number(kin, q_back[-1]) < condition_number(kin, q_deep)


def test_joint_velocity_limits_scale_the_step_and_keep_its_direction():
    rb = load_robot("fr3")
    kin = Kinematics(rb)
    servo = Servo(rb, kin, ServoConfig(robot="fr3", step_period=T, joint_velocity_scale=0.1, points=10))
    q0 = rb.home.copy()
    state(servo, rb, q0, 0.0)
    w = np.array([0.0, 0.0, 2.5])  # 0.5 rad about z in one step: far more than 10 % of the limits
    res = servo.on_twist(0.001, [0, 0, 0], w, now=0.001)
    path = np.vstack([q0, res.command.positions[:, : rb.dof]])
    speed = np.abs(np.diff(path, axis=0)) / (T / 10)
    assert np.all(speed <= 0.1 * rb.velocity_max + 1e-9)
    info = res.step
    assert info.velocity_scale < 1.0 and info.limited == "joint velocity" and 0.05 < info.fraction < 0.95
    dp, dr = pose_error(kin.fk(path[-1]), kin.fk(q0))
    assert np.linalg.norm(dp) < 1e-3  # no translation was asked for, none was made
    assert dr[2] > 0.02 and np.hypot(dr[0], dr[1]) < 0.05 * dr[2]  # a part of the same rotation


@pytest.mark.parametrize("name", ["fr3", "wx250s"])
def test_servo_plans_inside_the_position_margin_the_safety_node_keeps(name):
    """One margin (RobotConfig.position_margin) for servo and safety: a step driving a joint towards its
    limit stops at the band's edge, so nothing the servo sends is clamped downstream."""
    from magma_ros.core.safety import SafetyFilter

    rb = load_robot(name)
    kin = Kinematics(rb)
    assert rb.position_margin == pytest.approx(0.05)
    servo = Servo(rb, kin, ServoConfig(robot=name, step_period=T))
    safety = SafetyFilter(rb)  # its default configuration: the margin from the robot YAML
    lo, hi = servo.position_band
    assert np.allclose(lo, safety.q_lo) and np.allclose(hi, safety.q_hi)  # one band, one source
    q0 = start_q(rb)
    q0[0] = rb.position_max[0] - 0.08  # the base joint 3 cm inside the band's edge
    state(servo, rb, q0, 0.0)
    d = kin.jacobian(q0)[:, 0] * 0.2  # the TCP motion of turning the base joint by 0.2 rad
    res = servo.on_twist(0.001, d[:3] / T, d[3:] / T, now=0.001)
    q1 = arm(res.command, rb)
    assert np.all(q1 <= rb.position_max - rb.position_margin + 1e-9)
    assert np.all(q1 >= rb.position_min + rb.position_margin - 1e-9)
    assert q1[0] == pytest.approx(rb.position_max[0] - rb.position_margin, abs=1e-6)  # up to the edge
    if rb.dof > 6:  # the Franka is redundant: the other joints carry out the rest of the step
        assert res.step.fraction > 0.95
    else:
        assert res.step.fraction < 0.95 and res.step.limited == "joint limit"


def test_clock_jumping_back_does_not_stall_the_servo():
    """Isaac Sim reset / a looping bag: the clock restarts. Without the reset of the stamp state every
    new twist would be 'not newer than the last' until the clock caught up."""
    rb = load_robot("fr3")
    kin = Kinematics(rb)
    servo = Servo(rb, kin, ServoConfig(robot="fr3", step_period=T, delta_mode="target"))
    state(servo, rb, rb.home, 100.0)
    assert servo.on_twist(100.0, [0.02, 0, 0], [0, 0, 0], now=100.0).reason == "applied"
    assert servo.stats.clock_resets == 0
    moved = kin.solve_delta(rb.home, [0.0, 0.02, 0.0], [0, 0, 0]).q  # the reset moved the arm
    state(servo, rb, moved, 3.0)  # sim time 3 s after the reset
    assert servo.stats.clock_resets == 1 and "jumped back" in servo.clock_note
    res = servo.on_twist(2.9, [0, 0, 0.05], [0, 0, 0], now=3.0)
    assert res.reason == "applied", res.reason
    check_delta(kin, moved, arm(res.command, rb), [0, 0, 0.01], np.zeros(3))  # re-anchored on the arm
    state(servo, rb, moved, 3.1)
    assert servo.on_twist(2.9, [0, 0, 0.05], [0, 0, 0], now=3.1).reason.startswith("duplicate")
    assert servo.stats.clock_resets == 1  # one jump, counted once


def test_a_step_across_a_clock_jump_needs_fresh_joint_states():
    rb = load_robot("panda")
    servo = Servo(rb, Kinematics(rb), ServoConfig(robot="panda", step_period=T))
    state(servo, rb, rb.home, 50.0)
    res = servo.on_twist(1.0, [0.01, 0, 0], [0, 0, 0], now=1.0)  # the clock restarted; no state since
    assert res.command is None and res.reason == "no joint states yet"
