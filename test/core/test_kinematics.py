"""Kinematics core: FK against the makers' published models, Jacobian, IK round trips and failures.

The reference kinematics here are written independently of the URDFs and of pinocchio: Franka's
modified-DH table (+ flange, hand yaw and TCP offset) and the Interbotix product-of-exponentials model
(Slist and M of ``mr_descriptions.py``) for the WidowX 250s.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from _geometry import exp_so3
from hypothesis import given, settings
from hypothesis import strategies as st

from magma_ros.core.errors import ConfigError
from magma_ros.core.kinematics import (
    IKResult,
    Kinematics,
    matrix_to_quat,
    matrix_to_rotvec,
    matrix_to_rpy,
    pose_error,
    quat_to_matrix,
    rotvec_to_matrix,
    rpy_to_matrix,
)

ROBOTS = ("fr3", "panda", "wx250s")
POS_TOL = 1e-4  # [m] FK agreement (0.1 mm)
ROT_TOL = np.deg2rad(0.01)  # [rad] FK agreement (0.01 deg)


@pytest.fixture(scope="module", params=ROBOTS)
def kin(request) -> Kinematics:
    return Kinematics(request.param)


_KIN: dict[str, Kinematics] = {}


def get_kin(name: str) -> Kinematics:
    if name not in _KIN:
        _KIN[name] = Kinematics(name)
    return _KIN[name]


# ----------------------------------------------------------------------------------- references
def _rotx(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1.0]])


def _rotz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])


def _trans(x, y, z):
    T = np.eye(4)
    T[:3, 3] = (x, y, z)
    return T


# Franka modified (Craig) DH: (a, d, alpha) per joint, T = RotX(alpha) TransX(a) RotZ(theta) TransZ(d)
FRANKA_DH = [(0, 0.333, 0), (0, 0, -np.pi / 2), (0, 0.316, np.pi / 2), (0.0825, 0, np.pi / 2),
             (-0.0825, 0.384, -np.pi / 2), (0, 0, np.pi / 2), (0.088, 0, np.pi / 2)]


def franka_flange(q) -> np.ndarray:
    T = np.eye(4)
    for (a, d, alpha), th in zip(FRANKA_DH, q):
        T = T @ _rotx(alpha) @ _trans(a, 0, 0) @ _rotz(th) @ _trans(0, 0, d)
    return T @ _trans(0, 0, 0.107)


def franka_tcp(q) -> np.ndarray:
    # Franka Hand: yawed -45 deg about the flange z axis, TCP 0.1034 m along the hand z axis.
    return franka_flange(q) @ _rotz(-np.pi / 4) @ _trans(0, 0, 0.1034)


# Interbotix wx250s PoE model (interbotix_xs_modules mr_descriptions.py, class wx250s)
WX_SLIST = np.array([[0, 0, 1, 0, 0, 0],
                     [0, 1, 0, -0.11065, 0, 0],
                     [0, 1, 0, -0.36065, 0, 0.04975],
                     [1, 0, 0, 0, 0.36065, 0],
                     [0, 1, 0, -0.36065, 0, 0.29975],
                     [1, 0, 0, 0, 0.36065, 0]]).T
WX_M = np.array([[1, 0, 0, 0.458325], [0, 1, 0, 0], [0, 0, 1, 0.36065], [0, 0, 0, 1.0]])


def _skew(w):
    return np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])


def _twist_exp(S, th) -> np.ndarray:
    """exp([S] th) for a unit-rotation screw axis S = (w, v) (Modern Robotics, eq. 3.88)."""
    w, v = S[:3], S[3:]
    W = _skew(w)
    R = np.eye(3) + np.sin(th) * W + (1 - np.cos(th)) * W @ W
    G = np.eye(3) * th + (1 - np.cos(th)) * W + (th - np.sin(th)) * W @ W
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = G @ v
    return T


def wx_tcp(q) -> np.ndarray:
    T = np.eye(4)
    for i, th in enumerate(q):
        T = T @ _twist_exp(WX_SLIST[:, i], th)
    return T @ WX_M


REFERENCE = {"fr3": franka_tcp, "panda": franka_tcp, "wx250s": wx_tcp}


def rot_angle(Ra, Rb) -> float:
    c = (np.trace(Ra.T @ Rb) - 1.0) / 2.0
    return float(np.arccos(np.clip(c, -1.0, 1.0)))


# ----------------------------------------------------------------------------------------- FK
@pytest.mark.parametrize("robot", ROBOTS)
def test_fk_matches_published_model(robot):
    k = get_kin(robot)
    ref = REFERENCE[robot]
    rng = np.random.default_rng(11)
    qs = [k.home] + list(rng.uniform(k.lower, k.upper, size=(500, k.n)))
    worst_p = worst_r = 0.0
    for q in qs:
        T, Tr = k.fk(q), ref(q)
        worst_p = max(worst_p, float(np.linalg.norm(T[:3, 3] - Tr[:3, 3])))
        worst_r = max(worst_r, rot_angle(T[:3, :3], Tr[:3, :3]))
    assert worst_p < POS_TOL and worst_r < ROT_TOL, (worst_p, worst_r)


def test_franka_flange_frame_and_home_pose():
    k = get_kin("fr3")
    q = np.random.default_rng(3).uniform(k.lower, k.upper)
    assert np.allclose(k.frame_pose("fr3_link8", q), franka_flange(q), atol=1e-9)
    # Published ready pose: TCP at (0.306891, 0, 0.486882) pointing straight down (rpy = pi, 0, 0).
    T = k.fk(k.home)
    assert np.allclose(T[:3, 3], [0.306891, 0.0, 0.486882], atol=1e-6)
    assert np.allclose(T[:3, :3], np.diag([1.0, -1.0, -1.0]), atol=1e-9)


def test_wx250s_home_pose_and_singular_wrist():
    k = get_kin("wx250s")
    assert np.allclose(k.fk(np.zeros(6)), WX_M, atol=1e-12)
    # At home forearm_roll and wrist_rotate share an axis through the TCP: the Jacobian loses rank.
    assert np.linalg.matrix_rank(k.jacobian(k.home), tol=1e-9) == 5
    assert np.linalg.matrix_rank(k.jacobian(k.home + 0.3), tol=1e-9) == 6


def test_fk_rejects_bad_input(kin):
    with pytest.raises(ValueError, match="shape"):
        kin.fk(np.zeros(kin.n + 1))
    bad = kin.home.copy()
    bad[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kin.fk(bad)


def test_limits_and_joint_names_follow_config(kin):
    cfg = kin.robot
    assert kin.joint_names == cfg.arm_joints
    assert np.array_equal(kin.lower, cfg.position_min) and np.array_equal(kin.upper, cfg.position_max)
    assert np.array_equal(kin.home, cfg.home)


# ------------------------------------------------------------------------------------ Jacobian
def test_jacobian_matches_finite_differences(kin):
    rng = np.random.default_rng(5)
    h = 1e-6
    for _ in range(20):
        q = rng.uniform(kin.lower + 0.01, kin.upper - 0.01)
        J = kin.jacobian(q)
        assert J.shape == (6, kin.n)
        T0 = kin.fk(q)
        for i in range(kin.n):
            dq = np.zeros(kin.n)
            dq[i] = h
            T1 = kin.fk(q + dq)
            v = (T1[:3, 3] - T0[:3, 3]) / h
            w = matrix_to_rotvec(T1[:3, :3] @ T0[:3, :3].T) / h  # base-frame angular velocity
            assert np.allclose(J[:3, i], v, atol=1e-5)
            assert np.allclose(J[3:, i], w, atol=1e-5)


# ------------------------------------------------------------------------------------------ IK
@pytest.mark.parametrize("robot", ROBOTS)
def test_ik_round_trip_1000_targets(robot):
    """Targets = FK of random in-limit q; solved from home or from another random q, never the answer."""
    k = get_kin(robot)
    rng = np.random.default_rng(2024)
    n_targets = 1000
    ok = 0
    statuses = {}
    for i in range(n_targets):
        q_true = rng.uniform(k.lower, k.upper)
        target = k.fk(q_true)
        seed = k.home if i % 2 == 0 else rng.uniform(k.lower, k.upper)
        res = k.solve(target, seed)
        assert isinstance(res, IKResult)
        assert np.all(res.q >= k.lower) and np.all(res.q <= k.upper), "IK left the joint limits"
        statuses[res.status] = statuses.get(res.status, 0) + 1
        if res.ok:
            # Check the answer independently with the reference kinematics.
            T = REFERENCE[robot](res.q)
            assert np.linalg.norm(T[:3, 3] - target[:3, 3]) < 1e-3
            assert rot_angle(T[:3, :3], target[:3, :3]) < np.deg2rad(0.5)
            assert res.status == "ok"
            ok += 1
        else:
            assert res.status in ("unreachable", "singular", "max_iters")
    assert ok / n_targets >= 0.99, statuses


@pytest.mark.parametrize("robot", ROBOTS)
def test_solve_delta_small_steps_stay_on_branch(robot):
    k = get_kin(robot)
    rng = np.random.default_rng(9)
    times = []
    for _ in range(300):
        q0 = rng.uniform(k.lower + 0.2, k.upper - 0.2)
        if np.linalg.svd(k.jacobian(q0), compute_uv=False)[-1] < 0.08:
            # Skip near-singular starts: there a few-mm delta may point past the stretched arm (then
            # "unreachable" is the right answer) or need a large joint motion.
            continue
        dpos = rng.normal(0, 0.004, 3)
        drot = rng.normal(0, 0.02, 3)
        t0 = time.process_time()
        res = k.solve_delta(q0, dpos, drot)
        times.append(time.process_time() - t0)
        assert res.ok, res
        T0, T1 = REFERENCE[robot](q0), REFERENCE[robot](res.q)
        assert np.allclose(T1[:3, 3], T0[:3, 3] + dpos, atol=2e-4)
        assert rot_angle(T1[:3, :3], rotvec_to_matrix(drot) @ T0[:3, :3]) < 2e-3
        assert np.max(np.abs(res.q - q0)) < 0.5  # no jump to another IK branch
    assert len(times) >= 50
    # Servo-rate budget (CPU time, generous so that a loaded CI machine passes): median well under 5 ms.
    assert np.median(times) < 5e-3, np.median(times)


def test_unreachable_targets_are_reported(kin):
    T = kin.fk(kin.home)
    far = T.copy()
    far[:3, 3] = [2.0, 0.5, 0.4]  # well beyond every arm's reach
    res = kin.solve(far, kin.home)
    assert not res.ok and res.status == "unreachable"
    assert np.all(res.q >= kin.lower) and np.all(res.q <= kin.upper)
    assert res.pos_err > 1.0


@pytest.mark.parametrize("robot,dist,yaw", [("fr3", 1.02, 0.0), ("panda", 1.02, 0.0),
                                            ("wx250s", 0.655, np.pi)])
def test_infeasible_targets_inside_the_quick_reach_bound(robot, dist, yaw):
    """Targets that pass the quick reach bound but cannot be reached: the Franka TCP ~1 m from the
    shoulder (the straight arm gives ~0.95 m); the WidowX nearly stretched but facing backwards."""
    k = get_kin(robot)
    assert dist < k.reach
    target = k.fk(k.home)
    target[:3, :3] = _rotz(yaw)[:3, :3] @ target[:3, :3]
    target[:3, 3] = k.shoulder + dist * np.array([1.0, 0.0, 0.0])
    res = k.solve(target, k.home, restarts=4)
    assert not res.ok
    assert res.status in ("unreachable", "singular")
    assert np.all(res.q >= k.lower) and np.all(res.q <= k.upper)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(robot=st.sampled_from(ROBOTS), seed=st.integers(0, 2**32 - 1),
       xyz=st.tuples(*[st.floats(-1.2, 1.2)] * 3), rotvec=st.tuples(*[st.floats(-3.0, 3.0)] * 3))
def test_any_target_gives_in_limit_answer_and_honest_errors(robot, seed, xyz, rotvec):
    """Arbitrary (mostly unreachable) targets and seeds: never outside the limits, never an exception,
    and the reported errors are the errors of the returned q."""
    k = get_kin(robot)
    target = np.eye(4)
    target[:3, :3] = rotvec_to_matrix(rotvec)
    target[:3, 3] = xyz
    q_seed = np.random.default_rng(seed).uniform(k.lower - 0.5, k.upper + 0.5)  # may start out of limits
    res = k.solve(target, q_seed, max_iters=40, restarts=2)
    assert np.all(res.q >= k.lower) and np.all(res.q <= k.upper)
    assert res.status in ("ok", "unreachable", "singular", "max_iters") and res.ok == (res.status == "ok")
    T = REFERENCE[robot](res.q)
    assert res.pos_err == pytest.approx(np.linalg.norm(T[:3, 3] - target[:3, 3]), abs=1e-9)
    assert res.rot_err == pytest.approx(rot_angle(T[:3, :3], target[:3, :3]), abs=5e-4)
    if res.ok:
        assert res.pos_err <= 1e-4 and res.rot_err <= 1e-3


def test_no_restarts_means_no_branch_jump_across_the_full_turn_limit():
    """WidowX waist near +pi asked to turn further: a servo-style solve must not wrap to -pi."""
    k = get_kin("wx250s")
    q0 = np.array([3.10, 0.3, -0.5, 0.2, 0.4, 0.1])
    target = k.fk(q0)
    target[:3, :3] = rotvec_to_matrix([0.0, 0.0, 0.2]) @ target[:3, :3]
    target[:3, 3] = rotvec_to_matrix([0.0, 0.0, 0.2]) @ target[:3, 3]  # = waist + 0.2 rad, past +pi
    for res in (k.solve(target, q0, restarts=0), k.solve_delta(q0, target[:3, 3] - k.fk(q0)[:3, 3],
                                                               [0.0, 0.0, 0.2])):
        assert not res.ok and res.q[0] > 3.0  # stops at the limit instead of jumping a full turn
    wrapped = k.solve(target, q0)  # a global solve may use the equivalent waist angle near -pi
    assert wrapped.ok and wrapped.q[0] < -2.9


def test_seed_outside_limits_is_clipped(kin):
    seed = kin.upper + 1.0
    res = kin.solve(kin.fk(kin.home), seed)
    assert res.ok
    assert np.all(res.q >= kin.lower) and np.all(res.q <= kin.upper)


def test_bad_targets_raise_clear_errors(kin):
    T = kin.fk(kin.home)
    with pytest.raises(ValueError, match="4x4"):
        kin.solve(T[:3], kin.home)
    bad = T.copy()
    bad[0, 3] = np.inf
    with pytest.raises(ValueError, match="finite"):
        kin.solve(bad, kin.home)
    skewed = T.copy()
    skewed[:3, :3] *= 2.0
    with pytest.raises(ValueError, match="rotation"):
        kin.solve(skewed, kin.home)
    with pytest.raises(ValueError, match="finite"):
        kin.solve_delta(kin.home, [0, 0, np.nan], [0, 0, 0])


def test_null_space_pull_keeps_franka_elbow_near_home():
    """Back-and-forth TCP motion: with the null-space pull the redundant joints drift back toward home."""
    free = Kinematics("fr3", null_gain=0.0)
    pulled = get_kin("fr3")
    q_start = free.home + np.array([0.5, 0.0, -0.6, 0.0, 0.0, 0.0, 0.0])
    d0 = float(np.linalg.norm(q_start - free.home))
    dists = {}
    for name, k in (("free", free), ("pulled", pulled)):
        q = q_start.copy()
        for i in range(150):
            step = 0.004 if (i // 10) % 2 == 0 else -0.004
            res = k.solve_delta(q, [step, 0.0, 0.0], [0.0, 0.0, 0.0])
            assert res.ok
            q = res.q
        dists[name] = float(np.linalg.norm(q - k.home))
    assert dists["pulled"] < 0.75 * d0 and dists["pulled"] < 0.7 * dists["free"], (d0, dists)


def test_unknown_robot_name_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        Kinematics("fr4")
    msg = str(e.value)
    assert "\n" not in msg and "'fr4'" in msg and "fr3" in msg and "wx250s" in msg


def test_missing_urdf_is_a_config_error(tmp_path):
    from magma_ros.core.paths import data_path

    text = data_path("config", "robots", "fr3.yaml").read_text()
    text = text.replace("urdf: fr3.urdf", "urdf: /no/such.urdf")
    p = tmp_path / "fr3_bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="URDF not found"):
        Kinematics(str(p))


@pytest.mark.parametrize("old,new,needle", [
    ("tcp_link: fr3_hand_tcp", "tcp_link: fr3_hand_tip", "frame 'fr3_hand_tip'"),
    ("base_link: fr3_link0", "base_link: fr3_link3", "must not move"),
    ("fr3_joint7]", "fr3_joint77]", "fr3_joint77"),
])
def test_config_urdf_mismatch_is_a_config_error(tmp_path, old, new, needle):
    from magma_ros.core.paths import data_path

    text = data_path("config", "robots", "fr3.yaml").read_text()
    assert old in text
    p = tmp_path / "fr3_bad.yaml"
    p.write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=needle) as e:
        Kinematics(str(p))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ rotations
def test_rotation_helpers_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(200):
        rv = rng.normal(size=3)
        rv *= rng.uniform(0, np.pi - 1e-3) / np.linalg.norm(rv)
        R = rotvec_to_matrix(rv)
        assert np.allclose(R, exp_so3(rv), atol=1e-12)  # independent Rodrigues
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(R), 1.0)
        assert np.allclose(matrix_to_rotvec(R), rv, atol=1e-9)
        q = matrix_to_quat(R)
        assert q[3] >= 0 and np.isclose(np.linalg.norm(q), 1.0)
        assert np.allclose(quat_to_matrix(q), R, atol=1e-12)
        assert np.allclose(rpy_to_matrix(matrix_to_rpy(R)), R, atol=1e-9)
    # Known values: quaternion (x, y, z, w) of 90 deg about z; URDF rpy convention Rz(y) Ry(p) Rx(r).
    Rz90 = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]])
    assert np.allclose(matrix_to_quat(Rz90), [0, 0, np.sqrt(0.5), np.sqrt(0.5)])
    assert np.allclose(rotvec_to_matrix([0, 0, np.pi / 2]), Rz90)
    r, p, y = 0.3, -0.2, 1.1
    assert np.allclose(rpy_to_matrix([r, p, y]), _rotz(y)[:3, :3] @ _roty(p) @ _rotx(r)[:3, :3])
    with pytest.raises(ValueError):
        quat_to_matrix([0, 0, 0, 0])


def _roty(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def test_pose_error_matches_solve_delta_convention():
    k = get_kin("panda")
    q0 = k.home
    dpos, drot = np.array([0.01, -0.02, 0.005]), np.array([0.05, 0.0, -0.1])
    res = k.solve_delta(q0, dpos, drot)
    assert res.ok
    dp, dr = pose_error(k.fk(res.q), k.fk(q0))
    assert np.allclose(dp, dpos, atol=2e-4) and np.allclose(dr, drot, atol=2e-3)
