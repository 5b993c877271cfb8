"""Recorder node: episodes of the running graph -> a LeRobot v3.0 dataset + one MCAP bag per episode.

    python -m magma_ros.nodes.recorder --ros-args -p robot:=fr3 -p out:=/data/session1 [-p resume:=true]

Services (std_srvs/Trigger): ``recorder/start``, ``recorder/stop`` (finish and save: the episode is
durable on disk when the reply comes), ``recorder/discard`` (drop the episode being recorded).
Out: ``recorder/state`` (String, reliable + transient local: ``idle``/``recording``/``error`` with the
episode number, frames and elapsed time), ``diagnostics``, and a live status line on a terminal.

Frames are taken at ``fps`` on the camera's clock (one per ``1/fps`` of image stamps: every image of a
camera running at ``fps``, every n-th of a faster one) with the newest joint states, the command the
safety node sent to the controller (by ``controller``: jtc
``<arm_controller>/joint_trajectory``, forward ``<forward_controller>/commands``, isaac
``joint_command``; gripper ``<gripper_controller>/joint_trajectory``), ``safety/source`` and the teleop
intent (``teleop/ee_twist``, ``teleop/gripper``); features in :mod:`magma_ros.data.episode`. The MCAP bag
holds every message of the recorded topics while an episode runs. Writing happens on worker threads;
a write error (disk full, unwritable path) ends the episode with one error line naming the path; the
robot never depends on this node. See docs/recording.md.
"""

from __future__ import annotations

import sys

import numpy as np

from magma_ros.core.errors import ConfigError
from magma_ros.data.session import RecorderConfig, RecorderCore
from magma_ros.nodes._common import declare_config, diagnostic_array, run_node, to_seconds


def make_node():
    """Build the recorder node (imports rclpy lazily)."""
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TwistStamped
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import CameraInfo, Image, JointState, Joy
    from std_msgs.msg import Float64, Float64MultiArray, String
    from std_srvs.srv import Trigger
    from trajectory_msgs.msg import JointTrajectory
    from visualization_msgs.msg import MarkerArray

    from magma_ros.core.kinematics import Kinematics
    from magma_ros.core.robot import load_robot
    from magma_ros.data.episode import SOURCES, Sample, pose_to_vector
    from magma_ros.nodes.policy import image_to_rgb

    latched = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)

    class RecorderNode(Node):
        """ROS shell of :class:`RecorderCore`: subscriptions, frames on image arrival, services, state."""

        def __init__(self):
            super().__init__("recorder")
            self.cfg: RecorderConfig = declare_config(self, RecorderConfig)
            self.robot = r = load_robot(self.cfg.robot)
            self.kin = Kinematics(r)
            self.core = RecorderCore(self.cfg, list(r.arm_joints), r.name)
            self.tty = sys.stdout.isatty()
            # newest values (written by the message callbacks, read when an image makes a frame)
            self.image = None  # (rgb, t_received) of the newest image
            self.q_t = -1e9  # [s] node time of the newest joint state
            self.last_frame_stamp = None  # image stamp [s] of the last recorded frame
            self.q = None  # arm joint positions (dof,)
            self.finger = None  # measured finger position [m]
            self.cmd_q = None  # last arm command sent to the controller
            self.cmd_grip = None  # last gripper command [m]
            self.source = "hold"
            self.teleop_twist = np.zeros(6)
            self.teleop_twist_t = -1e9
            self.teleop_grip = None
            self._bad_image = ""

            data = MutuallyExclusiveCallbackGroup()  # message callbacks one at a time: no locks on the state
            rec = ReentrantCallbackGroup()
            self.pub_state = self.create_publisher(String, "recorder/state", latched)
            self.pub_diag = self.create_publisher(DiagnosticArray, "diagnostics", 10)
            img_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            cmd_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)  # 1 s of 100 Hz commands: a
            #                                                                     stalled recorder loses none
            c = self.cfg
            subs = [  # (type, topic, qos, handler)
                (Image, c.image_topic, img_qos, self._on_image),
                (JointState, r.joint_states_topic, qos_profile_sensor_data, self._on_joint_state),
                (String, "safety/source", latched, self._on_source),
                (String, "safety/state", latched, None),
                (JointTrajectory, "magma/joint_command", cmd_qos, None),
                (JointTrajectory, "teleop/joint_command", cmd_qos, None),
                (TwistStamped, "magma/ee_twist", cmd_qos, None),
                (Float64, "magma/gripper", cmd_qos, None),
                (TwistStamped, "teleop/ee_twist", cmd_qos, self._on_teleop_twist),
                (Float64, "teleop/gripper", cmd_qos, self._on_teleop_gripper),
                (MarkerArray, "magma/tom", cmd_qos, None),
                (String, "magma/instruction", latched, self._on_instruction),
                (Joy, "joy", cmd_qos, None),
                (CameraInfo, c.image_topic.rsplit("/", 1)[0] + "/camera_info", img_qos, None),
            ]
            if c.controller == "jtc":
                cmd_topic = f"{r.arm_controller}/joint_trajectory"
                subs.append((JointTrajectory, cmd_topic, cmd_qos, self._on_arm_jtc))
            elif c.controller == "forward":
                cmd_topic = f"{r.forward_controller}/commands"
                subs.append((Float64MultiArray, cmd_topic, cmd_qos, self._on_arm_forward))
            else:
                cmd_topic = "joint_command"
                subs.append((JointState, cmd_topic, cmd_qos, self._on_arm_isaac))
            if c.controller != "isaac":
                subs.append((JointTrajectory, f"{r.gripper_controller}/joint_trajectory", cmd_qos,
                             self._on_gripper_cmd))
            if c.depth_topic:
                subs.append((Image, c.depth_topic, img_qos, None))
            self.subs = []
            self._latched: dict[str, object] = {}  # latched topic -> last message (re-recorded at each start)
            for typ, topic, qos, handler in subs:
                name = self.resolve_topic_name(topic)
                self.subs.append(self.create_subscription(typ, topic, self._recorded(name, handler, qos is latched),
                                                          qos, callback_group=data))
            self.create_service(Trigger, "recorder/start", self._srv(self._start), callback_group=rec)
            self.create_service(Trigger, "recorder/stop", self._srv(self.core.stop), callback_group=rec)
            self.create_service(Trigger, "recorder/discard", self._srv(self.core.discard), callback_group=rec)
            self.create_timer(c.status_period, self._status, callback_group=rec)
            try:
                self.core.open()
            except Exception as e:  # noqa: BLE001 - reported; start retries and says why
                if isinstance(e, ConfigError):
                    raise
                self.core.error = f"recording unavailable: {str(e).splitlines()[0]}"
                self.get_logger().error(self.core.error)
            for s in self.core.recovered:
                if s.state == "recording":
                    self.get_logger().warning(
                        f"episode {s.episode_index} of an earlier session is INCOMPLETE (killed while recording, "
                        f"{s.frames} frames staged): not in the dataset, kept in {s.path}")
                else:
                    self.get_logger().info(f"recovered episode {s.episode_index} ({s.state}) into the dataset")
            self._last_state = ""
            self._status()
            self.get_logger().info(
                f"recorder: dataset {self.core.root} ({self.core.episode} episodes), "
                f"{'bags in ' + str(self.core.mcap_dir) if c.mcap else 'no bags'}, {c.fps} fps, step_period "
                f"{c.step_period} s, command from '{self.resolve_topic_name(cmd_topic)}'")

        def now(self) -> float:
            return self.get_clock().now().nanoseconds * 1e-9

        # ----------------------------------------------------------------------- inputs
        def _start(self):
            ok, msg = self.core.start(None, self.now())
            if ok:  # the state of latched topics at the start belongs to the episode
                t = self.get_clock().now().nanoseconds
                for topic, m in list(self._latched.items()):
                    self.core.record_message(topic, m, t)
            return ok, msg

        def _recorded(self, topic: str, handler, latched_topic: bool):
            def cb(msg):
                if latched_topic:
                    self._latched[topic] = msg
                if self.core.bag is not None:
                    self.core.record_message(topic, msg, self.get_clock().now().nanoseconds)
                if handler is not None:
                    handler(msg)
            return cb

        def _on_image(self, msg) -> None:
            try:
                rgb = image_to_rgb(msg)
            except ValueError as e:
                if str(e) != self._bad_image:
                    self._bad_image = str(e)
                    self.get_logger().error(f"image ignored: {e}")
                return
            self.image = (rgb, self.now())
            stamp = to_seconds(msg.header.stamp)
            if not self.core.recording:
                self.last_frame_stamp = None
                return
            # the frame clock is the camera's: one frame per 1/fps of image stamps (every image of a
            # camera at fps; every n-th of a faster one), so a busy machine delays frames, never drops them
            period = 1.0 / self.cfg.fps
            if self.last_frame_stamp is not None and stamp - self.last_frame_stamp < 0.75 * period:
                return
            if self.last_frame_stamp is not None and stamp - self.last_frame_stamp > 1.5 * period:
                self.core.gaps += 1
            self.last_frame_stamp = stamp if self.last_frame_stamp is None or stamp - self.last_frame_stamp > \
                2 * period else self.last_frame_stamp + period
            self._frame(rgb, stamp)

        def _on_joint_state(self, msg) -> None:
            pos = dict(zip(msg.name, msg.position))
            try:
                self.q = np.array([pos[n] for n in self.robot.arm_joints])
            except KeyError:
                return
            self.q_t = self.now()
            g = pos.get(self.robot.gripper.joint)
            if g is not None:
                self.finger = float(g)

        def _on_source(self, msg) -> None:
            self.source = msg.data

        def _on_instruction(self, msg) -> None:
            self.core.task = msg.data.strip()

        def _on_teleop_twist(self, msg) -> None:
            t = msg.twist
            self.teleop_twist = np.array([t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z])
            self.teleop_twist_t = self.now()

        def _on_teleop_gripper(self, msg) -> None:
            self.teleop_grip = float(msg.data)

        def _set_cmd(self, names, positions) -> None:
            pos = dict(zip(names, positions))
            if all(n in pos for n in self.robot.arm_joints):
                self.cmd_q = np.array([pos[n] for n in self.robot.arm_joints], dtype=float)
            g = pos.get(self.robot.gripper.joint)
            if g is not None:
                self.cmd_grip = float(g)

        def _on_arm_jtc(self, msg) -> None:
            if msg.points:
                self._set_cmd(msg.joint_names, msg.points[0].positions)

        def _on_arm_forward(self, msg) -> None:
            if len(msg.data) == self.robot.dof:
                self.cmd_q = np.array(msg.data, dtype=float)

        def _on_arm_isaac(self, msg) -> None:
            self._set_cmd(msg.name, msg.position)

        def _on_gripper_cmd(self, msg) -> None:
            if msg.points and msg.points[0].positions:
                self._set_cmd(msg.joint_names, msg.points[0].positions)

        # ----------------------------------------------------------------------- frames
        def _frame(self, rgb, stamp: float) -> None:
            core = self.core
            now = self.now()
            if self.q is None or now - self.q_t > self.cfg.state_timeout:
                core.skipped += 1  # no fresh joint state for this image
                return
            if rgb.shape[:2] != (self.cfg.height, self.cfg.width):
                core._fail(ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]}, the recorder expects "
                                      f"{self.cfg.width}x{self.cfg.height} (set width/height)"))
                self.get_logger().error(core.error)
                return
            g = self.robot.gripper
            grip = g.to_normalized(self.finger) if self.finger is not None else 1.0
            cmd_q = self.cmd_q if self.cmd_q is not None else self.q
            cmd_g = g.to_normalized(self.cmd_grip) if self.cmd_grip is not None else grip
            pose = self.kin.fk(self.q)
            fresh = now - self.teleop_twist_t <= 2.0 / self.cfg.fps
            intent = np.concatenate([self.teleop_twist if fresh else np.zeros(6),
                                     [self.teleop_grip if self.teleop_grip is not None else cmd_g]])
            src = SOURCES.get(self.source, 0)
            values = {f"observation.images.{self.cfg.camera}": rgb,
                      "observation.state": np.append(self.q, grip).astype(np.float32),
                      "observation.ee_pose": pose_to_vector(pose).astype(np.float32),
                      "action.joints": np.append(cmd_q, cmd_g).astype(np.float32),
                      "teleop.intent": intent.astype(np.float32),
                      "safety.source": src, "intervention": src == SOURCES["teleop"],
                      "observation.stamp": stamp}
            core.add(Sample(values, pose, cmd_g))
            if core.error:
                self.get_logger().error(core.error)
                self._status()

        # ----------------------------------------------------------------------- services / state
        def _srv(self, fn):
            def handle(_req, resp):
                try:
                    resp.success, resp.message = fn()
                except Exception as e:  # noqa: BLE001 - a bug here must not take the node down
                    resp.success, resp.message = False, f"internal error: {type(e).__name__}: {e}"
                if resp.success:
                    self.get_logger().info(resp.message)
                else:
                    self.get_logger().warning(resp.message)
                self._status()
                return resp
            return handle

        def _status(self) -> None:
            core = self.core
            now = self.now()
            text = core.state_text(now)
            state = "recording" if core.recording else ("error" if core.error else "idle")
            key = (state, core.episode, core.error)
            if key != self._last_state or core.recording:
                self._last_state = key
                self.pub_state.publish(String(data=text))
            if self.tty:
                sys.stdout.write("\r\x1b[2K[recorder] " + text[:200])
                sys.stdout.flush()
            level = 2 if core.error else 0
            self.pub_diag.publish(diagnostic_array(
                self.get_clock().now().to_msg(), "magma_ros: recorder", level, text,
                {"state": state, "episode": core.episode, "frames": core.frames,
                 "elapsed_s": f"{now - core.t_start:.1f}" if core.recording else "0.0",
                 "skipped_images": core.skipped, "frame_gaps": core.gaps, "dataset": str(core.root), "task": core.task,
                 "image": "yes" if self.image is not None else "no",
                 "joint_states": "yes" if self.q is not None else "no",
                 "controller_commands": "yes" if self.cmd_q is not None else "no"},
                hardware_id=self.robot.name))

        def close(self) -> None:
            ok, msg = self.core.stop() if self.core.recording else (True, "")
            if msg:
                self.get_logger().info(f"shutdown: {msg}")
            if self.tty:
                sys.stdout.write("\n")

    return RecorderNode()


def main(args=None) -> int:
    """Console entry point (``magma_ros_recorder``)."""
    return run_node(make_node, args=args, threads=4)


if __name__ == "__main__":
    raise SystemExit(main())
