"""The recorded action in Magma's convention, the lookahead that computes it, statistics and MCAP bags."""

from __future__ import annotations

import json

import numpy as np
import pytest

from magma_ros.core.actions import euler_to_rotvec, load_stats
from magma_ros.core.errors import ConfigError
from magma_ros.core.kinematics import rotvec_to_matrix
from magma_ros.data.episode import ActionLookahead, Sample, magma_delta, mat2euler, step_frames


def random_pose(rng) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = rotvec_to_matrix(rng.normal(size=3))
    T[:3, 3] = rng.normal(size=3)
    return T


def test_delta_is_what_the_servo_applies():
    """The servo applies a Magma action as p + d, Exp(euler_to_rotvec(rpy)) @ R (core.actions, core.servo's
    convention): the recorded delta between two poses must take the first pose to the second that way."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = random_pose(rng)
        b = a.copy()
        b[:3, :3] = rotvec_to_matrix(rng.normal(scale=0.3, size=3)) @ a[:3, :3]
        b[:3, 3] += rng.normal(scale=0.02, size=3)
        d = magma_delta(a, b, gripper=0.3)
        np.testing.assert_allclose(a[:3, 3] + d[:3], b[:3, 3], atol=1e-12)
        np.testing.assert_allclose(rotvec_to_matrix(euler_to_rotvec(d[3:6])) @ a[:3, :3], b[:3, :3], atol=1e-9)
        assert d[6] == 0.3


def test_mat2euler_sxyz_known_angles():
    """Pure yaw / pitch / roll come back on their own axis (sxyz: roll about x, pitch y, yaw z)."""
    for axis, i in (("x", 0), ("y", 1), ("z", 2)):
        rv = np.zeros(3)
        rv[i] = 0.4
        rpy = mat2euler(rotvec_to_matrix(rv))
        np.testing.assert_allclose(rpy, rv, atol=1e-12, err_msg=axis)


def test_lookahead_uses_the_pose_one_step_later():
    poses = []
    for i in range(5):
        T = np.eye(4)
        T[0, 3] = 0.01 * i * i  # accelerating along x
        poses.append(T)
    la = ActionLookahead(2)
    out = []
    for i, T in enumerate(poses):
        out += la.push(Sample({"i": i}, T, gripper_command=1.0 if i < 3 else 0.0))
    assert [f["i"] for f in out] == [0, 1, 2]
    out += la.flush()
    assert [f["i"] for f in out] == [0, 1, 2, 3, 4]
    dx = [float(f["action"][0]) for f in out]
    np.testing.assert_allclose(dx, [0.04, 0.08, 0.12, 0.07, 0.0], atol=1e-7)  # last ones: toward the final pose
    assert [float(f["action"][6]) for f in out] == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_step_period_must_be_whole_frames():
    assert step_frames(0.2, 10) == 2 and step_frames(0.1, 10) == 1
    with pytest.raises(ConfigError, match="whole number"):
        step_frames(0.25, 10)


def test_stats_load_as_policy_statistics(tmp_path):
    """`magma-ros stats` output: q01/q99 of the recorded actions, loadable by the policy's stats:= loader."""
    from magma_ros.data.lerobot import LeRobotWriter
    from magma_ros.data.stats import action_stats

    feats = {"action": {"dtype": "float32", "shape": [7], "names": None}}
    w = LeRobotWriter(tmp_path / "ds", 10, feats, extra_info={"magma_ros": {"step_period": 0.2}})
    rng = np.random.default_rng(1)
    sent = rng.normal(scale=0.01, size=(300, 7)).astype(np.float32)
    for ep in range(3):
        st = w.begin_episode("t")
        for a in sent[ep * 100:(ep + 1) * 100]:
            st.add_frame({"action": a})
        st.finish()
        w.commit(st)
    d = action_stats(tmp_path / "ds")
    np.testing.assert_allclose(d["action"]["q01"], np.quantile(sent.astype(np.float64), 0.01, axis=0), rtol=1e-6)
    np.testing.assert_allclose(d["action"]["q99"], np.quantile(sent.astype(np.float64), 0.99, axis=0), rtol=1e-6)
    p = tmp_path / "stats.json"
    p.write_text(json.dumps(d))
    s = load_stats(str(p))
    assert s.step_period == 0.2 and list(s.mask) == [True] * 6 + [False]
    np.testing.assert_allclose(s.q99, d["action"]["q99"])


def test_bag_round_trip_with_mcap_ros2(tmp_path):
    """Messages written by the bag writer come back field for field through the mcap_ros2 reader."""
    from geometry_msgs.msg import TwistStamped
    from mcap_ros2.reader import read_ros2_messages
    from sensor_msgs.msg import Image, JointState
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint
    from visualization_msgs.msg import Marker, MarkerArray

    from magma_ros.data.bag import BagWriter

    b = BagWriter(tmp_path / "e.mcap")
    img = Image(height=2, width=3, encoding="rgb8", step=9, data=bytes(range(18)))
    js = JointState(name=["a", "b"], position=[0.5, -1.25])
    tw = TwistStamped()
    tw.twist.linear.x = 0.05
    jt = JointTrajectory(joint_names=["a"], points=[JointTrajectoryPoint(positions=[0.1])])
    tom = MarkerArray(markers=[Marker(ns="magma_tom", id=3)])
    for i, (t, m) in enumerate([("/img", img), ("/joint_states", js), ("/teleop/ee_twist", tw), ("/cmd", jt),
                                ("/magma/tom", tom)]):
        b.write(t, m, 1000 + i)
    assert (tmp_path / "e.mcap.partial").exists() and not (tmp_path / "e.mcap").exists()
    b.close()
    assert not (tmp_path / "e.mcap.partial").exists()
    got = {m.channel.topic: (m.schema.name, m.ros_msg, m.log_time_ns)
           for m in read_ros2_messages(str(tmp_path / "e.mcap"))}
    assert got["/img"][0] == "sensor_msgs/msg/Image" and bytes(got["/img"][1].data) == bytes(range(18))
    assert list(got["/joint_states"][1].position) == [0.5, -1.25] and got["/joint_states"][2] == 1001
    assert got["/teleop/ee_twist"][1].twist.linear.x == 0.05
    assert list(got["/cmd"][1].points[0].positions) == [0.1]
    assert got["/magma/tom"][1].markers[0].id == 3


def test_stats_cli_errors_are_one_line(tmp_path, capsys):
    from magma_ros.cli import main

    assert main(["stats", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no meta/info.json" in err and "\n" not in err
