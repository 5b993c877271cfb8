"""Path following for the ``tom`` action source: time parametrisation and the closed loop on the TCP."""

from __future__ import annotations

import numpy as np
import pytest

from magma_ros.core.errors import ConfigError
from magma_ros.core.kinematics import rotvec_to_matrix
from magma_ros.core.path_follow import PathFollowConfig, PathFollower, TimedPath, distance_to_polyline

PATH = np.array([[0.40, 0.00, 0.30], [0.45, 0.03, 0.28], [0.48, 0.08, 0.26]])


def test_trapezoid_reaches_the_end_at_the_requested_speed_and_no_faster():
    tp = TimedPath(PATH, speed=0.05, accel=0.2)
    L = np.linalg.norm(np.diff(PATH, axis=0), axis=1).sum()
    assert tp.length == pytest.approx(L)
    ts = np.arange(0, tp.duration + 0.5, 0.01)
    s = np.array([tp.arc(t) for t in ts])
    v = np.diff(s) / 0.01
    assert s[-1] == pytest.approx(L) and np.all(np.diff(s) >= -1e-12)
    assert v.max() <= 0.05 + 1e-9 and v.max() > 0.049
    assert np.abs(np.diff(v) / 0.01).max() <= 0.2 + 1e-6
    assert tp.duration == pytest.approx(L / 0.05 + 0.05 / 0.2)  # cruise time + one ramp
    # every reference point lies on the polyline
    assert distance_to_polyline([tp.position(t) for t in ts], PATH).max() < 1e-12
    short = TimedPath([[0, 0, 0], [0.001, 0, 0]], speed=0.05, accel=0.2)  # triangular profile
    assert short.arc(short.duration) == pytest.approx(0.001) and short.v < 0.05


def _run(follower, tcp, servo_fraction=1.0, steps=200, block_after=None, T=0.2):
    """Ideal measured-mode servo: each twist moves the TCP by ``fraction * twist * T``."""
    trail, twists = [tcp[:3, 3].copy()], []
    for k in range(steps):
        out = follower.step(k * T, tcp)
        if out.linear is None:
            break
        twists.append(out.linear)
        if block_after is None or k < block_after:
            tcp = tcp.copy()
            tcp[:3, 3] += servo_fraction * out.linear * T
            tcp[:3, :3] = rotvec_to_matrix(servo_fraction * out.angular * T) @ tcp[:3, :3]
        trail.append(tcp[:3, 3].copy())
    return np.array(trail), np.array(twists), out, tcp


def _tcp(p, rot=(0, 0, 0)):
    T = np.eye(4)
    T[:3, :3] = rotvec_to_matrix(rot) @ np.diag([1.0, -1.0, -1.0])
    T[:3, 3] = p
    return T


def test_follows_the_path_at_speed_and_stops_at_its_end():
    f = PathFollower(PathFollowConfig(speed=0.05, step_period=0.2))
    f.set_path(PATH)
    trail, twists, out, _ = _run(f, _tcp(PATH[0]))
    assert out.status == "done" and f.completed == 1
    assert np.linalg.norm(trail[-1] - PATH[-1]) <= 0.002
    assert distance_to_polyline(trail, PATH).max() < 1e-3
    assert np.linalg.norm(twists, axis=1).max() <= 0.05 + 1e-6  # in the ideal servo, no correction needed
    assert f.step(100.0, _tcp(PATH[-1])).linear is None  # done: silent


def test_a_lagging_servo_is_corrected_and_the_path_is_still_held():
    f = PathFollower(PathFollowConfig(speed=0.05, step_period=0.2, max_speed=0.15))
    f.set_path(PATH)
    trail, twists, out, _ = _run(f, _tcp(PATH[0]), servo_fraction=0.6)
    assert out.status == "done"
    assert distance_to_polyline(trail, PATH).max() < 3e-3
    assert np.linalg.norm(twists, axis=1).max() <= 0.15 + 1e-9


def test_prepend_goes_from_the_tcp_to_the_path_start_and_offset_shifts_the_path():
    start = PATH[0] + [0.0, -0.04, 0.02]
    f = PathFollower(PathFollowConfig(anchor="prepend"))
    f.set_path(PATH)
    trail, _, out, _ = _run(f, _tcp(start))
    assert out.status == "done" and np.linalg.norm(trail[-1] - PATH[-1]) <= 0.002
    assert distance_to_polyline(trail, np.vstack([start, PATH])).max() < 1e-3
    g = PathFollower(PathFollowConfig(anchor="offset"))
    g.set_path(PATH)
    trail, _, out, _ = _run(g, _tcp(start))
    assert out.status == "done"
    assert np.linalg.norm(trail[-1] - (PATH[-1] - PATH[0] + start)) <= 0.002


def test_orientation_is_held_against_a_disturbance():
    f = PathFollower(PathFollowConfig())
    f.set_path(PATH)
    f.step(0.0, _tcp(PATH[0]))  # starts: the orientation to hold is the TCP's now
    out = f.step(0.2, _tcp(PATH[0], rot=(0.0, 0.0, 0.05)))  # someone yawed it by 0.05 rad
    assert out.angular is not None
    assert np.allclose(out.angular * 0.2, [0, 0, -0.05], atol=1e-9)


def test_a_blocked_arm_aborts_instead_of_winding_up():
    f = PathFollower(PathFollowConfig(speed=0.05, max_error=0.02))
    f.set_path(PATH)
    trail, twists, out, _ = _run(f, _tcp(PATH[0]), block_after=3)
    assert out.status.startswith("aborted: tracking error") and f.aborted == 1
    assert f.step(50.0, _tcp(PATH[0])).linear is None
    assert np.linalg.norm(twists, axis=1).max() <= 0.15 + 1e-9


def test_bad_paths_and_settings_are_refused():
    f = PathFollower()
    with pytest.raises(ValueError):
        f.set_path([[0, 0, np.nan]])
    with pytest.raises(ValueError):
        f.set_path(np.zeros((0, 3)))
    with pytest.raises(ConfigError):
        PathFollowConfig(speed=0.5, max_speed=0.2)
    with pytest.raises(ConfigError):
        PathFollowConfig(anchor="nowhere")
    with pytest.raises(ConfigError):
        PathFollowConfig(step_period=0.0)
