"""Teleop node: a gamepad / SpaceMouse (sensor_msgs/Joy) or a terminal keyboard -> ``teleop/ee_twist``.

    python -m magma_ros.nodes.teleop --ros-args -p device:=xbox -p robot:=fr3
    python -m magma_ros.nodes.teleop --ros-args -p device:=keyboard      (in a terminal)

A thin shell over :mod:`magma_ros.core.teleop` (deadman, turbo, stale input, buttons; docs/teleop.md).

In:  ``joy`` (sensor_msgs/Joy; the device YAML's ``joy_topic``, e.g. ``spacenav/joy``), optionally
     ``twist_topic`` (geometry_msgs/Twist, ``spacenav/twist``), or the keyboard on stdin;
     ``safety/state``, ``safety/source``, ``recorder/state`` (latched String, for the status line);
     the robot's joint states (the finger, to re-sync the gripper when teleop takes over again).
Out: ``teleop/ee_twist`` (TwistStamped, base frame, m/s and rad/s, each applied for ``period`` by the
     teleop servo: the servo node remapped to ``teleop/*``, see launch/teleop.launch.yaml),
     ``teleop/gripper`` (Float64, 0 closed ... 1 open), ``safety/estop`` (Empty, reliable + transient
     local), calls ``safety/resume_policy`` and ``recorder/start|stop|discard`` (std_srvs/Trigger);
     ``diagnostics``.
"""

from __future__ import annotations

import math
import os
import select
import shutil
import sys
import threading

from magma_ros.core.errors import ConfigError
from magma_ros.core.robot import load_robot
from magma_ros.core.teleop import (
    KeyboardInput,
    KeyboardLayout,
    KeyDecoder,
    Sample,
    Step,
    TeleopConfig,
    TeleopCore,
    load_device_params,
    parse_layout,
    status_line,
)
from magma_ros.nodes._common import declare_config, diagnostic_array, run_node

SERVICES = {"resume_policy": "safety/resume_policy", "start_episode": "recorder/start",
            "stop_episode": "recorder/stop", "discard_episode": "recorder/discard"}


def _param_default(v):
    """A YAML value as a ROS parameter default (lists of strings stay lists; None -> '')."""
    return "" if v is None else v


def make_node():
    """Build the teleop node (imports rclpy lazily so the module imports without ROS)."""
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import Twist as TwistMsg
    from geometry_msgs.msg import TwistStamped
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import JointState, Joy
    from std_msgs.msg import Empty, Float64, String
    from std_srvs.srv import Trigger

    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)

    class TeleopNode(Node):
        """ROS wiring of the teleop core; every decision is made by the core."""

        def __init__(self):
            super().__init__("teleop")
            self.cfg: TeleopConfig = declare_config(self, TeleopConfig).validate()
            self.robot = load_robot(self.cfg.robot)
            flat = load_device_params(self.cfg.device)
            desc = ParameterDescriptor(dynamic_typing=True)
            # every layout entry is a ROS parameter too (-p enable_button:=5 overrides the YAML)
            values = {k: self.declare_parameter(k, _param_default(v), desc).value for k, v in flat.items()}
            name = os.path.splitext(os.path.basename(self.cfg.device))[0]
            self.device_name = name
            self.layout = parse_layout(values, name)
            self.keyboard = isinstance(self.layout, KeyboardLayout)
            if self.keyboard and not sys.stdin.isatty():
                raise ConfigError("teleop device 'keyboard' needs a terminal (stdin is not a tty): run "
                                  "magma_ros_teleop --ros-args -p device:=keyboard in its own terminal")
            rearm = getattr(self.layout, "rearm_after_stale", True)
            self.core = TeleopCore(self.layout.scales, self.cfg, rearm_after_stale=rearm)
            self.lock = threading.RLock()  # the core is not thread-safe (executor threads + keyboard thread)
            group = MutuallyExclusiveCallbackGroup()
            self._TS, self._F, self._Empty, self._Trigger = TwistStamped, Float64, Empty, Trigger

            self.pub_twist = self.create_publisher(TwistStamped, "teleop/ee_twist", 10)
            self.pub_gripper = self.create_publisher(Float64, "teleop/gripper", 10)
            self.pub_estop = self.create_publisher(Empty, "safety/estop", latched)
            self.pub_diag = self.create_publisher(DiagnosticArray, "diagnostics", 10)
            self.clients_ = {a: self.create_client(Trigger, srv, callback_group=group) for a, srv in SERVICES.items()}
            self.safety_state = self.safety_source = self.recorder_state = ""
            self.create_subscription(String, "safety/state", self._on_safety_state, latched, callback_group=group)
            self.create_subscription(String, "safety/source", lambda m: setattr(self, "safety_source", m.data),
                                     latched, callback_group=group)
            self.create_subscription(String, "recorder/state", lambda m: setattr(self, "recorder_state", m.data),
                                     latched, callback_group=group)
            self.finger: float | None = None  # measured finger [m]
            self.create_subscription(JointState, self.robot.joint_states_topic, self._on_joint_state,
                                     qos_profile_sensor_data, callback_group=group)
            self.sub_joy = None
            self._twist_axes, self._twist_t = None, -math.inf
            if not self.keyboard:
                self.sub_joy = self.create_subscription(Joy, self.layout.joy_topic, self._on_joy, 10,
                                                        callback_group=group)
                if self.layout.twist_topic:
                    self.create_subscription(TwistMsg, self.layout.twist_topic, self._on_twist_input, 10,
                                             callback_group=group)
            self.timer = self.create_timer(self.cfg.period, self._on_tick, callback_group=group)
            self.create_timer(self.cfg.status_period, self._publish_diagnostics, callback_group=group)

            self.last = ""  # outcome of the last button, for the status line
            self._resume_until = -math.inf
            self._resume_next = -math.inf
            self._resume_busy = False
            self._last_note = ""
            self._status_shown, self._status_t = "", -math.inf
            self._stop = threading.Event()
            self._term = None
            self._reader = None
            what = (f"joy on '{self.resolve_topic_name(self.layout.joy_topic)}'" if not self.keyboard
                    else "keyboard on this terminal")
            self.get_logger().info(
                f"teleop: device {name} ({what}), robot {self.robot.name}, period {self.cfg.period} s: hold the "
                f"deadman to move; twists on '{self.resolve_topic_name('teleop/ee_twist')}'")
            if self.keyboard:
                self._start_keyboard()

        # ------------------------------------------------------------------------------ time
        def now(self) -> float:
            return self.get_clock().now().nanoseconds * 1e-9

        # ---------------------------------------------------------------------------- inputs
        def _on_joy(self, msg) -> None:
            s = self.layout.sample(msg.axes, msg.buttons)
            if self.layout.twist_topic:  # motion from the Twist (zero when it is stale), deadman from Joy
                fresh = self._twist_axes is not None and self.now() - self._twist_t <= self.cfg.input_timeout
                s = Sample(s.enable, s.turbo, self._twist_axes if fresh and s.enable else s.axes * 0.0,
                           s.pressed, problem=s.problem)
            self._input(s)

        def _on_twist_input(self, msg) -> None:
            lin, ang = msg.linear, msg.angular
            self._twist_axes = self.layout.twist_axes((lin.x, lin.y, lin.z), (ang.x, ang.y, ang.z))
            self._twist_t = self.now()

        def _input(self, s: Sample) -> None:
            with self.lock:
                step = self.core.on_input(s, self.now())
                self._do(step, immediate=True)

        def _on_safety_state(self, msg) -> None:
            with self.lock:
                self.safety_state = msg.data
                self._do(self.core.on_safety_state(msg.data), immediate=True)

        def _on_joint_state(self, msg) -> None:
            g = self.robot.gripper.joint
            if g in msg.name:
                i = list(msg.name).index(g)
                if i < len(msg.position) and math.isfinite(msg.position[i]):
                    self.finger = float(msg.position[i])

        def _on_tick(self) -> None:
            with self.lock:
                t = self.now()
                if self.keyboard:
                    self._do(self.core.on_input(self.kb.sample(t), t), immediate=False)
                self._do(self.core.tick(t), immediate=False)
                if self._resume_next <= t < self._resume_until and not self._resume_busy:
                    self._call("resume_policy")
                if self.keyboard:
                    self._show_status(t)

        # --------------------------------------------------------------------------- outputs
        def _do(self, step: Step, immediate: bool) -> None:
            if step.twist is not None:
                m = self._TS()
                m.header.stamp = self.get_clock().now().to_msg()
                m.header.frame_id = self.robot.base_link
                (m.twist.linear.x, m.twist.linear.y, m.twist.linear.z) = (float(v) for v in step.twist.linear)
                (m.twist.angular.x, m.twist.angular.y, m.twist.angular.z) = (float(v) for v in step.twist.angular)
                self.pub_twist.publish(m)
                if immediate:  # the next periodic twist one full period after this one
                    self.timer.reset()
                if step.twist.reason != "moving" and step.twist.reason != self._last_note:
                    self._last_note = step.twist.reason
                    self.get_logger().info(f"teleop: {step.twist.reason}")
            if step.engaged_now and step.gripper is None:
                self._resync_gripper()
            if step.gripper is not None:
                self.pub_gripper.publish(self._F(data=float(step.gripper)))
                self.last = "gripper " + ("open" if step.gripper > 0.5 else "close")
            for note in step.notes:
                self.last = note
                self.get_logger().info(f"teleop: {note}")
            for a in step.actions:
                if a == "estop":
                    self.pub_estop.publish(self._Empty())
                    self.last = "E-STOP sent"
                    self.get_logger().error("teleop: e-stop button: safety/estop sent (safety/reset releases)")
                elif a == "resume_policy":
                    self._resume_until = self.now() + self.cfg.resume_retry
                    self._resume_next = -math.inf
                    if not self._resume_busy:
                        self._call(a)
                else:
                    self._call(a)

        def _resync_gripper(self) -> None:
            """A new teleop session: the servo still holds the gripper command of the last session; send the
            measured finger so taking over does not move the gripper (after the first twist: see docs)."""
            if self.core.gripper is None or self.finger is None:
                return
            g = self.robot.gripper.to_normalized(self.finger)
            if abs(g - self.core.gripper) > 0.02:
                self.core.gripper = g
                self.pub_gripper.publish(self._F(data=float(g)))

        def _call(self, action: str) -> None:
            srv = SERVICES[action]
            cli = self.clients_[action]
            if not cli.service_is_ready():
                self.last = f"{srv}: not available"
                self.get_logger().warning(f"teleop: {srv} is not available (is the "
                                          f"{'safety' if action == 'resume_policy' else 'recorder'} node running?)")
                if action == "resume_policy":
                    self._resume_until = -math.inf
                return
            if action == "resume_policy":
                self._resume_busy = True
            fut = cli.call_async(self._Trigger.Request())
            fut.add_done_callback(lambda f: self._on_result(action, f))

        def _on_result(self, action: str, fut) -> None:
            srv = SERVICES[action]
            with self.lock:
                try:
                    r = fut.result()
                    ok, msg = bool(r.success), r.message
                except Exception as e:  # noqa: BLE001 - a failed call is reported, never fatal
                    ok, msg = False, f"{type(e).__name__}: {e}"
                if action == "resume_policy":
                    self._resume_busy = False
                    if not ok and self.now() + 0.2 < self._resume_until:
                        # refused (the safety node still sees teleop as fresh, for its command_timeout after
                        # the last teleop command): retry until resume_retry is over, then report the reason
                        self._resume_next = self.now() + 0.2
                        self.last = f"hand-back: waiting ({msg})"
                        return
                    self._resume_until = -math.inf
                self.last = f"{srv}: {'ok' if ok else 'refused'}{': ' + msg if msg else ''}"
                if ok:
                    self.get_logger().info(f"teleop: {self.last}")
                else:
                    self.get_logger().warning(f"teleop: {self.last}")

        def _publish_diagnostics(self) -> None:
            with self.lock:
                c = self.core
                age = self.now() - c.last_input_t
                bad = bool(c.problem) or (not self.keyboard and not math.isfinite(age)) or c.reason == "input stale"
                vals = {"device": self.device_name,
                        "engaged": c.engaged, "turbo": c.turbo, "reason": c.reason,
                        "input_age_s": f"{age:.2f}" if math.isfinite(age) else "never",
                        "twists": c.published, "last_button": self.last,
                        "joy_publishers": self.sub_joy.get_publisher_count() if self.sub_joy else 0,
                        "twist_subscribers": self.pub_twist.get_subscription_count()}
                msg = c.problem or ("moving" if c.engaged else c.reason)
            self.pub_diag.publish(diagnostic_array(self.get_clock().now().to_msg(), "magma_ros: teleop",
                                                   1 if bad else 0, msg, vals, hardware_id=self.robot.name))

        # -------------------------------------------------------------------------- keyboard
        def _start_keyboard(self) -> None:
            import termios
            import tty

            fd = sys.stdin.fileno()
            self._term = (fd, termios.tcgetattr(fd))
            tty.setcbreak(fd)  # keys one by one, no echo; Ctrl-C still raises SIGINT
            self.kb = KeyboardInput(self.layout)
            self.decoder = KeyDecoder()
            lay = self.layout
            motion = "  ".join(f"{a}:{k[0]}/{k[1]}" for a, k in {**lay.keys_linear, **lay.keys_angular}.items())
            acts = "  ".join(f"{k}:{a}" for a, k in lay.keys.items())
            print(f"teleop keyboard: hold a key to move (Shift = turbo), space = stop\r\n  {motion}\r\n  {acts}"
                  "\r\n  Ctrl-C quits\r", flush=True)
            self._reader = threading.Thread(target=self._read_keys, daemon=True, name="teleop-keyboard")
            self._reader.start()

        def _read_keys(self) -> None:
            fd = sys.stdin.fileno()
            while not self._stop.is_set():
                try:
                    ready, _, _ = select.select([fd], [], [], 0.1)
                    if not ready:
                        continue
                    data = os.read(fd, 64)
                except (OSError, ValueError):
                    return
                if not data:  # end of input: stop moving, keep running (Ctrl-C quits)
                    with self.lock:
                        self.kb.on_key(self.layout.stop_key, self.now())
                    return
                for key in self.decoder.feed(data.decode(errors="ignore")):
                    with self.lock:
                        t = self.now()
                        self.kb.on_key(key, t)
                        self._do(self.core.on_input(self.kb.sample(t), t), immediate=True)
                        self._show_status(t)

        def _show_status(self, t: float) -> None:
            line = status_line(self.device_name, self.core, self.safety_state, self.safety_source, self.recorder_state,
                               self.last)
            if line == self._status_shown and t - self._status_t < self.cfg.status_period:
                return
            self._status_shown, self._status_t = line, t
            width = shutil.get_terminal_size((160, 24)).columns - 1
            sys.stdout.write("\r\x1b[K" + line[:width])
            sys.stdout.flush()

        def close(self) -> None:
            """Stop the keyboard reader and give the terminal back as it was."""
            self._stop.set()
            if self._reader is not None:
                self._reader.join(1.0)
            if self._term is not None:
                import termios

                fd, attrs = self._term
                self._term = None
                termios.tcsetattr(fd, termios.TCSADRAIN, attrs)
                sys.stdout.write("\r\n")
                sys.stdout.flush()

    return TeleopNode()


def main(args=None) -> int:
    """Console entry point (``magma_ros_teleop``)."""
    return run_node(make_node, args=args)


if __name__ == "__main__":
    raise SystemExit(main())
