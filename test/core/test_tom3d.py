"""ToM in 3-D: back-projection of pixel traces through aligned depth, hole handling, camera mounts.

The acceptance checks render the real MuJoCo scene (known cube geometry) from a fixed camera at
~0.8 m and from a wrist camera (eye-in-hand, pose through the kinematics core) at 0.5-0.7 m: a
trace drawn over the cube's pixels, found by colour in the rendered image, must land on the
cube's surface as MuJoCo places it, within 5 mm.
"""

from __future__ import annotations

import numpy as np
import pytest

import magma_ros.sim  # noqa: F401  (GL backend before mujoco)
from magma_ros.core import tom3d
from magma_ros.core.errors import ConfigError
from magma_ros.core.realsense import CameraConfig, load_camera_config
from magma_ros.core.robot import load_robot

TOL = 0.005  # [m] acceptance
FIXED = CameraConfig(name="test_fixed", parent_frame="fr3_link0", position=(0.95, 0.35, 0.55),
                     look_at=(0.5, 0.0, 0.02))


def _box_distance(p, T_box, half):
    """Signed distance [m] of base-frame points (N, 3) to a box (pose T_box, half edge ``half``)."""
    local = (np.asarray(p) - T_box[:3, 3]) @ T_box[:3, :3]
    q = np.abs(local) - half
    outside = np.linalg.norm(np.maximum(q, 0.0), axis=1)
    inside = np.minimum(q.max(axis=1), 0.0)
    return outside + inside


def _red_pixels(rgb):
    """(N, 2) pixel (x, y) of the red cube, found by colour in the rendered image, eroded by 2 px."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    m = (r - np.maximum(g, b)) > 80
    core = m.copy()
    for dy in (-2, 0, 2):
        for dx in (-2, 0, 2):
            core &= np.roll(np.roll(m, dy, 0), dx, 1)
    ys, xs = np.nonzero(core)
    return np.stack([xs, ys], axis=1).astype(float)


@pytest.fixture(scope="module")
def fixed_scene():
    from magma_ros.sim.arm import ArmSim

    s = ArmSim("fr3", camera=FIXED)
    yield s
    s.close()


@pytest.fixture(scope="module")
def wrist_scene():
    from magma_ros.sim.arm import ArmSim

    s = ArmSim("fr3", camera="sim_fr3_wrist")
    yield s
    s.close()


def _check_trace_on_cube(sim, q=None):
    sim.reset(q)
    rgb, depth = sim.render_rgbd()
    info = sim.camera_info()
    mount = tom3d.CameraMount(sim.camera, sim.robot)
    T = mount.base_from_optical(sim.q())  # eye-in-hand: FK of the kinematics core, not MuJoCo's pose
    px = _red_pixels(rgb)
    assert len(px) > 50, "red cube not visible"
    # a trace across the cube: 8 of its pixels from left to right through the blob's middle row
    mid = np.median(px[:, 1])
    row = px[np.abs(px[:, 1] - mid) < 1]
    trace = row[np.linspace(0, len(row) - 1, 8).astype(int)]
    plan = tom3d.traces_to_3d([trace], depth, info.K, T)
    tr = plan.traces[0]
    assert tr.dropped == 0 and len(tr.points) == 8
    T_cube = sim.body_pose("red_cube")
    half = 0.045 / 2
    dist = np.abs(_box_distance(tr.points, T_cube, half))
    assert dist.max() < TOL, dist
    z_cam = tom3d.transform(np.linalg.inv(T), tr.points)[:, 2]
    assert 0.5 <= z_cam.min() and z_cam.max() <= 1.0  # the acceptance range: 0.5 - 1 m from the camera
    # the top face centre: project it, back-project its pixel -> the same point
    top = T_cube[:3, 3] + T_cube[:3, 2] * half
    uv = tom3d.pixel_of(top, info.K, T, info.width, info.height)
    p = tom3d.traces_to_3d([uv[None]], depth, info.K, T).traces[0].points
    assert np.linalg.norm(p[0] - top) < TOL
    return depth, info, T, trace


def test_fixed_camera_trace_lands_on_the_cube(fixed_scene):
    assert not tom3d.CameraMount(FIXED, load_robot("fr3")).eye_in_hand
    _check_trace_on_cube(fixed_scene)


def test_wrist_camera_trace_lands_on_the_cube_at_two_poses(wrist_scene):
    mount = tom3d.CameraMount(wrist_scene.camera, wrist_scene.robot)
    assert mount.mount == "eye_in_hand"
    home = wrist_scene.robot.home
    _check_trace_on_cube(wrist_scene)
    # another arm pose: the camera moved (higher, turned), the kinematics must follow it
    q = home + np.array([0.12, -0.25, 0.0, -0.25, 0.0, 0.1, 0.3])
    wrist_scene.reset(q)
    assert np.linalg.norm(wrist_scene.camera_pose()[:3, 3] - tom3d.CameraMount(
        wrist_scene.camera, wrist_scene.robot).base_from_optical(home)[:3, 3]) > 0.05
    _check_trace_on_cube(wrist_scene, q)


def test_depth_holes_are_filled_within_the_window_or_dropped_and_counted(fixed_scene):
    depth, info, T, trace = _check_trace_on_cube(fixed_scene)
    u, v = (int(round(c)) for c in trace[3])
    holed = depth.copy()
    holed[v - 1:v + 2, u - 1:u + 2] = 0  # a 3x3 hole: the nearest valid pixel is 2 px away
    opts = tom3d.DepthOptions(window=3)
    tr = tom3d.traces_to_3d([trace], holed, info.K, T, opts).traces[0]
    assert (tr.filled, tr.dropped, len(tr.points)) == (1, 0, 8)
    assert np.abs(_box_distance(tr.points, fixed_scene.body_pose("red_cube"), 0.045 / 2)).max() < TOL
    holed[v - 8:v + 9, u - 8:u + 9] = 0  # larger than the window: dropped and counted
    tr = tom3d.traces_to_3d([trace], holed, info.K, T, opts).traces[0]
    # point 3 has no valid depth within +-3 px: dropped; its neighbours (~7 px away) reach past the hole edge
    assert (tr.no_depth, len(tr.points)) == (1, 7)
    assert not any(np.allclose(p, trace[3]) for p in tr.pixels)
    assert np.abs(_box_distance(tr.points, fixed_scene.body_pose("red_cube"), 0.045 / 2)).max() < TOL
    # window 0: no filling at all
    holed = depth.copy()
    holed[v, u] = 0
    tr = tom3d.traces_to_3d([trace], holed, info.K, T, tom3d.DepthOptions(window=0)).traces[0]
    assert (tr.no_depth, tr.filled) == (1, 0)


def test_points_outside_the_image_or_nan_are_dropped_and_counted():
    K = np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]])
    depth = np.full((480, 640), 800, np.uint16)
    bp = tom3d.back_project([[-5, 10], [700, 10], [10, 500], [np.nan, 3], [320, 240]], depth, K)
    assert (bp.outside, bp.no_depth, len(bp.points)) == (4, 0, 1)
    assert bp.index.tolist() == [4]


def test_back_projection_of_a_plane_is_exact():
    """Depth z along the optical axis: (u, v, z) -> z K^-1 [u, v, 1]; projecting back gives (u, v)."""
    K = np.array([[600.0, 0, 300.0], [0, 610.0, 200.0], [0, 0, 1]])
    depth = np.full((400, 600), 1234, np.uint16)  # 1.234 m
    px = np.array([[300.0, 200.0], [0.0, 0.0], [599.0, 399.0], [150.4, 80.6]])
    bp = tom3d.back_project(px, depth, K)
    assert np.allclose(bp.points[:, 2], 1.234)
    assert np.allclose(bp.points[0], [0, 0, 1.234])
    assert np.allclose(bp.points[1], [-300 / 600 * 1.234, -200 / 610 * 1.234, 1.234])
    assert np.allclose(tom3d.project(bp.points, K), px)
    # depth limits count as holes
    far = tom3d.back_project(px, depth, K, tom3d.DepthOptions(depth_max=1.0))
    assert far.no_depth == 4


def test_bad_depth_or_intrinsics_raise_a_clear_error():
    with pytest.raises(ValueError, match="depth"):
        tom3d.back_project([[1, 1]], np.zeros((4, 4, 3)), np.eye(3))
    with pytest.raises(ValueError, match="intrinsics"):
        tom3d.back_project([[1, 1]], np.zeros((4, 4), np.uint16), np.zeros((3, 3)))


def test_eye_in_hand_needs_a_joint_state_and_a_real_link():
    robot = load_robot("fr3")
    wrist = load_camera_config("sim_fr3_wrist")
    m = tom3d.CameraMount(wrist, robot)
    with pytest.raises(ValueError, match="joint state"):
        m.base_from_optical()
    bad = CameraConfig(name="bad", parent_frame="no_such_link", position=(0, 0, 0), rpy=(0, 0, 0))
    with pytest.raises(ConfigError, match="no_such_link"):
        tom3d.CameraMount(bad, robot)


def test_resample_path_drops_close_points_keeps_ends():
    p = np.array([[0, 0, 0], [0.001, 0, 0], [0.01, 0, 0], [0.0105, 0, 0], [0.02, 0, 0]], float)
    out = tom3d.resample_path(p, 0.005)
    assert np.allclose(out, [[0, 0, 0], [0.01, 0, 0], [0.02, 0, 0]])


def test_known_start_and_interpolated_depth_for_the_gripper_trace():
    """The gripper's pixel sees past the fingers: its start comes from the kinematics, and with
    ``interpolate`` the path runs on each pixel's ray from the TCP's depth to the surface at the end."""
    K = np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]])
    depth = np.full((480, 640), 2000, np.uint16)  # a wall at 2 m (the floor behind the gripper)
    depth[:, 400:] = 900  # the object surface at 0.9 m
    T = np.eye(4)
    tcp = np.array([0.0, 0.0, 0.5])  # the TCP 0.5 m in front of the camera, at the image centre
    px = np.array([[319.5, 239.5], [360.0, 239.5], [400.0, 239.5], [440.0, 239.5]])
    surf = tom3d.traces_to_3d({1: px}, depth, K, T, starts={1: tcp}).traces[0]
    assert np.allclose(surf.points[0], tcp)  # not the wall behind it
    assert surf.points[1, 2] == pytest.approx(2.0)  # surface mode: on the wall
    mid = tom3d.traces_to_3d({1: px}, depth, K, T, starts={1: tcp}, interpolate=(1,)).traces[0]
    assert np.allclose(mid.points[0], tcp) and mid.points[-1, 2] == pytest.approx(0.9)
    assert np.allclose(mid.points[:, 2], [0.5, 0.5 + 0.4 / 3, 0.5 + 0.8 / 3, 0.9])
    assert np.allclose(tom3d.project(mid.points, K), px)  # every point still on its pixel's ray
