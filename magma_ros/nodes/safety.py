"""Safety-limit node: a thin rclpy shell around :class:`magma_ros.core.safety.SafetyFilter`.

    python -m magma_ros.nodes.safety --ros-args -p robot:=fr3 -p controller:=jtc

In:  ``magma/joint_command``, ``teleop/joint_command`` (JointTrajectory), joint states on the robot's
     ``joint_states_topic`` (remappable), ``safety/estop`` (Empty, reliable + transient local),
     services ``safety/reset`` and ``safety/resume_policy`` (Trigger).
Out: jtc ``<arm_controller>/joint_trajectory`` | forward ``<forward_controller>/commands`` | isaac
     ``joint_command``; gripper ``<gripper_controller>/joint_trajectory`` or franka_gripper actions;
     ``diagnostics``, latched ``safety/state`` and ``safety/source``.
All names are relative (one namespace per arm); all times come from the node clock (use_sim_time).
See docs/safety.md.

Test-only parameter ``fault_injection`` (default ""): ``"tick:N"`` raises inside every output tick
from the N-th on (before the filter runs), ``"step:N"`` makes the filter's output step itself raise
from the N-th tick on. It exists so the node
tests can prove that an internal error keeps the hold going out at the output rate; never set it on
a robot.
"""

from __future__ import annotations

import time

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import JointState
from std_msgs.msg import Empty, Float64MultiArray, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from magma_ros.core.errors import ConfigError
from magma_ros.core.robot import load_robot
from magma_ros.core.safety import SafetyConfig, SafetyFilter
from magma_ros.nodes._common import declare_config, diagnostic_array, run_node, to_duration_msg, to_seconds

OUTPUT_DEPTH = 100  # history of the controller-topic publisher (1 s at 100 Hz), see the constructor

LATCHED = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
COMMANDS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)


class SimClockBetween:
    """Simulated time between two /clock messages (ROS-free; the node feeds it).

    ``on_clock(clock_ns, wall)`` per /clock message (``wall``: monotonic seconds at arrival);
    ``now_ns(node_ns, wall)`` is ``node_ns`` (the node clock, which jumps at each message) plus the wall
    time since the newest message at the clock's rate (sim seconds per wall second, smoothed over the
    last increments), capped at ``cap`` of its last increment so the next message's time is never
    passed. A clock that stands still (repeated values), goes back or comes from elsewhere gives
    ``node_ns`` unchanged.
    """

    def __init__(self, cap: float = 0.9, smoothing: float = 0.2):
        self.cap, self.smoothing = cap, smoothing
        self.clock_ns: int | None = None  # newest /clock value
        self.wall = 0.0  # its arrival
        self.step_ns = 0  # its increment over the one before (0: the clock stands still)
        self.rate = 0.0  # sim seconds per wall second

    def on_clock(self, clock_ns: int, wall: float) -> None:
        if self.clock_ns is not None and clock_ns > self.clock_ns:
            self.step_ns = clock_ns - self.clock_ns
            r = self.step_ns * 1e-9 / max(wall - self.wall, 1e-4)
            self.rate = r if self.rate == 0.0 else self.rate + self.smoothing * (r - self.rate)
        else:
            self.step_ns = 0
        self.clock_ns, self.wall = clock_ns, wall

    def now_ns(self, node_ns: int, wall: float) -> int:
        if self.clock_ns is None or node_ns != self.clock_ns or self.step_ns <= 0:
            return node_ns
        ahead = min(max(wall - self.wall, 0.0) * self.rate * 1e9, self.cap * self.step_ns)
        return node_ns + int(ahead)


class SafetyNode(Node):
    """ROS wiring of the safety filter; every decision is made by the core."""

    def __init__(self):
        super().__init__("safety")
        self._origin: int | None = None  # [s] whole-second origin of the filter's time base
        self.cfg = declare_config(self, SafetyConfig)
        self.declare_parameter("franka_gripper_ns", "franka_gripper")  # UNVERIFIED name; see docs
        self.declare_parameter("franka_grasp_force", 20.0)  # [N] franka_gripper grasp force
        self._fault = str(self.declare_parameter("fault_injection", "").value)  # TEST ONLY (module doc)
        self.robot = load_robot(self.cfg.robot)
        self.filter = SafetyFilter(self.robot, self.cfg)
        r, dt = self.robot, self.filter.dt
        self.dt = dt
        self._period = to_duration_msg(dt)
        group = MutuallyExclusiveCallbackGroup()  # the core is not thread-safe: one callback at a time

        # outputs
        self.controller = self.cfg.controller
        gmode = self.cfg.gripper_output
        if gmode == "auto":
            gmode = "joint_command" if self.controller == "isaac" else "jtc"
        self.gripper_mode = gmode
        # A reliable writer keeps its last OUTPUT_DEPTH messages for readers that fall behind: the recorder
        # (it stores every command that reached the controller), loggers and audits get all of them
        # through a stall of up to a second; a controller acts on the newest it has.
        if self.controller == "jtc":
            self.pub_arm = self.create_publisher(JointTrajectory, f"{r.arm_controller}/joint_trajectory",
                                                 OUTPUT_DEPTH)
        elif self.controller == "forward":
            self.pub_arm = self.create_publisher(Float64MultiArray, f"{r.forward_controller}/commands", OUTPUT_DEPTH)
        else:
            self.pub_arm = self.create_publisher(JointState, "joint_command", OUTPUT_DEPTH)
        self.pub_gripper = None
        if gmode == "jtc":
            topic = f"{r.gripper_controller}/joint_trajectory"
            self.pub_gripper = self.create_publisher(JointTrajectory, topic, 10)
        elif gmode == "franka":
            self._setup_franka_gripper(group)
        self.pub_state = self.create_publisher(String, "safety/state", LATCHED)
        self.pub_source = self.create_publisher(String, "safety/source", LATCHED)
        self.pub_diag = self.create_publisher(DiagnosticArray, "diagnostics", 10)

        # inputs
        self.sub_policy = self.create_subscription(JointTrajectory, "magma/joint_command",
                                                   lambda m: self._on_command("policy", m), COMMANDS,
                                                   callback_group=group)
        self.create_subscription(JointTrajectory, "teleop/joint_command",
                                 lambda m: self._on_command("teleop", m), COMMANDS, callback_group=group)
        self.create_subscription(JointState, r.joint_states_topic, self._on_joint_state,
                                 qos_profile_sensor_data, callback_group=group)
        # e-stop: latched (reliable + transient local, as specified) and, so that no publisher's QoS can
        # silently miss it (`ros2 topic pub` is volatile), also reliable-volatile and best-effort.
        for qos in (LATCHED, COMMANDS, qos_profile_sensor_data):
            self.create_subscription(Empty, "safety/estop", self._on_estop, qos, callback_group=group)
        self.create_service(Trigger, "safety/reset", self._on_reset, callback_group=group)
        self.create_service(Trigger, "safety/resume_policy", self._on_resume, callback_group=group)
        # node clock: honours use_sim_time. (A timer callback with a parameter gets rclpy's TimerInfo from
        # the EventsExecutor: _tick's `extra` must not be filled by it.)
        self._timer = self.create_timer(dt, lambda: self._tick(), callback_group=group)
        self._sim_clock = None
        if self.get_parameter("use_sim_time").value:
            from rosgraph_msgs.msg import Clock

            # the node clock advances only with /clock (the sim: every 10 ms); an output at once needs
            # the instant in between (see _now_between)
            self._sim_clock = SimClockBetween()
            self.create_subscription(Clock, "/clock", lambda m: self._sim_clock.on_clock(
                m.clock.sec * 1_000_000_000 + m.clock.nanosec, time.monotonic()), qos_profile_sensor_data,
                callback_group=group)
        self.create_timer(1.0, lambda: self._publish_status(force=True), callback_group=group)

        self._last_status = None
        self._last_rejection = ""
        self._rejections = 0
        self._ticks = 0
        self._extra_out = False  # the last output step was an extra one (output_on_command), not a tick
        self._t_between = -1e18  # its time (in sim time: between two /clock messages)
        self._internal_errors = 0
        self._internal_error = ""  # the last internal error (reported until the node restarts)
        self._last_out = None  # the last output published (the fallback hold)
        self._publish_status(force=True)
        self.get_logger().info(
            f"safety: robot={r.name} controller={self.controller} gripper={gmode} "
            f"rate={self.cfg.output_rate:g} Hz "
            f"margin={self.filter.margin:g} rad jtc_stamp={self.cfg.jtc_stamp}; waiting for joint states on "
            f"'{self.resolve_topic_name(r.joint_states_topic)}'")

    # --------------------------------------------------------------------------------------- time
    # The filter runs on seconds since a whole-second origin taken at start-up: an epoch time (1.8e9 s)
    # as a float resolves only ~0.2 µs, too coarse for limits checked over a few milliseconds.
    def _now(self) -> float:
        return self._seconds(self.get_clock().now().nanoseconds)

    def _seconds(self, ns: int) -> float:
        """Node-clock nanoseconds on the filter's time base."""
        if self._origin is None:
            self._origin = ns // 1_000_000_000
        return (ns - self._origin * 1_000_000_000) * 1e-9

    def _stamp(self, stamp) -> float:
        """A header stamp on the filter's time base (a zero stamp stays 0: "now")."""
        if stamp.sec == 0 and stamp.nanosec == 0:
            return 0.0
        if self._origin is None:
            self._now()
        return (stamp.sec - self._origin) + stamp.nanosec * 1e-9

    def _time_msg(self, t: float):
        """Filter time -> builtin_interfaces/Time (integer arithmetic: no precision lost)."""
        ns = self._origin * 1_000_000_000 + int(round(t * 1e9))
        return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)

    # ------------------------------------------------------------------------------------- inputs
    def _on_joint_state(self, msg: JointState) -> None:
        err = self.filter.on_joint_state(msg.name, msg.position, self._now(), self._stamp(msg.header.stamp))
        if err:
            self._note_rejection(f"joint state ignored: {err}")
        elif self.filter.hold_reason == "following error":
            self._publish_status()

    def _on_command(self, source: str, msg: JointTrajectory) -> None:
        t = self._now()
        try:
            positions = [list(p.positions) for p in msg.points]
            times = [to_seconds(p.time_from_start) for p in msg.points]
            verdict = self.filter.on_command(source, msg.joint_names, positions, times,
                                             self._stamp(msg.header.stamp), t)
        except Exception as e:  # noqa: BLE001 - a command must never take the safety path down
            self.filter.last_rejection = f"malformed command ({type(e).__name__}: {e})"
            self._note_rejection(f"{source} command rejected: {self.filter.last_rejection}")
            return
        if not verdict.accepted:
            self._note_rejection(f"{source} command rejected: {verdict.reason}")
            return
        if verdict.reason:
            self.get_logger().warning(f"{source} command: {verdict.reason}", throttle_duration_sec=1.0)
        self._output_now()

    def _note_rejection(self, text: str) -> None:
        self._rejections += 1
        self.get_logger().warning(text, throttle_duration_sec=1.0)
        if text != self._last_rejection:  # a diagnostic per new reason (not per repeated message)
            self._last_rejection = text
            self._publish_status(rejection=text)

    def _on_estop(self, _msg: Empty) -> None:
        was = self.filter.estopped
        self.filter.estop(self._now())
        if not was:
            self.get_logger().error("E-STOP latched: controlled stop, then hold (safety/reset releases)")
            self._publish_status(force=True)
            self._output_now()

    def _on_reset(self, _req, resp):
        resp.success, resp.message = self.filter.reset(self._now())
        if resp.success:
            self.get_logger().info(f"reset: {resp.message}")
        else:
            self.get_logger().warning(f"reset refused: {resp.message}")
        self._publish_status(force=True)
        return resp

    def _on_resume(self, _req, resp):
        resp.success, resp.message = self.filter.resume_policy(self._now())
        self.get_logger().info(f"resume_policy: {resp.message}")
        self._publish_status(force=True)
        return resp

    # ------------------------------------------------------------------------------------ outputs
    def _output_now(self) -> None:
        """An accepted command or an e-stop goes out at once rather than at the next tick (on average
        half a period later); the tick timer restarts from here. At most one such output between two
        ticks, so no input rate can push the output rate above twice ``output_rate``."""
        if self.cfg.output_on_command and not self._extra_out:
            self._timer.reset()
            self._tick(extra=True)

    def _now_between(self) -> float:
        """The node clock, and in simulated time the instant between two /clock messages: the last
        one's time plus the wall time since it arrived (at the clock's measured rate), short of the
        next one's. Without it an output at once would carry the last tick's time: nothing new."""
        ns = self.get_clock().now().nanoseconds
        if self._sim_clock is not None:
            ns = self._sim_clock.now_ns(ns, time.monotonic())
        return self._seconds(ns)

    def _tick(self, extra: bool = False) -> None:
        t = self._now_between() if extra else self._now()
        if extra:
            self._t_between = t
        elif self._t_between - self.dt < t < self._t_between:  # (a /clock step shorter than the one before)
            t = self._t_between
        self._extra_out = extra
        self._ticks += 1
        try:
            self._inject_fault()
            out = self.filter.step(t)
            if out is not None:
                self._publish_arm(out, t)
                if out.gripper_changed and out.gripper is not None:
                    self._publish_gripper(out.gripper)
            self._publish_status()
        except Exception as e:  # noqa: BLE001 - never die on the safety path: keep the hold going out
            self._internal_errors += 1
            text = f"internal error in the output step ({type(e).__name__}: {e})"
            new = text != self._internal_error
            self._internal_error = text
            self.get_logger().error(f"{self._internal_error}: e-stop latched, holding",
                                    throttle_duration_sec=1.0)
            self._hold_after_error(t, report=new)

    def _hold_after_error(self, t: float, report: bool = True) -> None:
        """After an internal error: the filter's own controlled stop; if even that fails, the last
        output again (jtc: the same message, whose braking tail the controller is following).
        Diagnostics go out on a new error or a change of state (and at 1 Hz), not on every tick:
        a failing tick must cost no more than a working one, or the hold falls behind its rate."""
        try:
            self.filter.estop(t)
            out = self.filter.step(t)
            if out is not None:
                self._publish_arm(out, t)
        except Exception:  # noqa: BLE001 - the filter itself is broken: repeat the last output
            if self._last_out is not None:
                self.pub_arm.publish(self._last_out if self.controller != "isaac" else self._restamp(t))
        try:
            self._publish_status(force=report)
        except Exception:  # noqa: BLE001 - reporting must not stop the hold either
            pass

    def _restamp(self, t: float):
        msg = self._last_out
        msg.header.stamp = self._time_msg(t)
        return msg

    def _inject_fault(self) -> None:
        """TEST ONLY (see the module doc): raise where ``fault_injection`` says."""
        if not self._fault:
            return
        kind, _, n = self._fault.partition(":")
        if self._ticks < int(n or 0):
            return
        if kind == "tick":
            raise RuntimeError("injected fault in the output tick (fault_injection, test only)")
        if kind == "step" and not getattr(self.filter, "_broken", False):
            def broken(_t):
                raise RuntimeError("injected fault in the filter step (fault_injection, test only)")

            self.filter.step = broken
            self.filter._broken = True

    def _publish_arm(self, out, t: float) -> None:
        r = self.robot
        if self.controller == "jtc":
            msg = JointTrajectory()
            if self.cfg.jtc_stamp == "tick":  # the path the filter planned, on the node clock
                msg.header.stamp = self._time_msg(t)
            msg.joint_names = list(r.arm_joints)
            for i, q in enumerate(self.filter.jtc_points()):  # next point + braking tail
                msg.points.append(JointTrajectoryPoint(positions=[float(x) for x in q],
                                                       time_from_start=to_duration_msg((i + 1) * self.dt)))
        elif self.controller == "forward":
            msg = Float64MultiArray(data=[float(x) for x in out.positions])
        else:
            msg = JointState()
            msg.header.stamp = self._time_msg(t)  # the step time: the set-point is for t + dt
            names, pos = list(r.arm_joints), [float(x) for x in out.positions]
            if self.gripper_mode == "joint_command" and out.gripper is not None:
                g = r.gripper
                names += [g.joint, *g.mimic_joints]
                pos += [float(out.gripper)] + [float(m * out.gripper) for m in g.mimic_multipliers]
            msg.name, msg.position = names, pos
        self.pub_arm.publish(msg)
        self._last_out = msg

    def _publish_gripper(self, pos: float) -> None:
        if self.gripper_mode == "jtc":
            msg = JointTrajectory()
            msg.joint_names = [self.robot.gripper.joint]
            msg.points.append(JointTrajectoryPoint(positions=[float(pos)], time_from_start=self._period))
            self.pub_gripper.publish(msg)
        elif self.gripper_mode == "franka":
            self._franka_command()

    # ---------------------------------------------------------------------------- franka gripper
    def _setup_franka_gripper(self, group) -> None:
        try:
            from franka_msgs.action import Grasp, Move  # type: ignore[import-not-found]
            from rclpy.action import ActionClient
        except ImportError:
            raise ConfigError("gripper_output 'franka' needs franka_msgs (from franka_ros2) on this "
                              "install; use gripper_output:=jtc or none here") from None
        ns = self.get_parameter("franka_gripper_ns").value
        self._Move, self._Grasp = Move, Grasp
        self._move = ActionClient(self, Move, f"{ns}/move", callback_group=group)
        self._grasp = ActionClient(self, Grasp, f"{ns}/grasp", callback_group=group)
        self._franka_sent: float | None = None

    def _franka_command(self) -> None:
        """Send the gripper's target (not the ramp): franka_gripper moves at the limited speed itself."""
        g = self.robot.gripper
        target = self.filter.g_target
        if target is None or (self._franka_sent is not None and abs(target - self._franka_sent) < 0.002):
            return
        self._franka_sent = target
        speed = 2.0 * g.velocity_max  # width speed [m/s]
        if target <= g.closed + 1e-3:
            goal = self._Grasp.Goal()
            goal.width = 2.0 * g.closed
            goal.speed = speed
            goal.force = float(self.get_parameter("franka_grasp_force").value)
            goal.epsilon.inner = goal.epsilon.outer = 2.0 * (g.open - g.closed)  # grasp whatever is there
            self._grasp.send_goal_async(goal)
        else:
            goal = self._Move.Goal()
            goal.width = 2.0 * target
            goal.speed = speed
            self._move.send_goal_async(goal)

    # ------------------------------------------------------------------------------------- status
    def _publish_status(self, force: bool = False, rejection: str = "") -> None:
        """Latched state/source on every change; diagnostics on every change, rejection and at 1 Hz."""
        st = self.filter.status()
        key = (st.state, st.source, st.level, st.message)
        changed = key != self._last_status
        if not (changed or force or rejection):
            return
        if changed:
            self._last_status = key
            self.pub_state.publish(String(data=st.state))
            self.pub_source.publish(String(data=st.source))
            text = f"safety: {st.state} (source {st.source}): {st.message}"
            if st.level == 0:
                self.get_logger().info(text)
            else:
                self.get_logger().warning(text)
        level, message = st.level, st.message
        if rejection:
            level, message = max(level, 1), rejection
        if self._internal_error:
            level, message = 2, f"{self._internal_error}; {st.message}"
        values = {"state": st.state, "source": st.source, "rejected_messages": self._rejections,
                  "last_rejection": self._last_rejection, "internal_errors": self._internal_errors,
                  "following_errors": self.filter.following_errors,
                  "output_interruptions": self.filter.interruptions,
                  # steps where the limits could not all hold at once (docs/safety.md, the priority order)
                  "cruise_dropped_steps": self.filter.cruise_dropped,
                  "jerk_relaxed_steps": self.filter.jerk_relaxed, "infeasible_steps": self.filter.infeasible_steps,
                  # matched DDS endpoints (discovery can take seconds): is the command path connected?
                  "policy_command_publishers": self.sub_policy.get_publisher_count(),
                  "output_subscribers": self.pub_arm.get_subscription_count()}
        self.pub_diag.publish(diagnostic_array(self.get_clock().now().to_msg(), f"{self.get_name()}: safety limits",
                                               level, message, values, hardware_id=self.robot.name))


def main(args=None) -> int:
    return run_node(SafetyNode, args=args)


if __name__ == "__main__":
    raise SystemExit(main())

