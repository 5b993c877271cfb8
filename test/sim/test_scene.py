"""MuJoCo scene and ArmSim: built from our URDFs, holds under gravity, tracks targets, renders true RGB-D."""

from __future__ import annotations

import numpy as np
import pytest

import magma_ros.sim  # noqa: F401  (chooses the GL backend before mujoco is imported)
from magma_ros.core.errors import ConfigError
from magma_ros.core.robot import ROBOTS, load_robot
from magma_ros.sim.arm import ArmSim
from magma_ros.sim.follower import TrajectoryFollower

ROBOT_FACTS_HOME_TCP = {
    # ROBOT_FACTS §1.5 (Franka ready pose, derived from the DH table) and §3.4 (WidowX M matrix).
    "fr3": (np.array([0.306891, 0.0, 0.486882]), np.diag([1.0, -1.0, -1.0])),
    "panda": (np.array([0.306891, 0.0, 0.486882]), np.diag([1.0, -1.0, -1.0])),
    "wx250s": (np.array([0.458325, 0.0, 0.36065]), np.eye(3)),
}


@pytest.fixture(scope="module", params=ROBOTS)
def sim(request):
    s = ArmSim(request.param, width=320, height=240)
    yield s
    s.close()


def test_timestep_is_at_least_500hz(sim):
    assert sim.timestep <= 0.002


def test_home_tcp_matches_published_kinematics(sim):
    sim.reset()
    p, R = ROBOT_FACTS_HOME_TCP[sim.robot.name]
    T = sim.tcp_pose()
    assert np.linalg.norm(T[:3, 3] - p) < 1e-5
    assert np.allclose(T[:3, :3], R, atol=1e-6)


def test_holds_home_under_gravity(sim):
    sim.reset()
    T0 = sim.tcp_pose()
    sim.step(int(round(2.0 / sim.timestep)))
    assert sim.time == pytest.approx(2.0, abs=sim.timestep)
    drift = np.linalg.norm(sim.tcp_pose()[:3, 3] - T0[:3, 3])
    assert drift < 1e-3  # < 1 mm over 2 s
    assert np.abs(sim.q() - sim.robot.home).max() < 1e-3
    assert sim.gripper() == pytest.approx(sim.robot.gripper.open, abs=1e-3)


def test_cubes_rest_on_the_table(sim):
    sim.reset()
    sim.step(int(round(1.0 / sim.timestep)))
    names = sim.object_names()
    assert len(names) >= 3
    for n in names:
        T = sim.body_pose(n)
        size = next(o.size for o in sim.config.objects[sim.robot.name] if o.name == n)
        assert T[2, 3] == pytest.approx(size / 2, abs=2e-3), n  # on the table top (z = 0), not sunk or flying


def test_position_targets_are_tracked_and_tcp_matches_fk(sim):
    kin = pytest.importorskip("magma_ros.core.kinematics").Kinematics(sim.robot)
    r = sim.robot
    sim.reset()
    rng = np.random.default_rng(0)
    for _ in range(2):
        lo, hi = r.position_min + 0.2, r.position_max - 0.2
        target = np.clip(r.home + rng.uniform(-0.35, 0.35, r.dof), lo, hi)
        sim.set_targets(target)
        sim.step(int(round(1.5 / sim.timestep)))
        assert np.abs(sim.q() - target).max() < 2e-4
        # steady state: the TCP is where the URDF kinematics puts the target (<= 0.5 mm)
        err = np.linalg.norm(sim.tcp_pose()[:3, 3] - kin.fk(target)[:3, 3])
        assert err < 5e-4


def test_tcp_pose_equals_urdf_fk_at_random_configurations(sim):
    kin = pytest.importorskip("magma_ros.core.kinematics").Kinematics(sim.robot)
    r = sim.robot
    rng = np.random.default_rng(1)
    for _ in range(20):
        q = rng.uniform(r.position_min, r.position_max)
        sim.reset(q)
        T_mj, T_fk = sim.tcp_pose(), kin.fk(q)
        assert np.linalg.norm(T_mj[:3, 3] - T_fk[:3, 3]) < 1e-6
        assert np.allclose(T_mj[:3, :3], T_fk[:3, :3], atol=1e-6)


def test_following_a_moving_setpoint_has_small_lag(sim):
    """Velocity feed-forward: while a joint ramps at 0.3 rad/s the arm stays on the setpoint."""
    r = sim.robot
    sim.reset()
    f = TrajectoryFollower(r.home)
    goal = r.home.copy()
    j = 1 if r.name == "wx250s" else 0
    goal[j] += 0.3
    f.set_trajectory(sim.time, [1.0], goal[None, :])
    worst = 0.0
    while sim.time < 1.0:
        q, qd = f.sample(sim.time)
        sim.set_targets(q, qd_arm=qd)
        sim.step(1)
        if 0.3 < sim.time < 0.9:
            worst = max(worst, abs(sim.q()[j] - f.sample(sim.time)[0][j]))
    assert worst < 3e-3  # rad; a plain PD (kv/kp = 0.1 s) would lag ~0.03 rad here


def test_gripper_closes_with_its_mimic(sim):
    g = sim.robot.gripper
    sim.reset()
    sim.set_targets(sim.robot.home, gripper_m=g.closed)
    sim.step(int(round(1.0 / sim.timestep)))
    assert sim.gripper() == pytest.approx(g.closed, abs=1e-3)
    names, pos, _, _ = sim.joint_state()
    for m, k in zip(g.mimic_joints, g.mimic_multipliers):
        assert pos[names.index(m)] == pytest.approx(k * sim.gripper(), abs=1e-3)
    sim.set_targets(sim.robot.home, gripper_m=g.open)
    sim.step(int(round(1.0 / sim.timestep)))
    assert sim.gripper() == pytest.approx(g.open, abs=1e-3)


def test_bad_targets_raise_and_leave_state(sim):
    sim.reset()
    before = sim.targets()[0]
    with pytest.raises(ValueError):
        sim.set_targets(np.full(sim.robot.dof, np.nan))
    with pytest.raises(ValueError):
        sim.set_targets(np.zeros(sim.robot.dof + 1))
    assert np.array_equal(sim.targets()[0], before)


def _ray_table_depth(info, u, v):
    """z-depth [m] of the table plane z = 0 seen through pixel (u, v), from K and the extrinsic."""
    K, T = info.K, info.T_base_optical
    d_opt = np.array([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], 1.0])
    d = T[:3, :3] @ d_opt
    t = -T[2, 3] / d[2]
    return t, T[:3, 3] + t * d


def test_rgbd_images_agree_with_camera_info(sim):
    sim.reset()
    rgb, depth = sim.render_rgbd()
    info = sim.camera_info()
    assert rgb.shape == (240, 320, 3) and rgb.dtype == np.uint8
    assert depth.shape == (240, 320) and depth.dtype == np.uint16
    assert (info.width, info.height) == (320, 240)
    assert rgb.std() > 10  # a picture, not a blank frame
    assert (depth > 0).mean() > 0.5
    # Depth is in mm along the optical axis: table pixels match the ray/plane intersection.
    checked = 0
    for u, v in [(40, 225), (160, 230), (280, 225), (100, 200), (220, 210)]:
        t, p = _ray_table_depth(info, u, v)
        on_table = abs(p[0] - sim.config.table_center_x) < sim.config.table_size[0] / 2 - 0.02 and \
            abs(p[1]) < sim.config.table_size[1] / 2 - 0.02
        brown = rgb[v, u, 0] > rgb[v, u, 1] > rgb[v, u, 2]
        if on_table and brown:
            assert abs(depth[v, u] - 1000 * t) <= 3, (u, v)
            checked += 1
    assert checked >= 3
    # The red cube is where K and the extrinsic project it: its silhouette's bounding box is the
    # bounding box of its 8 projected corners.
    cube = next(o for o in sim.config.objects[sim.robot.name] if o.name == "red_cube")
    h = cube.size / 2
    corners = np.array([[cube.xy[0] + sx * h, cube.xy[1] + sy * h, h + sz * h, 1.0]
                        for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    p_opt = np.linalg.solve(info.T_base_optical, corners.T)[:3]
    uv = (info.K @ (p_opt / p_opt[2]))[:2]
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    red = (r > 40) & (r > 2 * g) & (r > 2 * b)
    assert red.sum() > 10
    vs, us = np.nonzero(red)
    assert abs(us.min() - uv[0].min()) < 1.5 and abs(us.max() - uv[0].max()) < 1.5  # px
    assert abs(vs.min() - uv[1].min()) < 1.5 and abs(vs.max() - uv[1].max()) < 1.5
    # and the depth at its centre pixel lies between its nearest corner and its centre
    centre = np.linalg.solve(info.T_base_optical, np.array([*cube.xy, h, 1.0]))[:3]
    uc, vc = (info.K @ (centre / centre[2]))[:2]
    d_cube = depth[int(round(vc)), int(round(uc))] / 1000.0
    assert p_opt[2].min() - 0.002 < d_cube < centre[2]


def test_arm_moves_in_the_image():
    with ArmSim("fr3", width=160, height=120) as s:
        a = s.render_color().astype(int)
        q = s.robot.home.copy()
        q[0] += 0.6
        s.reset(q)
        b = s.render_color().astype(int)
    assert (np.abs(a - b).sum(axis=2) > 30).mean() > 0.01


def test_unknown_camera_config_is_a_one_line_error():
    with pytest.raises(ConfigError, match="sim_fr3"):
        ArmSim(load_robot("fr3"), camera="sim_fr")


def _move(sim, q_goal, gripper_m, duration):
    """Drive the arm in a straight joint-space line to q_goal over ``duration`` sim seconds, then settle."""
    f = TrajectoryFollower(sim.targets()[0])
    f.set_trajectory(sim.time, [duration], np.asarray(q_goal)[None, :])
    t_end = sim.time + duration + 0.3
    while sim.time < t_end:
        q, qd = f.sample(sim.time)
        sim.set_targets(q, gripper_m=gripper_m, qd_arm=qd)
        sim.step(5)


@pytest.mark.parametrize("robot", ["fr3", "wx250s"])
def test_pick_up_the_red_cube(robot):
    """The scene supports the demo task: top grasp on the red cube, lift it 10 cm, it stays in the hand."""
    kin = pytest.importorskip("magma_ros.core.kinematics").Kinematics(robot)
    with ArmSim(robot, width=64, height=48) as sim:
        g = sim.robot.gripper
        cube = next(o for o in sim.config.objects[robot] if o.name == "red_cube")
        down = np.diag([1.0, -1.0, -1.0]) if robot != "wx250s" else \
            np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # TCP x (WidowX) / z (Franka) down

        def ik(z, seed):
            T = np.eye(4)
            T[:3, :3], T[:3, 3] = down, [cube.xy[0], cube.xy[1], z]
            r = kin.solve(T, seed)
            assert r.ok, r.status
            return r.q

        grasp_z = cube.size / 2 + (0.0 if robot != "wx250s" else 0.005)
        q_above = ik(grasp_z + 0.12, sim.robot.home)
        q_grasp = ik(grasp_z, q_above)
        q_lift = ik(grasp_z + 0.10, q_grasp)
        _move(sim, q_above, g.open, 1.0)
        _move(sim, q_grasp, g.open, 1.0)
        assert sim.body_pose("red_cube")[2, 3] == pytest.approx(cube.size / 2, abs=3e-3)  # not pushed away
        _move(sim, q_grasp, g.closed, 0.5)
        assert sim.gripper() > g.closed + 0.002  # the cube stops the fingers
        _move(sim, q_lift, g.closed, 1.0)
        z = sim.body_pose("red_cube")[2, 3]
        assert z > cube.size / 2 + 0.08, z
        assert np.linalg.norm(sim.body_pose("red_cube")[:3, 3] - sim.tcp_pose()[:3, 3]) < 0.03
