"""Servo node: ``magma/ee_twist`` + ``magma/gripper`` + joint states -> ``magma/joint_command``.

A thin shell over :class:`magma_ros.core.servo.Servo` (all the rules live there; see
docs/nodes.md). Run: ``python -m magma_ros.nodes.servo --ros-args -p robot:=fr3``.
"""

from __future__ import annotations

import time

from magma_ros.core.errors import ConfigError
from magma_ros.core.robot import load_robot
from magma_ros.core.servo import JointCommand, Servo, ServoConfig
from magma_ros.nodes._common import declare_config, diagnostic_array, run_node, to_duration_msg, to_seconds


def make_node():
    """Build the servo node (imports rclpy lazily so the module imports without ROS)."""
    from builtin_interfaces.msg import Duration
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    class ServoNode(Node):
        """ROS shell of the servo: parses parameters, converts messages, logs why it holds."""

        def __init__(self):
            super().__init__("servo")
            self.cfg: ServoConfig = declare_config(self, ServoConfig).validate()
            self.robot = load_robot(self.cfg.robot)
            from magma_ros.core.kinematics import Kinematics

            self.servo = Servo(self.robot, Kinematics(self.robot), self.cfg)
            self.pub = self.create_publisher(JointTrajectory, "magma/joint_command", 10)
            self.diag_pub = self.create_publisher(DiagnosticArray, "diagnostics", 10)
            self.twist_sub = self.create_subscription(TwistStamped, "magma/ee_twist", self.on_twist, 10)
            self.create_subscription(Float64, "magma/gripper", self.on_gripper, 10)
            state_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
            self.create_subscription(JointState, self.robot.joint_states_topic, self.on_state, state_qos)
            self.create_timer(1.0, self.publish_diagnostics)
            if self.cfg.settle_time > 0:
                self.create_timer(self.cfg.keepalive_period / 2, self.on_keepalive)
            self._last_reason = ""
            self._last_limited = ""
            self._limited_logged = -1e9  # monotonic time of the last "servo scales" line
            self._clock_resets = 0
            self._spacing_warned = False
            self._Duration, self._Point, self._Traj = Duration, JointTrajectoryPoint, JointTrajectory
            self.get_logger().info(
                f"servo for {self.robot.name}: tcp {self.robot.tcp_link}, "
                f"delta_mode {self.servo.delta_mode}, "
                f"step_period {self.cfg.step_period} s, joint states on '{self.robot.joint_states_topic}'")

        def now(self) -> float:
            return self.get_clock().now().nanoseconds * 1e-9

        def on_state(self, msg) -> None:
            # Freshness is judged by arrival on the node clock: a driver's stamp may use another clock.
            ok = self.servo.update_state(list(msg.name), list(msg.position), self.now())
            self._clock_log()
            if not ok:
                self._note("joint states without all arm joints (or NaN)", warn=True)

        def _clock_log(self) -> None:
            """One log line per clock reset the servo detected (sim reset, looping bag)."""
            if self.servo.stats.clock_resets != self._clock_resets:
                self._clock_resets = self.servo.stats.clock_resets
                self.get_logger().warning(f"servo: {self.servo.clock_note}")

        def connected(self) -> bool:
            """Whether a command would reach the safety node (a matched subscriber), else say so."""
            if not self.cfg.require_subscriber or self.pub.get_subscription_count() > 0:
                return True
            self._note(f"no subscriber on '{self.pub.topic_name}' yet (safety not connected): dropped", warn=True)
            return False

        def on_twist(self, msg) -> None:
            if not self.connected():
                return
            frame = msg.header.frame_id
            if frame and frame.lstrip("/") != self.robot.base_link:
                self._note(f"twist in frame '{frame}', expected '{self.robot.base_link}' "
                           "(no TF here): dropped", warn=True)
                return
            tw = msg.twist
            res = self.servo.on_twist(to_seconds(msg.header.stamp), (tw.linear.x, tw.linear.y, tw.linear.z),
                                      (tw.angular.x, tw.angular.y, tw.angular.z), self.now())
            self._clock_log()
            self._handle(res)
            self._note_scaling(res.step)
            sp = self.servo.last_spacing
            if res.command is not None and sp is not None and sp < 0.8 * self.cfg.step_period \
                    and not self._spacing_warned:
                self._spacing_warned = True
                self.get_logger().warning(
                    f"twists arrive {sp:.3f} s apart but step_period is {self.cfg.step_period} s: does the "
                    "policy use the same step_period? (each twist is applied for step_period)")

        def on_gripper(self, msg) -> None:
            if not self.connected():
                return
            res = self.servo.on_gripper(msg.data, 0.0, self.now())  # Float64 has no stamp: "now"
            self._clock_log()
            if res.reason != "gripper unchanged":
                self._handle(res)

        def on_keepalive(self) -> None:
            res = self.servo.keepalive(self.now())
            self._clock_log()
            if res.command is not None:
                self.pub.publish(self.to_msg(res.command))

        def _handle(self, res) -> None:
            if res.command is not None:
                self.pub.publish(self.to_msg(res.command))
                if self._last_reason not in ("applied", "gripper"):
                    self.get_logger().info("servo: commands flowing")
                self._last_reason = res.reason
            else:
                self._note(res.reason, warn=not res.reason.startswith("duplicate"))

        def _note_scaling(self, step) -> None:
            """Log when steps start being cut short (< 90 % carried out) or why changes, at most every
            5 s, and once when they are whole again: a random or aggressive policy must not flood the log."""
            if step is None:
                return
            key = step.limited if step.fraction < 0.9 else ""
            if key == self._last_limited:
                return
            now = time.monotonic()
            if key and now - self._limited_logged < 5.0:
                return
            if key:
                self.get_logger().info(
                    f"servo scales: {step.fraction:.0%} of the step carried out ({step.limited}; condition "
                    f"number {step.condition:.1f}, singularity scale {step.singularity_scale:.2f}, "
                    f"velocity scale {step.velocity_scale:.2f})")
                self._limited_logged = now
            elif step.fraction >= 0.99:
                self.get_logger().info("servo: steps carried out in full again")
            else:
                return
            self._last_limited = key

        def _note(self, reason: str, warn: bool) -> None:
            if reason != self._last_reason:  # log changes, not every message
                if warn:  # (rclpy: one severity per call site)
                    self.get_logger().warning(f"servo holds: {reason}")
                else:
                    self.get_logger().info(f"servo holds: {reason}")
                self._last_reason = reason
                self.publish_diagnostics()

        def to_msg(self, cmd: JointCommand):
            m = self._Traj()
            m.header.stamp = self.get_clock().now().to_msg()
            m.header.frame_id = self.robot.base_link
            m.joint_names = list(cmd.joint_names)
            for t, row in zip(cmd.times, cmd.positions):
                p = self._Point()
                p.positions = [float(x) for x in row]
                p.time_from_start = to_duration_msg(t)
                m.points.append(p)
            return m

        def publish_diagnostics(self) -> None:
            s = self.servo.stats
            flowing = self._last_reason in ("applied", "gripper", "")
            vals = {"joint_states": "yes" if self.servo.has_state else "no",
                    "applied": s.applied, "held_late": s.held_late, "delta_mode": self.servo.delta_mode,
                    "step_period_s": self.cfg.step_period,
                    "last_twist_spacing_s": "" if self.servo.last_spacing is None else
                    f"{self.servo.last_spacing:.3f}",
                    # matched DDS endpoints (discovery can take seconds): is the command path connected?
                    "twist_publishers": self.twist_sub.get_publisher_count(),
                    "command_subscribers": self.pub.get_subscription_count()}
            st = s.last_step
            vals.update({
                # the last applied step (MoveIt Servo's singularity and limit scaling)
                "condition_number": "" if st is None else f"{st.condition:.2f}",
                "singularity_scale": "" if st is None else f"{st.singularity_scale:.3f}",
                "velocity_scale": "" if st is None else f"{st.velocity_scale:.3f}",
                "step_fraction": "" if st is None else f"{st.fraction:.3f}",
                "step_limited_by": "" if st is None else st.limited,
                "singularity_escape_rad": "" if st is None else f"{st.escape:.3f}",
                "scaled": s.scaled, "clock_resets": s.clock_resets,
                "position_margin_rad": self.robot.position_margin})
            vals.update({f"dropped_{k}": v for k, v in s.dropped.items()})
            self.diag_pub.publish(diagnostic_array(
                self.get_clock().now().to_msg(), "magma_ros: servo", 0 if flowing else 1,
                "ok" if flowing else self._last_reason, vals, hardware_id=self.robot.name))

    return ServoNode()


def main(args=None) -> int:
    """Console entry point (``magma_ros_servo``)."""
    try:
        return run_node(make_node, args=args)
    except ConfigError as e:  # pragma: no cover - run_node already reports ConfigError
        print(f"[magma_ros] error: {e}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
