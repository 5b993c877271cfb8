"""Camera configs (extrinsics/intrinsics) and the fake RealSense device."""

from __future__ import annotations

import math

import numpy as np
import pytest

from magma_ros.core.errors import ConfigError
from magma_ros.core.paths import data_path
from magma_ros.core.realsense import CameraConfig, load_camera_config
from magma_ros.core.robot import load_robot

CONFIGS = sorted(p.stem for p in data_path("config", "cameras").glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_camera_config_loads_with_a_proper_rotation(name):
    cam = load_camera_config(name)
    R = cam.rotation_optical()
    assert np.allclose(R @ R.T, np.eye(3), atol=1e-9) and np.linalg.det(R) == pytest.approx(1.0)
    bases = {load_robot(r).base_link for r in ("fr3", "panda", "wx250s")}
    if cam.parent_frame not in bases:  # eye-in-hand: its pose depends on the arm (test/core/test_tom3d.py)
        return
    # the workspace (in front of the robot, on or above the table) is in front of the camera
    p = np.linalg.solve(cam.pose_optical(), np.array([0.35, 0.0, 0.1, 1.0]))[:3]
    assert p[2] > 0.2


@pytest.mark.parametrize("robot", ["fr3", "panda", "wx250s"])
def test_sim_cameras_hang_off_the_robot_base(robot):
    assert load_camera_config(f"sim_{robot}").parent_frame == load_robot(robot).base_link


def test_look_at_points_the_optical_axis_and_keeps_the_image_upright():
    cam = CameraConfig(name="t", parent_frame="base", position=(1.0, 0.5, 0.8), look_at=(0.0, 0.0, 0.0))
    R = cam.rotation_optical()
    z = np.array([-1.0, -0.5, -0.8]) / np.linalg.norm([1.0, 0.5, 0.8])
    assert np.allclose(R[:, 2], z)  # optical z toward the target
    assert R[2, 0] == pytest.approx(0.0, abs=1e-12)  # image x horizontal (no roll)
    assert R[2, 1] < 0  # image y points down in the world
    # camera_link: x forward = optical z, z up = -optical y
    L = cam.pose_link()[:3, :3]
    assert np.allclose(L[:, 0], R[:, 2]) and np.allclose(L[:, 2], -R[:, 1])


def test_rpy_gives_the_camera_link_orientation():
    cam = CameraConfig(name="t", parent_frame="base", position=(1.0, 0.0, 0.5), rpy=(0.0, 0.5, math.pi))
    L = cam.pose_link()[:3, :3]
    # yaw pi then pitch 0.5 down: looking back toward -x and downward
    assert np.allclose(L[:, 0], [-math.cos(0.5), 0.0, -math.sin(0.5)], atol=1e-9)
    assert np.allclose(cam.rotation_optical()[:, 2], L[:, 0])


def test_intrinsics_from_fovy_and_from_fx_scale_with_resolution():
    cam = CameraConfig(name="t", parent_frame="b", position=(0, 0, 1), look_at=(0, 0, 0), fovy_deg=90.0)
    K = cam.intrinsics(640, 480)
    assert K[1, 1] == pytest.approx(240.0) and K[0, 0] == K[1, 1] and (K[0, 2], K[1, 2]) == (319.5, 239.5)
    real = CameraConfig(name="d", parent_frame="b", position=(0, 0, 1), look_at=(0, 0, 0),
                        fx=615.0, fy=616.0, cx=319.5, cy=239.5)
    K2 = real.intrinsics(320, 240)
    assert K2[0, 0] == pytest.approx(307.5) and K2[1, 1] == pytest.approx(308.0)
    assert (K2[0, 2], K2[1, 2]) == (pytest.approx(159.5), pytest.approx(119.5))


def test_bad_camera_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'sim_fr3'"):
        load_camera_config("sim_fr")
    with pytest.raises(ConfigError, match="exactly one of look_at or rpy"):
        CameraConfig(name="t", parent_frame="b", position=(0, 0, 1))
    bad = tmp_path / "bad.yaml"
    bad.write_text("/**:\n  ros__parameters:\n    parent_frame: x\n    position: [1, 2]\n    look_at: [0, 0, 0]\n")
    with pytest.raises(ConfigError, match="position"):
        load_camera_config(bad)
    bad.write_text("/**: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_camera_config(bad)
