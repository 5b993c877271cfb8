"""Sim node: the MuJoCo arm (magma_ros.sim.ArmSim) behind the same topics as the real arm.

    python -m magma_ros.nodes.sim --ros-args -p robot:=fr3 -p controller:=jtc

Publishes (relative names):
  /clock                       rosgraph_msgs/Clock, sim time (other nodes run with use_sim_time)
  <robot.joint_states_topic>   sensor_msgs/JointState: arm joints + finger joint (+ its mimic)
  camera/camera/color/image_raw, .../color/camera_info, .../aligned_depth_to_color/image_raw
                               rgb8 / 16UC1 mm, stamped with sim time (see nodes/camera.py)
  diagnostics                  real-time factor, sim time, rejected commands
  /tf, /tf_static              robot links and camera, only when tf2_msgs is importable
Accepts, by ``controller`` (exactly what the safety node emits):
  jtc      <arm_controller>/joint_trajectory      trajectory_msgs/JointTrajectory (by joint name)
  forward  <forward_controller>/commands          std_msgs/Float64MultiArray (arm_joints order)
  isaac    joint_command                          sensor_msgs/JointState (by name; may include the finger)
  always   <gripper_controller>/joint_trajectory  JointTrajectory of the finger joint [m]
The arm starts at the robot YAML's ``sim_start`` (default: ``home``; the WidowX starts in SimplerEnv's
Bridge pose, not at its singular all-zeros home).
Service ``reset`` (std_srvs/Trigger): arm back to that start pose, objects back; the clock keeps running
forward.

Trajectories are followed like ros2_control's JTC: ``time_from_start`` counts from the header stamp
when it is on this clock (within ``STAMP_WINDOW`` of the sim time; points already past are skipped,
the path starts from the current setpoint), else from receipt (a zero stamp, or a publisher on
another clock, which must not stall the arm).
Malformed commands are logged (throttled) and ignored.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from magma_ros.core.errors import ConfigError, choose
from magma_ros.core.robot import load_robot
from magma_ros.nodes._common import declare_config, diagnostic_array, run_node, to_seconds, to_time_msg
from magma_ros.nodes.camera import CameraPublisher, transform_msg

CONTROLLERS = ("jtc", "forward", "isaac")
ISAAC_TOPIC = "joint_command"
STAMP_WINDOW = 0.5  # [s] a JointTrajectory stamp this close to the sim clock times its points (JTC)


def stamped_times(times: np.ndarray, stamp: float, now: float) -> np.ndarray:
    """``time_from_start`` of a JointTrajectory as times after ``now`` [s], as ros2_control's JTC does:
    counted from the header ``stamp`` when it is on this clock (non-zero, within ``STAMP_WINDOW`` of
    ``now``), else from receipt. Points at or before ``now`` come out <= 0 (already past)."""
    times = np.asarray(times, dtype=float)
    if stamp > 0.0 and abs(stamp - now) <= STAMP_WINDOW:
        return times + (stamp - now)
    return times


@dataclass(frozen=True)
class SimNodeConfig:
    """Parameters of the sim node (defaults from config/sim/mujoco.yaml where it sets them)."""

    robot: str = "fr3"  # fr3 | panda | wx250s
    controller: str = "jtc"  # jtc | forward | isaac: which arm command topic is listened to
    camera: str = ""  # config/cameras/<name>.yaml; "" = sim_<robot>
    sim_config: str = ""  # path of the physics/scene YAML; "" = config/sim/mujoco.yaml
    timestep: float = 0.0  # [s] physics step; 0 = from sim_config (0.002)
    real_time_factor: float = 1.0  # 1 = real time; 0 = as fast as possible
    camera_fps: float = 10.0  # [Hz, sim time] images; 0 = no rendering
    render_sync: bool = True  # true: physics waits for a busy renderer (images exactly at camera_fps in
    # sim time); false: frames are dropped instead (physics closer to real time, fewer images)
    width: int = 640  # [px]
    height: int = 480  # [px]
    joint_state_rate: float = 100.0  # [Hz, sim time]
    # [Hz, sim time] every use_sim_time node handles each /clock message in Python (~0.3-0.9 ms here);
    # their timers cannot fire more often than this (the safety output at 100 Hz needs 100)
    clock_rate: float = 100.0
    tf_rate: float = 30.0  # [Hz, sim time] robot link transforms (when tf2_msgs is importable)
    report_period: float = 5.0  # [s wall] real-time factor in the log and on diagnostics
    max_lag: float = 0.2  # [s] when physics falls this far behind real time it stops catching up

    def __post_init__(self):
        choose(self.controller, CONTROLLERS, "controller")
        if self.width <= 0 or self.height <= 0:
            raise ConfigError(f"sim: width/height must be positive, got {self.width}x{self.height}")
        for k in ("real_time_factor", "camera_fps", "timestep"):
            if getattr(self, k) < 0:
                raise ConfigError(f"sim: {k} must be >= 0")
        for k in ("joint_state_rate", "clock_rate", "report_period", "max_lag"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"sim: {k} must be > 0")


class _Throttle:
    """Log at most once per ``period`` seconds per key."""

    def __init__(self, log, period: float = 2.0):
        self.log, self.period, self.last = log, period, {}

    def __call__(self, key: str, msg: str) -> None:
        now = time.monotonic()
        if now - self.last.get(key, -1e9) >= self.period:
            self.last[key] = now
            self.log(msg)


def _make_node():
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray
    from std_srvs.srv import Trigger
    from trajectory_msgs.msg import JointTrajectory

    from magma_ros.sim import ensure_gl_backend

    ensure_gl_backend()
    from magma_ros.sim.arm import ArmSim
    from magma_ros.sim.follower import TrajectoryFollower
    from magma_ros.sim.scene import load_sim_config

    class SimNode(Node):
        """Thin shell: a physics thread steps ArmSim and publishes; callbacks set the setpoints."""

        def __init__(self):
            super().__init__("sim")
            self.cfg = declare_config(self, SimNodeConfig)
            self.robot = load_robot(self.cfg.robot)
            sim_cfg = load_sim_config(self.cfg.sim_config or None)
            if self.cfg.timestep > 0:
                from dataclasses import replace

                sim_cfg = replace(sim_cfg, timestep=self.cfg.timestep)
            self.sim = ArmSim(self.robot, camera=self.cfg.camera or None, width=self.cfg.width,
                              height=self.cfg.height, config=sim_cfg)
            r = self.robot
            self.start_q = r.start  # robot YAML sim_start (the WidowX: not its singular home), else home
            self.sim.reset(self.start_q)
            self.lock = threading.Lock()
            self.clock_base = 0.0  # sim clock = clock_base + sim.time (monotonic across resets)
            self.arm = TrajectoryFollower(self.start_q)
            self.finger = TrajectoryFollower([r.gripper.open])
            self.rejected = 0
            self.warn = _Throttle(self.get_logger().warn)
            self.names = list(r.arm_joints)
            self.index = {n: i for i, n in enumerate(self.names)}

            self.pub_clock = self.create_publisher(Clock, "/clock", 10)
            self.pub_js = self.create_publisher(JointState, r.joint_states_topic, 10)
            self.pub_diag = self.create_publisher(DiagnosticArray, "diagnostics", 10)
            self.cam_pub = CameraPublisher(self) if self.cfg.camera_fps > 0 else None
            self._tf = _TfPublisher(self, self.sim)

            c = self.cfg.controller
            sub = self.create_subscription
            if c == "jtc":
                self._arm_sub = sub(JointTrajectory, f"{r.arm_controller}/joint_trajectory", self._on_jtc, 10)
            elif c == "forward":
                self._arm_sub = sub(Float64MultiArray, f"{r.forward_controller}/commands", self._on_forward, 10)
            else:
                self._arm_sub = sub(JointState, ISAAC_TOPIC, self._on_isaac, 10)
            sub(JointTrajectory, f"{r.gripper_controller}/joint_trajectory", self._on_gripper, 10)
            self.create_service(Trigger, "reset", self._on_reset)
            self._JointState, self._Clock = JointState, Clock

            self._stop = threading.Event()
            # rendering runs in its own thread on a snapshot, so physics keeps stepping meanwhile
            self.frames = self.dropped_frames = 0
            self.unwatched_frames = 0  # frame times with no subscriber to colour or depth (not rendered)
            self._render_depth = True
            self._snap = self.sim.snapshot()
            self._snap_t = 0.0
            self._render_req = threading.Event()
            self._render_idle = threading.Event()
            self._render_idle.set()
            self._threads = [threading.Thread(target=self._run, name="physics", daemon=True)]
            if self.cam_pub is not None:
                self._threads.append(threading.Thread(target=self._render_loop, name="render", daemon=True))
            for th in self._threads:
                th.start()
            self.get_logger().info(
                f"sim: {r.name}, controller {c}, physics {1 / self.sim.timestep:.0f} Hz, camera "
                f"{self.cfg.width}x{self.cfg.height}@{self.cfg.camera_fps:g} Hz, real-time factor target "
                f"{self.cfg.real_time_factor:g}")

        # -- commands (executor threads) ------------------------------------------------------
        def now(self) -> float:
            return self.clock_base + self.sim.time

        def _reject(self, what: str, why: str) -> None:
            self.rejected += 1
            self.warn(what, f"sim: ignoring {what} command: {why}")

        def _on_jtc(self, msg) -> None:
            try:
                cols = [self.index[n] for n in msg.joint_names]
            except KeyError as e:
                return self._reject("jtc", f"unknown joint {e}; expected {self.names}")
            if not cols or len(set(cols)) != len(cols):
                return self._reject("jtc", "empty or duplicate joint_names")
            try:
                times, P, V = _points(msg, len(cols))
                mask = np.zeros(self.robot.dof, bool)
                mask[cols] = True
                order = np.argsort(cols)  # columns in arm_joints order for the mask
                stamp = to_seconds(msg.header.stamp)
                with self.lock:
                    t = self.now()
                    rel = stamped_times(times, stamp, t)
                    keep = rel > 0.0
                    P, V = P[:, order], None if V is None else V[:, order]
                    if keep.any():
                        self.arm.set_trajectory(t, rel[keep], P[keep], None if V is None else V[keep], mask)
                    else:  # every point already past: the controller is at the end of it
                        q, _ = self.arm.sample(t)
                        q[mask] = P[-1]
                        self.arm.hold(q, t)
            except ValueError as e:
                self._reject("jtc", str(e))

        def _on_forward(self, msg) -> None:
            q = np.asarray(msg.data, dtype=float)
            if q.shape != (self.robot.dof,) or not np.all(np.isfinite(q)):
                got = list(msg.data)[:9]
                return self._reject("forward", f"need {self.robot.dof} finite values, got {got}")
            with self.lock:
                self.arm.hold(q, self.now())

        def _on_isaac(self, msg) -> None:
            if len(msg.position) != len(msg.name):
                return self._reject("isaac", f"{len(msg.name)} names but {len(msg.position)} positions")
            arm, finger = {}, None
            for n, p in zip(msg.name, msg.position):
                if n in self.index:
                    arm[n] = p
                elif n == self.robot.gripper.joint:
                    finger = p
                elif n not in self.robot.gripper.mimic_joints:
                    return self._reject("isaac", f"unknown joint '{n}'")
            vals = list(arm.values()) + ([finger] if finger is not None else [])
            if not vals or not np.all(np.isfinite(vals)):
                return self._reject("isaac", "no known joints or NaN/inf")
            with self.lock:
                t = self.now()
                if arm:
                    q, _ = self.arm.sample(t)
                    for n, p in arm.items():
                        q[self.index[n]] = p
                    self.arm.hold(q, t)
                if finger is not None:
                    self.finger.hold([finger], t)

        def _on_gripper(self, msg) -> None:
            g = self.robot.gripper
            names = list(msg.joint_names)
            if g.joint not in names:
                return self._reject("gripper", f"expected joint '{g.joint}', got {names}")
            try:
                times, P, V = _points(msg, len(names))
                c = names.index(g.joint)
                with self.lock:
                    self.finger.set_trajectory(self.now(), times, P[:, [c]], None if V is None else V[:, [c]])
            except ValueError as e:
                self._reject("gripper", str(e))

        def _on_reset(self, request, response):
            with self.lock:
                self.clock_base += self.sim.time
                self.sim.reset(self.start_q)
                self.arm.hold(self.start_q, self.now())
                self.finger.hold([self.robot.gripper.open], self.now())
            self.get_logger().info("sim: reset (arm at its start pose, objects back)")
            response.success, response.message = True, "reset"
            return response

        # -- physics thread -------------------------------------------------------------------
        def _run(self) -> None:
            try:
                self._loop()
            except Exception as e:  # noqa: BLE001 - report, do not die silently
                if not self._stop.is_set() and self.context.ok():  # at shutdown the context goes first
                    self.get_logger().error(f"sim: physics thread stopped: {type(e).__name__}: {e}")

        def _render_loop(self) -> None:
            try:
                while not self._stop.is_set():
                    if not self._render_req.wait(0.1):
                        continue
                    self._render_req.clear()
                    try:
                        color, depth = self.sim.render_rgbd(self._snap, depth=self._render_depth)
                        info = self.sim.camera_info()
                        self.cam_pub.publish(color, depth, info.K, np.zeros(5), to_time_msg(self._snap_t),
                                             info.frame_id)
                        self.frames += 1
                    finally:
                        self._render_idle.set()
            except Exception as e:  # noqa: BLE001
                if not self._stop.is_set() and self.context.ok():
                    self.get_logger().error(f"sim: render thread stopped: {type(e).__name__}: {e}")
            finally:
                self._render_idle.set()
                self.sim.close()  # the GL context belongs to this thread

        def _loop(self) -> None:
            cfg, dt = self.cfg, self.sim.timestep
            rtf = cfg.real_time_factor
            # joint states before the clock tick of the same instant: a use_sim_time node never sees
            # the clock ahead of the newest state it could have had
            periods = {"js": 1 / cfg.joint_state_rate, "clock": 1 / cfg.clock_rate,
                       "cam": 1 / cfg.camera_fps if cfg.camera_fps > 0 else None,
                       "tf": 1 / cfg.tf_rate if (cfg.tf_rate > 0 and self._tf.enabled) else None}
            due = {k: 0.0 for k in periods}
            anchor_wall, anchor_sim = time.monotonic(), self.now()
            report_wall, report_sim, report_steps = anchor_wall, anchor_sim, 0
            steps = 0
            while not self._stop.is_set():
                wall = time.monotonic()
                t = self.now()
                if rtf > 0:
                    target = anchor_sim + (wall - anchor_wall) * rtf
                    if target - t > cfg.max_lag:  # fell behind (rendering, load): do not burst to catch up
                        anchor_wall, anchor_sim = wall, t
                        target = t + dt
                else:
                    target = t + 50 * dt
                while self.now() < target - 1e-12 and not self._stop.is_set():
                    with self.lock:
                        t = self.now()
                        q, qd = self.arm.sample(t)
                        g, _ = self.finger.sample(t)
                        self.sim.set_targets(q, float(g[0]), qd)
                        self.sim.step(1)
                        t = self.now()
                    steps += 1
                    for k, p in periods.items():
                        if p is not None and t >= due[k] - 1e-9:
                            due[k] = max(due[k] + p, t + 0.5 * p) if due[k] else t + p
                            self._publish(k, t)
                if wall - report_wall >= cfg.report_period:
                    self._report(self.now() - report_sim, wall - report_wall, steps - report_steps)
                    report_wall, report_sim, report_steps = wall, self.now(), steps
                if rtf > 0:
                    ahead = (self.now() - anchor_sim) / rtf - (time.monotonic() - anchor_wall)
                    if ahead > 0:
                        self._stop.wait(min(ahead, 0.01))

        def _publish(self, what: str, t: float) -> None:
            stamp = to_time_msg(t)
            if what == "clock":
                self.pub_clock.publish(self._Clock(clock=stamp))
            elif what == "js":
                with self.lock:
                    names, pos, vel, eff = self.sim.joint_state()
                m = self._JointState()
                m.header.stamp = stamp
                m.name, m.position = names, pos.tolist()
                m.velocity, m.effort = vel.tolist(), eff.tolist()
                self.pub_js.publish(m)
            elif what == "cam" and self.cam_pub is not None:
                color, depth = self.cam_pub.wanted()
                if not (color or depth):  # nobody reads the camera: no frame to render
                    self.unwatched_frames += 1
                    return
                if not self._render_idle.is_set():
                    if not self.cfg.render_sync:
                        self.dropped_frames += 1
                        return
                    while not self._render_idle.wait(0.1):
                        if self._stop.is_set():
                            return
                with self.lock:
                    self.sim.snapshot(self._snap)
                self._snap_t = t
                self._render_depth = depth
                self._render_idle.clear()
                self._render_req.set()
            elif what == "tf":
                with self.lock:
                    self._tf.publish(stamp)

        def _report(self, sim_dt: float, wall_dt: float, steps: int) -> None:
            rtf = sim_dt / wall_dt if wall_dt > 0 else 0.0
            self.get_logger().info(f"sim: real-time factor {rtf:.2f} (sim {self.now():.1f} s, {steps} steps, "
                                   f"{self.frames} frames, {self.dropped_frames} dropped while rendering, "
                                   f"{self.rejected} rejected commands)")
            target = self.cfg.real_time_factor
            level = 0 if (target == 0 or rtf >= 0.8 * target) else 1
            now = self.now()
            self.pub_diag.publish(diagnostic_array(
                now, "sim", level, f"real-time factor {rtf:.2f}",
                {"real_time_factor": f"{rtf:.3f}", "sim_time": f"{now:.3f}", "frames": self.frames,
                 "dropped_frames": self.dropped_frames, "unwatched_frames": self.unwatched_frames,
                 "rejected_commands": self.rejected,
                 "command_publishers": self._arm_sub.get_publisher_count()},  # matched arm command writers
                hardware_id=f"mujoco/{self.robot.name}"))

        def close(self) -> None:
            self._stop.set()
            for th in self._threads:
                th.join(timeout=5.0)

    return SimNode()


def _points(msg, m: int):
    """(times (K,), positions (K, m), velocities (K, m) | None) of a JointTrajectory; ValueError if bad."""
    pts = msg.points
    if not pts:
        raise ValueError("no points")
    times = np.array([p.time_from_start.sec + 1e-9 * p.time_from_start.nanosec for p in pts])
    if any(len(p.positions) != m for p in pts):
        raise ValueError(f"every point needs {m} positions")
    P = np.array([list(p.positions) for p in pts], dtype=float).reshape(len(pts), m)
    V = None
    if all(len(p.velocities) == m for p in pts):
        V = np.array([list(p.velocities) for p in pts], dtype=float).reshape(len(pts), m)
    elif any(len(p.velocities) not in (0, m) for p in pts):
        raise ValueError("velocities must be empty or one per joint")
    return times, P, V


class _TfPublisher:
    """Robot link transforms from MuJoCo (parent link -> child link) and the static camera mount.

    Only active when tf2_msgs is importable (a real ROS 2 install); there are no wheels for it.
    """

    def __init__(self, node, sim):
        self.sim = sim
        self.enabled = False
        try:
            from tf2_msgs.msg import TFMessage
        except ImportError:
            node.get_logger().info("tf2_msgs not available: no /tf from the simulator")
            return
        from rclpy.qos import DurabilityPolicy, QoSProfile

        self.TFMessage = TFMessage
        self.pub = node.create_publisher(TFMessage, "/tf", 10)
        static = node.create_publisher(TFMessage, "/tf_static",
                                       QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self._static_pub = static
        self.links = robot_link_bodies(sim)
        cam = sim.camera
        T_link = cam.pose_link()
        stamp = node.get_clock().now().to_msg()
        T_link_opt = np.linalg.solve(T_link, cam.pose_optical())
        static.publish(TFMessage(transforms=[
            transform_msg(T_link, cam.parent_frame, cam.link_frame, stamp),
            transform_msg(T_link_opt, cam.link_frame, cam.optical_frame, stamp)]))
        self.enabled = True

    def publish(self, stamp) -> None:
        self.pub.publish(self.TFMessage(transforms=[transform_msg(T, p, c, stamp)
                                                    for p, c, T in link_transforms(self.sim, self.links)]))


def robot_link_bodies(sim) -> list[tuple[int, int]]:
    """(parent body, child body) for every robot link below the base (URDF link = MuJoCo body)."""
    m = sim.model
    base = sim.info.base_body
    objects = {m.jnt_bodyid[j] for j in range(m.njnt) if m.jnt_type[j] == 0}  # free bodies
    out = []
    for b in range(1, m.nbody):
        if b == base or b in objects:
            continue
        p = int(m.body_parentid[b])
        if p != 0:
            out.append((p, b))
    return out


def link_transforms(sim, pairs) -> list[tuple[str, str, np.ndarray]]:
    """(parent link, child link, 4x4 child pose in parent) for each (parent, child) body pair."""
    m = sim.model
    out = []
    for p, b in pairs:
        T = np.linalg.solve(sim.body_pose(p), sim.body_pose(b))
        out.append((m.body(p).name, m.body(b).name, T))
    return out


def main(args=None) -> int:
    """Entry point: ``python -m magma_ros.nodes.sim``."""
    return run_node(_make_node, args=args)


if __name__ == "__main__":
    raise SystemExit(main())
