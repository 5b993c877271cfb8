"""ToM path follower node: ``magma/tom/path`` (nav_msgs/Path, base frame) + joint states -> ``magma/ee_twist``.

The ``tom`` action source: instead of Magma's 7-DoF action tokens, the arm follows the gripper
mark's Trace-of-Mark trace in 3-D as a Cartesian path at a requested TCP speed
(:mod:`magma_ros.core.path_follow`). It feeds the existing servo through its twist input (one
TwistStamped per ``step_period``, base frame, applied for one step period), so every command still
goes servo -> safety -> controller. The policy node with ``action_source:=tom`` runs the same
follower in-process on its own plans (:class:`PathFollowerShell`); this node follows any path
published on ``magma/tom/path`` (a planner elsewhere, a test, a user).

    python -m magma_ros.nodes.tom_follower --ros-args -p robot:=fr3 -p speed:=0.05 -p step_period:=0.2

Positions of the path's poses are used (orientations are ignored: the TCP keeps its orientation
when ``hold_orientation``). A path in another frame than the robot's base link is refused (no TF
here). An empty path cancels the current one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from magma_ros.core.path_follow import PathFollowConfig, PathFollower
from magma_ros.nodes._common import declare_config, diagnostic_array, run_node, to_time_msg

PATH_TOPIC = "magma/tom/path"


@dataclass(frozen=True)
class TomFollowerConfig(PathFollowConfig):
    """Parameters of the follower node: the path-following ones plus the node's own."""

    robot: str = "fr3"  # fr3 | panda | wx250s: base frame, joint states, TCP link
    state_timeout: float = 0.5  # [s] joint states older than this (arrival, node clock) -> no twist
    # publish only while something subscribes to magma/ee_twist (a twist before DDS matched the
    # servo is lost); false for consumers that do not show up as subscribers
    require_subscriber: bool = True
    diagnostics_period: float = 1.0  # [s]


def path_config(cfg) -> PathFollowConfig:
    """The :class:`PathFollowConfig` part of a config that extends it."""
    return PathFollowConfig(**{f.name: getattr(cfg, f.name) for f in fields(PathFollowConfig)})


def arm_positions(names, positions, arm_joints) -> np.ndarray | None:
    """Arm joint positions (n,) in ``arm_joints`` order from a JointState's names/positions; None if incomplete."""
    idx = {n: i for i, n in enumerate(names)}
    try:
        q = np.array([float(positions[idx[j]]) for j in arm_joints])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return q if np.all(np.isfinite(q)) else None


class PathFollowerShell:
    """The follower on any rclpy node: joint-state input, a step timer, twists out, a status for diagnostics.

    ``twist_pub``: the node's ``magma/ee_twist`` publisher; ``now()``: node clock [s].
    """

    def __init__(self, node, cfg: PathFollowConfig, robot, twist_pub, now, state_timeout: float = 0.5,
                 require_subscriber: bool = True):
        from geometry_msgs.msg import TwistStamped
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import JointState

        from magma_ros.core.kinematics import Kinematics

        self.node, self.robot, self.pub, self.now = node, robot, twist_pub, now
        self.follower = PathFollower(cfg)
        self.kin = Kinematics(robot)
        self.state_timeout = float(state_timeout)
        self.require_subscriber = require_subscriber
        self.q: np.ndarray | None = None
        self.q_t = -math.inf
        self.twists = 0
        self.last_error = 0.0
        self.last_status = "idle"
        self._last_step = -math.inf
        self._Twist = TwistStamped
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
        node.create_subscription(JointState, robot.joint_states_topic, self.on_state, qos)
        node.create_timer(cfg.step_period, self.on_step)

    def on_state(self, msg) -> None:
        q = arm_positions(list(msg.name), list(msg.position), self.robot.arm_joints)
        if q is not None:
            self.q, self.q_t = q, self.now()

    def joint_state(self) -> np.ndarray | None:
        """Newest arm joint positions, or None when there are none or they are stale."""
        if self.q is None or self.now() - self.q_t > self.state_timeout:
            return None
        return self.q.copy()

    def tcp_pose(self) -> np.ndarray | None:
        q = self.joint_state()
        return None if q is None else self.kin.fk(q)

    def set_path(self, points) -> None:
        """Follow ``points`` (N, 3) [m] in the base frame from the next step (replaces the current path)."""
        self.follower.set_path(points)
        self.node.get_logger().info(f"tom: following a path of {len(np.asarray(points).reshape(-1, 3))} points "
                                    f"at {self.follower.cfg.speed:.3f} m/s")

    def on_step(self) -> None:
        if not self.follower.active:
            return
        now = self.now()
        if now - self._last_step < 0.5 * self.follower.cfg.step_period:
            return  # a timer catching up after a stall (or a sim clock burst): one twist per step period
        T = self.tcp_pose()
        if T is None:
            self._status("waiting for joint states")
            return
        if self.require_subscriber and self.pub.get_subscription_count() == 0:
            self._status(f"waiting for a subscriber on '{self.pub.topic_name}'")
            return
        out = self.follower.step(now, T)
        self._last_step = now
        self.last_error = out.error
        self._status(out.status)
        if out.linear is None:
            return
        m = self._Twist()
        m.header.stamp = to_time_msg(now)
        m.header.frame_id = self.robot.base_link
        m.twist.linear.x, m.twist.linear.y, m.twist.linear.z = (float(v) for v in out.linear)
        m.twist.angular.x, m.twist.angular.y, m.twist.angular.z = (float(v) for v in out.angular)
        self.pub.publish(m)
        self.twists += 1

    def _status(self, s: str) -> None:
        if s != self.last_status:
            log = self.node.get_logger()
            (log.warning if s.startswith(("aborted", "waiting")) else log.info)(f"tom path: {s}")
            self.last_status = s

    def values(self) -> dict:
        """Diagnostics key/values."""
        f = self.follower
        return {"tom_path_status": self.last_status, "tom_path_twists": self.twists,
                "tom_paths": f.paths, "tom_paths_done": f.completed, "tom_paths_aborted": f.aborted,
                "tom_tracking_error_m": f"{self.last_error:.4f}"}


def path_points(msg, base_link: str) -> tuple[np.ndarray | None, str]:
    """nav_msgs/Path -> (N, 3) positions, or (None, why) when it cannot be followed."""
    if msg.header.frame_id not in ("", base_link):
        return None, f"path in frame '{msg.header.frame_id}', expected the base link '{base_link}' (no TF here)"
    p = np.array([[ps.pose.position.x, ps.pose.position.y, ps.pose.position.z] for ps in msg.poses], float)
    p = p.reshape(-1, 3)
    if not np.isfinite(p).all():
        return None, "path contains NaN/inf"
    return p, ""


def make_node():
    """Build the follower node (imports rclpy lazily)."""
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped
    from nav_msgs.msg import Path
    from rclpy.node import Node

    from magma_ros.core.robot import load_robot

    class TomFollowerNode(Node):
        """Follows the newest path on ``magma/tom/path``."""

        def __init__(self):
            super().__init__("tom_follower")
            self.cfg: TomFollowerConfig = declare_config(self, TomFollowerConfig)
            self.robot = load_robot(self.cfg.robot)
            twist_pub = self.create_publisher(TwistStamped, "magma/ee_twist", 10)
            self.diag_pub = self.create_publisher(DiagnosticArray, "diagnostics", 10)
            self.shell = PathFollowerShell(self, path_config(self.cfg), self.robot, twist_pub, self.now,
                                           self.cfg.state_timeout, self.cfg.require_subscriber)
            self.create_subscription(Path, PATH_TOPIC, self.on_path, 10)
            self.create_timer(self.cfg.diagnostics_period, self.publish_diagnostics)
            self._rejected = ""
            self.get_logger().info(f"tom follower for {self.robot.name}: '{PATH_TOPIC}' -> magma/ee_twist, "
                                   f"{self.cfg.speed} m/s, step_period {self.cfg.step_period} s")

        def now(self) -> float:
            return self.get_clock().now().nanoseconds * 1e-9

        def on_path(self, msg) -> None:
            pts, why = path_points(msg, self.robot.base_link)
            if pts is None:
                if why != self._rejected:
                    self.get_logger().error(f"tom path ignored: {why}")
                self._rejected = why
                return
            if len(pts) == 0:
                self.shell.follower.cancel("empty path received")
                return
            self.shell.set_path(pts)

        def publish_diagnostics(self) -> None:
            s = self.shell.last_status
            level = 1 if s.startswith(("aborted", "waiting")) else 0
            self.diag_pub.publish(diagnostic_array(self.get_clock().now().to_msg(), "magma_ros: tom_follower",
                                                   level, s, self.shell.values(), hardware_id=self.robot.name))

    return TomFollowerNode()


def main(args=None) -> int:
    """Entry point: ``python -m magma_ros.nodes.tom_follower``."""
    return run_node(make_node, args=args)


if __name__ == "__main__":
    raise SystemExit(main())
