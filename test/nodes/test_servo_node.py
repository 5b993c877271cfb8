"""Servo node over DDS in its own process: twist -> JointTrajectory, holds, gripper, use_sim_time."""

from __future__ import annotations

import time

import numpy as np
import pytest

from magma_ros.core.kinematics import Kinematics, pose_error, rotvec_to_matrix
from magma_ros.core.robot import load_robot

T = 0.2


def to_s(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def stamp_of(t: float):
    from builtin_interfaces.msg import Time

    return Time(sec=int(t), nanosec=int(round((t - int(t)) * 1e9)))


class Probe:
    """Publishes joint states continuously while waiting; collects servo output."""

    def __init__(self, node, rb, sim_time: float | None = None, listen: bool = True):
        from geometry_msgs.msg import TwistStamped
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float64
        from trajectory_msgs.msg import JointTrajectory

        self.node, self.rb = node, rb
        self.q = rb.home.copy()
        self.finger = 0.04
        self.sim_time = sim_time
        self._wall = -1.0  # monotonic time of the last tick
        self.cmds: list = []
        self.js_pub = node.create_publisher(JointState, rb.joint_states_topic, 10)
        self.tw_pub = node.create_publisher(TwistStamped, "magma/ee_twist", 10)
        self.g_pub = node.create_publisher(Float64, "magma/gripper", 10)
        self.clock_pub = node.create_publisher(Clock, "/clock", 10)
        self._JS, self._TW, self._F, self._C, self._JT = JointState, TwistStamped, Float64, Clock, JointTrajectory
        if listen:  # else the test subscribes later (`listen()`)
            self.listen()

    def listen(self):
        self.node.create_subscription(self._JT, "magma/joint_command", self.cmds.append, 10)

    def now(self) -> float:
        if self.sim_time is not None:
            return self.sim_time
        return self.node.get_clock().now().nanoseconds * 1e-9

    def tick(self):
        """A 200 Hz driver: joint states (and /clock, advancing at the wall clock's rate) every 5 ms.

        ``wait`` calls this for every predicate check, many times per millisecond while it drains its
        queue; advancing the sim clock per call would run it tens of times faster than real time. When
        this process was not scheduled for a while the clock advances by at most 20 ms (a simulator
        running slower than real time), never in a jump that makes the last joint state look stale."""
        wall = time.monotonic()
        if self._wall >= 0 and wall - self._wall < 0.005:
            return
        if self.sim_time is not None:
            self.sim_time += min(wall - self._wall, 0.02) if self._wall >= 0 else 0.005
            self.clock_pub.publish(self._C(clock=stamp_of(self.sim_time)))
        self._wall = wall
        m = self._JS()
        m.header.stamp = stamp_of(self.now())
        m.name = list(self.rb.arm_joints) + [self.rb.gripper.joint]
        m.position = [float(x) for x in self.q] + [self.finger]
        self.js_pub.publish(m)

    def wait(self, pred, timeout=10.0):
        def p():
            self.tick()
            return pred()
        return self.node.spin_until(p, timeout, step=0.005)

    def twist(self, v, w, stamp: float, frame="fr3_link0"):
        m = self._TW()
        m.header.stamp = stamp_of(stamp)
        m.header.frame_id = frame
        m.twist.linear.x, m.twist.linear.y, m.twist.linear.z = v
        m.twist.angular.x, m.twist.angular.y, m.twist.angular.z = w
        self.tw_pub.publish(m)

    def gripper(self, g: float):
        self.g_pub.publish(self._F(data=g))


def ready(probe, nodes, proc):
    """Wait until the servo subscribes (discovery) and is alive."""
    ok = probe.wait(lambda: probe.tw_pub.get_subscription_count() > 0
                    and probe.js_pub.get_subscription_count() > 0, timeout=40.0)
    assert ok and proc.poll() is None, nodes.dump()
    probe.wait(lambda: False, timeout=0.5)  # a few joint states reach it


def twist_until_applied(probe, v, age: float = 0.05) -> int | None:
    """A fresh twist (``age`` s old) every 1.25 s until one is applied (a servo starved by a loaded
    machine may rightly hold one on stale joint states); the index of the first command it produced."""
    n = len(probe.cmds)
    for _ in range(8):
        probe.twist(v, (0.0, 0.0, 0.0), probe.now() - age)
        if probe.wait(lambda: len(probe.cmds) > n, 1.25):
            return n
    return None


def test_servo_node_turns_a_twist_into_one_step_of_joint_targets(nodes, rclpy_node):
    rb = load_robot("fr3")
    kin = Kinematics(rb)
    proc = nodes.start("servo", {"robot": "fr3", "step_period": T})
    probe = Probe(rclpy_node, rb)
    ready(probe, nodes, proc)

    v, w = (0.05, 0.0, -0.025), (0.0, 0.0, 0.2)
    t_img = probe.now() - 0.8  # the action's image is 0.8 s old (slow inference): still accepted
    probe.twist(v, w, t_img)
    assert probe.wait(lambda: len(probe.cmds) >= 1, 10.0), nodes.dump()
    m = probe.cmds[0]
    assert list(m.joint_names) == list(rb.arm_joints) + ["fr3_finger_joint1"]
    assert len(m.points) == 1
    assert m.points[0].time_from_start.sec == 0 and m.points[0].time_from_start.nanosec == pytest.approx(2e8)
    assert to_s(m.header.stamp) > t_img + 0.7  # stamped when made, not with the image's stamp
    q = np.array(m.points[0].positions[:7])
    want = kin.fk(rb.home)
    want[:3, 3] += np.array(v) * T
    want[:3, :3] = rotvec_to_matrix(np.array(w) * T) @ want[:3, :3]
    dp, dr = pose_error(want, kin.fk(q))
    assert np.linalg.norm(dp) < 2e-4 and np.linalg.norm(dr) < 2e-3
    assert m.points[0].positions[7] == pytest.approx(0.04)  # measured finger until commanded

    # never repeated; duplicates, stale actions and foreign frames hold: no new target is sent, only
    # the same target re-sent while the arm settles (settle_time 1 s), then silence
    probe.twist(v, w, t_img)
    probe.twist(v, w, probe.now() - 3.0)
    probe.twist(v, w, probe.now(), frame="camera_color_optical_frame")
    probe.wait(lambda: False, timeout=2.0)
    assert len(probe.cmds) >= 2  # keep-alives of the same target
    for c in probe.cmds:
        assert np.allclose(c.points[-1].positions[:7], q), "a new target was sent"
    n = len(probe.cmds)
    probe.wait(lambda: False, timeout=1.0)
    assert len(probe.cmds) == n, "still sending after settle_time"

    # gripper: normalized 0 -> closed finger position in metres, arm keeps the last target
    probe.gripper(0.0)
    assert probe.wait(lambda: len(probe.cmds) >= n + 1, 10.0), nodes.dump()
    g = probe.cmds[n]
    assert g.points[-1].positions[7] == pytest.approx(rb.gripper.closed)
    assert np.allclose(g.points[-1].positions[:7], q)
    assert proc.poll() is None


def test_servo_node_honours_use_sim_time(nodes, rclpy_node):
    rb = load_robot("fr3")
    proc = nodes.start("servo", {"robot": "fr3", "step_period": T, "use_sim_time": True})
    probe = Probe(rclpy_node, rb, sim_time=1000.0)
    ready(probe, nodes, proc)
    # 1000 s is ~56 years before the wall clock: only a node on /clock time accepts it as fresh
    n = twist_until_applied(probe, (0.0, 0.05, 0.0), age=0.1)
    assert n is not None, nodes.dump()
    stamp = to_s(probe.cmds[n].header.stamp)
    assert 1000.0 < stamp <= probe.now() + 1e-6


def test_servo_node_drops_steps_until_the_safety_node_listens(nodes, rclpy_node):
    """Nothing subscribed to magma/joint_command: a twist is dropped, not applied into the void (its
    target would run ahead of the arm), and diagnostics say why; once a subscriber is matched the
    next twist is one step from where the arm is — the dropped one left no trace."""
    from diagnostic_msgs.msg import DiagnosticArray

    rb = load_robot("fr3")
    kin = Kinematics(rb)
    diags = []
    rclpy_node.create_subscription(DiagnosticArray, "diagnostics",
                                   lambda m: diags.extend(s for s in m.status if "servo" in s.name), 10)
    # target mode: each step is applied to the previous target, so a step sent into the void would
    # show up as a second step later
    proc = nodes.start("servo", {"robot": "fr3", "step_period": T, "delta_mode": "target"})
    probe = Probe(rclpy_node, rb, listen=False)
    ready(probe, nodes, proc)
    v, w = (0.04, 0.0, 0.0), (0.0, 0.0, 0.0)
    probe.twist(v, w, probe.now())
    assert probe.wait(lambda: diags and "no subscriber" in diags[-1].message, 10.0), nodes.dump()
    values = {kv.key: kv.value for kv in diags[-1].values}
    assert values["applied"] == "0" and values["command_subscribers"] == "0"
    probe.listen()
    assert probe.wait(lambda: diags and {kv.key: kv.value for kv in diags[-1].values}["command_subscribers"] != "0",
                      20.0), nodes.dump()
    probe.twist(v, w, probe.now())
    assert probe.wait(lambda: len(probe.cmds) >= 1, 10.0), nodes.dump()
    q = np.array(probe.cmds[0].points[-1].positions[:7])
    want = kin.fk(rb.home)
    want[:3, 3] += np.array(v) * T  # one step, not two
    dp, _ = pose_error(want, kin.fk(q))
    assert np.linalg.norm(dp) < 2e-4
    assert proc.poll() is None


def test_servo_node_survives_the_clock_jumping_back_and_reports_the_step(nodes, rclpy_node):
    """use_sim_time and a simulator reset (Isaac Sim) / a looping bag: /clock restarts. The servo must
    apply the next twist on the new clock (before: every twist 'not newer than the last applied' until
    the clock caught up), and its diagnostics carry the step's condition number and scaling."""
    from diagnostic_msgs.msg import DiagnosticArray

    rb = load_robot("fr3")
    diags = []
    rclpy_node.create_subscription(DiagnosticArray, "diagnostics",
                                   lambda m: diags.extend(s for s in m.status if "servo" in s.name), 10)
    proc = nodes.start("servo", {"robot": "fr3", "step_period": T, "use_sim_time": True})
    probe = Probe(rclpy_node, rb, sim_time=1000.0)
    ready(probe, nodes, proc)
    assert twist_until_applied(probe, (0.0, 0.05, 0.0)) is not None, nodes.dump()
    probe.wait(lambda: False, timeout=1.5)  # settle_time: keep-alives end
    probe.sim_time = 5.0  # the simulator was reset: its clock starts again
    probe.wait(lambda: False, timeout=0.5)  # fresh joint states on the new clock
    # (before the fix no twist on the new clock was applied until it caught up with 1000 s)
    n = twist_until_applied(probe, (0.0, 0.0, 0.05))
    assert n is not None, "twist after the clock reset not applied\n" + nodes.dump()
    assert to_s(probe.cmds[n].header.stamp) < 10.0  # stamped on the new clock

    def vals():
        return {kv.key: kv.value for kv in diags[-1].values} if diags else {}

    assert probe.wait(lambda: vals().get("clock_resets") == "1" and int(vals().get("applied", 0)) >= 2, 10.0), vals()
    v = vals()
    assert 1.0 < float(v["condition_number"]) < 17.0  # the ready pose: far from singular
    assert float(v["singularity_scale"]) == 1.0 and float(v["step_fraction"]) > 0.99
    assert v["step_limited_by"] == "" and float(v["position_margin_rad"]) == pytest.approx(0.05)
    assert "jumped back" in nodes.dump() and proc.poll() is None
