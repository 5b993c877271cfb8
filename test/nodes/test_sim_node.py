"""Sim node over DDS (separate process): /clock, joint states, RGB-D images, controller topics, reset."""

from __future__ import annotations

import math

import numpy as np
import pytest
from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from magma_ros.core.robot import load_robot

WAIT = 90.0  # [s wall] generous: the CI machine is shared and the sim may run well below real time


def _t(stamp) -> float:
    return stamp.sec + 1e-9 * stamp.nanosec


def _traj(names, positions, tfs: float, velocities=None) -> JointTrajectory:
    m = JointTrajectory()
    m.joint_names = list(names)
    p = JointTrajectoryPoint(positions=[float(x) for x in positions],
                             time_from_start=Duration(sec=int(tfs), nanosec=int(round((tfs % 1) * 1e9))))
    if velocities is not None:
        p.velocities = [float(x) for x in velocities]
    m.points = [p]
    return m


class Probe:
    """Collects what the sim node publishes."""

    def __init__(self, node, js_topic: str, ns: str = ""):
        self.node = node
        self.clock: list[float] = []
        self.js: list[JointState] = []
        self.color: list[Image] = []
        self.depth: list[Image] = []
        self.info: list[CameraInfo] = []
        self.diag: list[DiagnosticArray] = []
        p = f"{ns}/" if ns else ""
        node.create_subscription(Clock, "/clock", lambda m: self.clock.append(_t(m.clock)), 10)
        node.create_subscription(JointState, p + js_topic, self.js.append, 50)
        node.create_subscription(Image, p + "camera/camera/color/image_raw", self.color.append, 5)
        node.create_subscription(Image, p + "camera/camera/aligned_depth_to_color/image_raw",
                                 self.depth.append, 5)
        node.create_subscription(CameraInfo, p + "camera/camera/color/camera_info", self.info.append, 5)
        node.create_subscription(DiagnosticArray, p + "diagnostics", self.diag.append, 10)

    def q(self, names) -> np.ndarray:
        m = self.js[-1]
        return np.array([m.position[list(m.name).index(n)] for n in names])

    def wait_q(self, names, target, tol: float, timeout: float = WAIT) -> bool:
        target = np.asarray(target, float)
        return self.node.spin_until(
            lambda: bool(self.js) and np.abs(self.q(names) - target).max() < tol, timeout)

    def settle(self, sim_seconds: float) -> None:
        """Spin until the sim clock has advanced ``sim_seconds``."""
        t0 = self.clock[-1]
        assert self.node.spin_until(lambda: self.clock[-1] >= t0 + sim_seconds, WAIT)


def test_fr3_jtc_images_gripper_reset(nodes, rclpy_node):
    robot = load_robot("fr3")
    proc = nodes.start("sim", {"robot": "fr3", "controller": "jtc", "width": 160, "height": 120,
                               "camera_fps": 5.0, "report_period": 1.0})
    pr = Probe(rclpy_node, robot.joint_states_topic)
    arm_pub = rclpy_node.create_publisher(JointTrajectory, f"{robot.arm_controller}/joint_trajectory", 10)
    grip_pub = rclpy_node.create_publisher(JointTrajectory,
                                           f"{robot.gripper_controller}/joint_trajectory", 10)
    assert rclpy_node.spin_until(lambda: pr.clock and pr.js and pr.color and pr.depth and pr.info and pr.diag
                                 and arm_pub.get_subscription_count() and grip_pub.get_subscription_count(),
                                 WAIT), nodes.log(proc)

    # joint states: arm joints + finger (+ mimic), at home, >= 100 Hz of sim time
    js = pr.js[-1]
    assert list(js.name[:7]) == list(robot.arm_joints)
    assert robot.gripper.joint in js.name and "fr3_finger_joint2" in js.name
    assert np.allclose(pr.q(robot.arm_joints), robot.home, atol=1e-3)
    stamps = [_t(m.header.stamp) for m in pr.js]
    if stamps[-1] - stamps[0] > 0.2:
        assert len(stamps) / (stamps[-1] - stamps[0]) > 90

    # images: sizes, encodings, stamps in sim time, depth in mm, camera_info consistent
    c, d, info = pr.color[-1], pr.depth[-1], pr.info[-1]
    assert (c.width, c.height, c.encoding, c.step) == (160, 120, "rgb8", 480)
    assert (d.width, d.height, d.encoding, d.step) == (160, 120, "16UC1", 320)
    assert c.header.frame_id == d.header.frame_id == info.header.frame_id == "camera_color_optical_frame"
    assert 0.0 < _t(c.header.stamp) <= pr.clock[-1] + 1e-9
    rgb = np.frombuffer(bytes(c.data), np.uint8).reshape(120, 160, 3)
    depth = np.frombuffer(bytes(d.data), np.uint16).reshape(120, 160)
    assert rgb.std() > 10
    assert 500 < np.median(depth[depth > 0]) < 5000  # the table 0.5-5 m away, in mm
    K = np.array(info.k).reshape(3, 3)
    assert (info.width, info.height) == (160, 120) and K[0, 0] > 0 and K[0, 2] == pytest.approx(79.5)

    # diagnostics carry the real-time factor
    kv = {v.key: v.value for v in pr.diag[-1].status[0].values}
    assert float(kv["real_time_factor"]) > 0

    # malformed commands: logged and ignored, nothing moves, node alive
    arm_pub.publish(_traj(["not_a_joint"] * 7, robot.home + 0.3, 0.2))
    arm_pub.publish(_traj(robot.arm_joints, [math.nan] * 7, 0.2))
    arm_pub.publish(_traj(robot.arm_joints, robot.home[:3], 0.2))
    pr.settle(0.5)
    assert np.allclose(pr.q(robot.arm_joints), robot.home, atol=1e-3)
    assert proc.poll() is None

    # a valid JTC command is followed, interpolated over its time_from_start
    target = robot.home.copy()
    target[0] += 0.3
    target[3] += 0.2
    t_sent = pr.clock[-1]
    arm_pub.publish(_traj(robot.arm_joints, target, 1.0))
    assert pr.wait_q(robot.arm_joints, target, 2e-3), (pr.q(robot.arm_joints), nodes.log(proc))
    assert _t(pr.js[-1].header.stamp) - t_sent > 0.8  # it took the commanded ~1 s, no jump

    # gripper command (finger position in metres), the mimic finger follows
    grip_pub.publish(_traj([robot.gripper.joint], [0.01], 0.5))
    assert pr.wait_q([robot.gripper.joint, "fr3_finger_joint2"], [0.01, 0.01], 1e-3)

    # reset: home again, the clock keeps going forward
    cli = rclpy_node.create_client(Trigger, "reset")
    assert cli.wait_for_service(timeout_sec=30)
    t_before = pr.clock[-1]
    fut = cli.call_async(Trigger.Request())
    assert rclpy_node.spin_until(fut.done, WAIT) and fut.result().success
    assert pr.wait_q(robot.arm_joints, robot.home, 1e-3)
    # (the joint states of an instant go out before its /clock message: wait for the next one)
    assert pr.node.spin_until(lambda: pr.clock[-1] > t_before, WAIT), (t_before, pr.clock[-3:])
    assert all(b >= a for a, b in zip(pr.clock, pr.clock[1:]))
    assert "ignoring jtc command" in nodes.log(proc)


def test_wx250s_forward_controller(nodes, rclpy_node):
    robot = load_robot("wx250s")
    proc = nodes.start("sim", {"robot": "wx250s", "controller": "forward", "camera_fps": 0.0})
    pr = Probe(rclpy_node, robot.joint_states_topic)
    pub = rclpy_node.create_publisher(Float64MultiArray, f"{robot.forward_controller}/commands", 10)
    assert robot.joint_states_topic == "wx250s/joint_states"
    assert rclpy_node.spin_until(lambda: pr.clock and pr.js and pub.get_subscription_count(), WAIT), nodes.log(proc)
    pub.publish(Float64MultiArray(data=[0.5] * 3))  # wrong length: ignored
    pub.publish(Float64MultiArray(data=[0.5, math.inf, 0, 0, 0, 0]))  # inf: ignored
    pr.settle(0.5)
    assert np.allclose(pr.q(robot.arm_joints), robot.start, atol=1e-3)  # sim_start: the Bridge pose
    target = np.array([0.4, -0.3, 0.2, 0.1, 0.3, -0.2])
    pub.publish(Float64MultiArray(data=target.tolist()))
    assert pr.wait_q(robot.arm_joints, target, 2e-3), (pr.q(robot.arm_joints), nodes.log(proc))
    assert proc.poll() is None and "ignoring forward command" in nodes.log(proc)


def test_panda_isaac_joint_command_in_a_namespace(nodes, rclpy_node):
    robot = load_robot("panda")
    proc = nodes.start("sim", {"robot": "panda", "controller": "isaac", "camera_fps": 0.0}, namespace="/left")
    pr = Probe(rclpy_node, robot.joint_states_topic, ns="/left")
    pub = rclpy_node.create_publisher(JointState, "/left/joint_command", 10)
    assert rclpy_node.spin_until(lambda: pr.clock and pr.js and pub.get_subscription_count(), WAIT), nodes.log(proc)
    pub.publish(JointState(name=["bogus"], position=[1.0]))  # unknown joint: ignored
    target = robot.home.copy()
    target[1] += 0.25
    names = [*reversed(robot.arm_joints), robot.gripper.joint]  # by name, any order, finger included
    pub.publish(JointState(name=names, position=[*reversed(target.tolist()), 0.02]))
    assert pr.wait_q([*robot.arm_joints, robot.gripper.joint], [*target, 0.02], 2e-3), nodes.log(proc)
    assert proc.poll() is None


def test_tf_link_chain_reproduces_the_tcp_pose():
    """The /tf the node publishes on a real ROS install (tf2_msgs): link transforms chain to the TCP."""
    import magma_ros.sim  # noqa: F401
    from magma_ros.nodes.camera import transform_msg
    from magma_ros.nodes.sim import link_transforms, robot_link_bodies
    from magma_ros.sim.arm import ArmSim

    with ArmSim("fr3", width=64, height=48) as sim:
        rng = np.random.default_rng(3)
        sim.reset(rng.uniform(sim.robot.position_min, sim.robot.position_max))
        tf = {child: (parent, T) for parent, child, T in link_transforms(sim, robot_link_bodies(sim))}
        assert "fr3_hand_tcp" in tf and "red_cube" not in tf
        T, frame = np.eye(4), "fr3_hand_tcp"
        while frame != sim.robot.base_link:
            parent, Tp = tf[frame]
            m = transform_msg(Tp, parent, frame, _zero_stamp())
            q = m.transform.rotation
            w, x, y, z = q.w, q.x, q.y, q.z
            R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                          [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                          [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
            assert np.allclose(R, Tp[:3, :3], atol=1e-9)  # quaternion of the message is the rotation
            T = Tp @ T
            frame = parent
        assert np.allclose(T, sim.tcp_pose(), atol=1e-9)


def _zero_stamp():
    from builtin_interfaces.msg import Time

    return Time()


def test_frames_are_rendered_only_while_someone_reads_the_camera(nodes, rclpy_node):
    proc = nodes.start("sim", {"robot": "fr3", "width": 160, "height": 120, "camera_fps": 5.0,
                               "report_period": 0.5})
    diag: list[dict] = []
    rclpy_node.create_subscription(DiagnosticArray, "diagnostics",
                                   lambda m: diag.append({kv.key: kv.value for kv in m.status[0].values}), 10)
    # no camera subscriber: frame times pass unrendered
    assert rclpy_node.spin_until(lambda: diag and int(diag[-1]["unwatched_frames"]) >= 3, WAIT), nodes.log(proc)
    assert diag[-1]["frames"] == "0"
    color: list[Image] = []
    rclpy_node.create_subscription(Image, "camera/camera/color/image_raw", color.append, 5)
    assert rclpy_node.spin_until(lambda: len(color) >= 2, WAIT), nodes.log(proc)  # rendered on demand
    assert (color[-1].width, color[-1].height, color[-1].encoding) == (160, 120, "rgb8")
