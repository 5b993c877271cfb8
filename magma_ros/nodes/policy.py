"""Policy node: color image + instruction -> ``magma/ee_twist`` + ``magma/gripper`` (+ ToM plans).

A thin shell over :class:`magma_ros.core.policy_loop.PolicyLoop` (newest-frame mailbox, step
gating, staleness) and :class:`~magma_ros.core.policy_loop.TomWorker`. See docs/nodes.md.
Run: ``python -m magma_ros.nodes.policy --ros-args -p policy:=local -p model:=/path/to/Magma-8B``.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from magma_ros.core.errors import ConfigError, choose
from magma_ros.core.policy_loop import Frame, PolicyAction, PolicyLoop, ScriptedPolicy, TomResult, TomWorker
from magma_ros.nodes._common import diagnostic_array, to_seconds, to_time_msg

POLICIES = ("local", "remote", "scripted")
ACTION_SOURCES = ("actions", "tom")
IMAGE_TOPIC = "camera/camera/color/image_raw"
DEPTH_TOPIC = "camera/camera/aligned_depth_to_color/image_raw"
INFO_TOPIC = "camera/camera/color/camera_info"


@dataclass(frozen=True)
class PolicyNodeConfig:
    """Policy node parameters (same names as the ROS parameters)."""

    robot: str = "fr3"  # fr3 | panda | wx250s: the twist's frame_id is this robot's base link
    policy: str = "local"  # local (MagmaPolicy) | remote (RemotePolicy host:port) | scripted
    model: str = ""  # local: checkpoint directory or hub id (env MAGMA_MODEL when empty)
    stats: str = "bridge_orig"  # local: action statistics (bridge_orig, google_robot, or a JSON path)
    engine: str = "auto"  # local: generation engine passed to MagmaPolicy
    constrained: bool = False  # local: restrict generation to the 256 action tokens
    temperature: float = 0.0  # local: 0 = greedy; > 0 samples (Magma's evaluation: 0.7 with top_k 50)
    top_k: int = 50  # local, sampling: keep the k largest logits (0: all)
    seed: int = -1  # local, sampling: generator seed (-1: random)
    compile: str = ""  # local, fast engine: "" | default | reduce-overhead (CUDA graphs, GPU)
    quant: str = ""  # local, fast engine: "" | int8 | int4 (language-model weights)
    host: str = "127.0.0.1"  # remote: policy server
    port: int = 8765  # remote: policy server port
    token_file: str = ""  # remote: file holding the server's token ("": $MAGMA_ROS_TOKEN; never a parameter value)
    remote_timeout: float = 2.0  # [s] remote: per request; a later answer is dropped, nothing published (hold)
    tls: bool = False  # remote: wss:// (TLS)
    ca_file: str = ""  # remote, TLS: CA bundle or the server's self-signed certificate ("": system CAs)
    robot_id: str = ""  # remote: this arm's id on the server (per-arm state); "": the node's namespace
    scripted_actions: str = ""  # scripted: "dx,dy,dz,droll,dpitch,dyaw,grip; ..." (7 numbers per action)
    scripted_loop: bool = False  # scripted: start over when the list ends (else hold: "script finished")
    step_period: float = 0.0  # [s] one action per step; 0 = the policy's (statistics) or 0.2 s scripted
    image_timeout: float = 0.5  # [s] frames older than this (node clock) are not acted on
    # image subscription reliability, depth 1 either way (newest frame only). "reliable" matches
    # realsense2_camera's default and the sim; Fast DDS drops most large frames to a best-effort
    # reader. Use "best_effort" for cameras that publish with the sensor-data QoS.
    image_qos: str = "reliable"
    instruction: str = ""  # initial instruction (magma/instruction overrides it)
    device: str = ""  # local: "cuda", "cuda:1", "cpu"; "" = GPU when present, else CPU
    # torch intra-op threads (torch.set_num_threads); 0 = torch's default (one per core). Beside the sim,
    # servo and safety processes on a small CPU host, more than 1 makes OpenMP workers wait for cores
    # (measured on 2 shared cores: 1 thread 59 ms CPU per tiny step, 2 threads 625 ms)
    torch_threads: int = 1
    # [s] Python's interpreter-lock switch interval (sys.setswitchinterval; 0 = Python's 5 ms). A ToM or
    # question thread in this process holds the lock between torch ops for up to this long each time
    # the action thread wants it back (measured: fr3 demo with ToM at 0.5 Hz, 4.48 Hz at 5 ms)
    switch_interval: float = 0.0005
    tom_rate: float = 0.0  # [Hz] Trace-of-Mark plans (local policy only); 0 = off
    tom_marks: int = 10  # marks placed per ToM plan
    tom_max_tokens: int = 256  # ToM answer length cap (tokens); bounds one plan's cost
    tom_max_duty: float = 0.25  # at most this fraction of wall time goes to ToM plans (they compete with
    #                             the action loop for cores and the interpreter lock); 1 = no cap
    # the second instance (ToM, questions) pauses between its tokens while an action is inferred
    # (measured: fr3 demo with ToM at 0.5 Hz, 4.74-4.98 Hz without, docs/performance.md)
    side_yields: bool = True
    tom_shared: bool = False  # False: ToM gets its own model instance (never waits for/blocks actions;
    #                           twice the memory); True: share the action model, plans start only
    #                           while the action loop is idle and the last plan fits in the slack
    # ToM in 3-D (docs/policy.md): traces back-projected with the aligned depth image + camera_info and
    # the camera extrinsic -> magma/tom/path (the gripper mark's trace) and magma/tom/markers_3d
    tom_3d: bool = True  # needs depth on camera/camera/aligned_depth_to_color/image_raw (16UC1 mm)
    camera: str = ""  # config/cameras/<name>.yaml: extrinsic (fixed or eye-in-hand); "" = sim_<robot>
    tom_depth_window: int = 3  # [px] a depth hole is filled from the nearest valid pixel within +-this
    tom_depth_max: float = 6.0  # [m] farther readings count as holes
    tom_gripper_mark: bool = True  # mark 1 sits on the gripper (the TCP projected into the image)
    tom_path_min_z: float = 0.01  # [m] base frame: path points below this are raised to it (table clearance)
    # the gripper mark's trace: "interpolate" = from the TCP (kinematics) through free space to the surface
    # its last point sees (camera depth interpolated along the trace); "surface" = every point on the
    # surface seen at its pixel (as the other marks)
    tom_gripper_depth: str = "interpolate"
    # action source: "actions" = Magma's 7-DoF action tokens; "tom" = follow the gripper mark's 3-D trace
    # as a Cartesian path (core/path_follow.py; tom_follow_* parameters), through the same servo + safety
    action_source: str = "actions"
    # questions about the scene: magma/ask -> magma/answer (local policy only)
    ask_frames: int = 1  # frames per question by default (1 = newest; "[frames=N] ..." per question)
    ask_frame_spacing: float = 0.5  # [s] image time between the frames kept for clips
    ask_buffer: int = 32  # frames kept for clips (a clip samples N of them uniformly)
    ask_max_tokens: int = 128  # answer length cap
    ask_queue: int = 4  # questions waiting at most; more are refused with a reason
    ask_shared: bool = False  # False: questions use a side model instance (shared with ToM), never the
    #                           action model; True: the action model, only while it is idle (as tom_shared)
    diagnostics_period: float = 1.0  # [s] diagnostics publication period
    # act only while something subscribes to magma/ee_twist (the servo): a twist published before
    # DDS has matched the servo is lost. False for consumers that do not show up as subscribers.
    require_subscriber: bool = True


def image_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB without cv_bridge.

    rgb8 is used as is; bgr8 has its channels reversed (OpenCV-style publishers); rgba8/bgra8 lose
    alpha; mono8 is replicated to 3 channels. Row padding (``step``) is honoured. Anything else
    raises ValueError (the node logs it and ignores the frame).
    """
    enc = msg.encoding.lower()
    ch = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "8uc3": 3, "8uc1": 1}.get(enc)
    if ch is None:
        raise ValueError(f"unsupported image encoding '{msg.encoding}' (rgb8, bgr8, rgba8, bgra8, mono8)")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0 or step < w * ch or len(msg.data) < h * step:
        raise ValueError(f"image {w}x{h} step {step} does not match {len(msg.data)} data bytes")
    try:
        buf = np.frombuffer(msg.data, dtype=np.uint8)  # array.array / bytes: no copy
    except (TypeError, ValueError):
        buf = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    a = buf[: h * step].reshape(h, step)[:, : w * ch].reshape(h, w, ch)
    if ch == 1:
        return np.repeat(a, 3, axis=2)
    if enc in ("bgr8", "bgra8", "8uc3"):  # 8UC3 from OpenCV is BGR
        a = a[:, :, 2::-1]
    return np.ascontiguousarray(a[:, :, :3])


def parse_script(text: str) -> np.ndarray:
    """``"a,b,c,d,e,f,g; ..."`` (or any separators) -> (N, 7) float array."""
    cleaned = text.replace("[", " ").replace("]", " ").replace(";", " ").replace(",", " ")
    try:
        vals = [float(v) for v in cleaned.split()]
    except ValueError:
        raise ConfigError(f"scripted_actions must be numbers, got '{text[:60]}'") from None
    if not vals or len(vals) % 7:
        raise ConfigError(f"scripted_actions needs a multiple of 7 numbers, got {len(vals)}")
    return np.asarray(vals).reshape(-1, 7)


def remote_robot_id(cfg: PolicyNodeConfig, namespace: str) -> str:
    """The arm's id on a shared policy server: ``robot_id`` or the node's namespace ("/" -> "default")."""
    rid = cfg.robot_id or (namespace if namespace not in ("", "/") else "default")
    return rid


def _set_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` when n > 0 and torch is importable (the scripted policy needs no torch)."""
    if n <= 0:
        return
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(int(n))


def build_policy(cfg: PolicyNodeConfig, namespace: str = "/"):
    """The policy object for ``cfg.policy`` and its step period [s] (``namespace``: the node's, for robot_id)."""
    import os

    choose(cfg.policy, POLICIES, "policy")
    if cfg.policy == "scripted":
        period = cfg.step_period or 0.2
        return ScriptedPolicy(parse_script(cfg.scripted_actions), loop=cfg.scripted_loop,
                              step_period=period), period
    if cfg.policy == "remote":
        from magma_ros.serve.auth import load_token
        from magma_ros.serve.client import RemotePolicy

        if not cfg.remote_timeout > 0:
            raise ConfigError("remote_timeout must be > 0 s")
        try:
            pol = RemotePolicy(cfg.host, cfg.port, token=load_token(cfg.token_file or None),
                               timeout=cfg.remote_timeout, robot_id=remote_robot_id(cfg, namespace),
                               tls=cfg.tls, ca_file=cfg.ca_file or None)
        except (ValueError, OSError) as e:
            raise ConfigError(f"policy:=remote: {e}") from None
    else:
        from magma_ros.model.policy import MagmaPolicy

        model = cfg.model or os.environ.get("MAGMA_MODEL", "")
        if not model:
            raise ConfigError("policy:=local needs model:=<checkpoint dir or hub id> (or MAGMA_MODEL)")
        pol = MagmaPolicy(model, stats=cfg.stats, engine=cfg.engine, constrained=cfg.constrained,
                          device=cfg.device or None, compile=cfg.compile or None, quant=cfg.quant or None,
                          temperature=cfg.temperature, top_k=cfg.top_k,
                          seed=cfg.seed if cfg.seed >= 0 else None)
    if cfg.step_period:
        return pol, float(cfg.step_period)
    try:
        period = getattr(pol, "step_period", None)  # remote: asks the server (connects)
    except Exception as e:  # server down: say what to do instead of a traceback
        raise ConfigError(f"policy:={cfg.policy}: could not get step_period ({e}); start the policy "
                          "server first or set step_period:=SECONDS") from None
    if not period or not math.isfinite(float(period)) or float(period) <= 0:
        raise ConfigError(f"policy:={cfg.policy} reports no step_period; set step_period:=SECONDS")
    return pol, float(period)


def make_tom_planner(policy, n_marks: int, max_tokens: int, first_mark=None):
    """A ``plan(frame, instruction) -> TomResult`` over ``policy.predict_tom``.

    Marks go on strong image corners (``core.tom.feature_marks``), are drawn as numbered SoM marks
    and named in the prompt; each mark's line strip is its start point followed by the predicted
    future points (just the start where the model gave no trace for it). ``first_mark(frame)``
    (optional) gives mark 1's pixel, e.g. the gripper's; None leaves all marks to the corners.
    """
    import time

    from magma_ros.core import tom

    def plan(frame: Frame, instruction: str):
        img = frame.image
        first = first_mark(frame) if first_mark is not None else None
        if first is not None and n_marks > 1:
            marks = np.vstack([np.asarray(first, float).reshape(1, 2), tom.feature_marks(img, n_marks - 1)])
        elif first is not None:
            marks = np.asarray(first, float).reshape(1, 2)
        else:
            marks = tom.feature_marks(img, n_marks)
        t0 = time.perf_counter()
        res = policy.predict_tom(img, instruction, marks, max_new_tokens=max_tokens)
        traces = []
        for k, start in enumerate(np.asarray(marks, float).reshape(-1, 2), start=1):
            fut = np.asarray(res.traces.get(k, np.zeros((0, 2))), float).reshape(-1, 2)
            st = np.asarray(res.starts.get(k, start), float).reshape(1, 2)
            traces.append(np.vstack([st, fut]))
        note = "" if res.traces else (res.reason or "no traces")
        return TomResult(stamp=frame.stamp, marks=np.asarray(marks, float), traces=traces, image=img,
                         latency_s=time.perf_counter() - t0, note=note)

    return plan


def make_node():
    """Build the policy node (imports rclpy lazily)."""
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import Point, PoseStamped, TwistStamped
    from nav_msgs.msg import Path
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image, JointState
    from std_msgs.msg import Float64, String
    from visualization_msgs.msg import Marker, MarkerArray

    from magma_ros.core.ask import AskWorker, FrameRing
    from magma_ros.core.robot import load_robot
    from magma_ros.nodes._common import declare_config

    class PolicyNode(Node):
        """ROS shell of the policy loop: image/instruction in, twist/gripper/ToM/diagnostics out."""

        def __init__(self):
            super().__init__("policy")
            self.cfg: PolicyNodeConfig = declare_config(self, PolicyNodeConfig)
            self.robot = load_robot(self.cfg.robot)
            self.base_link = self.robot.base_link
            choose(self.cfg.action_source, ACTION_SOURCES, "action_source")
            self.tom_mode = self.cfg.action_source == "tom"
            if self.tom_mode and not (self.cfg.tom_rate > 0 and self.cfg.tom_3d):
                raise ConfigError("action_source:=tom follows ToM plans in 3-D: it needs tom_rate > 0 and tom_3d:=true")
            _set_torch_threads(self.cfg.torch_threads)
            if self.cfg.switch_interval > 0:
                sys.setswitchinterval(self.cfg.switch_interval)
            self.policy, self.step_period = build_policy(self.cfg, self.get_namespace())
            self._side = None  # a second model instance for ToM / questions (never the action model)
            self._side_lock = threading.Lock()
            self.twist_pub = self.create_publisher(TwistStamped, "magma/ee_twist", 10)
            self.grip_pub = self.create_publisher(Float64, "magma/gripper", 10)
            self.diag_pub = self.create_publisher(DiagnosticArray, "diagnostics", 10)
            self.loop = PolicyLoop(self.policy, self.step_period, self.cfg.image_timeout, self.now,
                                   self.publish_action, self.report, instruction=self.cfg.instruction,
                                   ready=self.outputs_ready if self.cfg.require_subscriber else None)
            self.tom = None
            self._tom_note = ""
            if self.cfg.tom_rate > 0:
                if not hasattr(self.policy, "predict_tom"):
                    raise ConfigError(f"tom_rate > 0 needs policy:=local (policy:={self.cfg.policy} "
                                      "has no predict_tom)")
                # tom mode: no action inference runs, so ToM has the action model to itself
                tom_policy = self.policy if (self.cfg.tom_shared or self.tom_mode) else self.side_policy()
                self.tom_pub = self.create_publisher(MarkerArray, "magma/tom", 10)
                self.tom_img_pub = self.create_publisher(Image, "magma/tom/image", 10)
                shared = self.cfg.tom_shared and not self.tom_mode
                first = self.gripper_pixel if (self.cfg.tom_3d and self.cfg.tom_gripper_mark) else None
                planner = make_tom_planner(tom_policy, self.cfg.tom_marks, self.cfg.tom_max_tokens, first)
                self.tom = TomWorker(planner, self.cfg.tom_rate, self.publish_tom,
                                     lambda: self.loop.instruction, self.loop.busy if shared else None,
                                     self.report, slack=self.loop.slack if shared else None,
                                     max_duty=self.cfg.tom_max_duty)
            self._init_tom_3d()
            self._init_ask()
            cb = MutuallyExclusiveCallbackGroup()
            choose(self.cfg.image_qos, ("reliable", "best_effort"), "image_qos")
            img_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE if self.cfg.image_qos == "reliable"
                                 else ReliabilityPolicy.BEST_EFFORT)
            self.create_subscription(Image, IMAGE_TOPIC, self.on_image, img_qos, callback_group=cb)
            instr_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                   durability=DurabilityPolicy.TRANSIENT_LOCAL)
            self.create_subscription(String, "magma/instruction", self.on_instruction, instr_qos)
            self.create_timer(self.cfg.diagnostics_period, self.publish_diagnostics)
            self._bad_encoding = ""
            self._last_report = ""
            self._stale = ""
            self._msgs = (Marker, MarkerArray, Point, Image, TwistStamped, Float64)
            if not self.tom_mode:
                self.loop.start()
            if self.tom is not None:
                self.tom.start()
            if self.asker is not None:
                self.asker.start()
            self.get_logger().info(
                f"policy:={self.cfg.policy} action_source:={self.cfg.action_source} step_period "
                f"{self.step_period:.3f} s, image_timeout {self.cfg.image_timeout} s, tom_rate {self.cfg.tom_rate} "
                f"Hz; listening on '{IMAGE_TOPIC}'")

        def side_policy(self):
            """The second model instance for ToM and questions, built once on first use."""
            with self._side_lock:
                if self._side is None:
                    # own instance: own lock, runs concurrently
                    self._side, _ = build_policy(self.cfg, self.get_namespace())
                    if self.cfg.side_yields and hasattr(self._side, "yield_to"):
                        self._side.yield_to = self._yield_to_actions
                return self._side

        def _yield_to_actions(self) -> None:
            """Between the tokens of a ToM plan or an answer (the second instance): wait while an action
            is inferred, so the action path keeps its step on a small CPU (cores and the interpreter
            lock); at most 1 s per token."""
            busy = self.loop.busy
            deadline = time.monotonic() + 1.0
            while busy.is_set() and time.monotonic() < deadline:
                time.sleep(0.002)

        # ---------------------------------------------------------- ToM in 3-D
        def _init_tom_3d(self) -> None:
            self.tom3d = None
            self._tom3d_counts = {"plans": 0, "points": 0, "dropped": 0, "filled": 0, "no_depth_frame": 0}
            self._tom3d_note = ""
            self._gripper_px: tuple[float, np.ndarray, np.ndarray] | None = None  # (stamp, pixel, TCP)
            self.follower = None
            if self.tom is None or not self.cfg.tom_3d:
                return
            from magma_ros.core import tom3d
            from magma_ros.core.realsense import load_camera_config

            choose(self.cfg.tom_gripper_depth, tom3d.DEPTH_MODES, "tom_gripper_depth")

            cam = load_camera_config(self.cfg.camera or f"sim_{self.robot.name}")
            self.tom3d = tom3d
            self.mount = tom3d.CameraMount(cam, self.robot)
            self.depth_opts = tom3d.DepthOptions(window=self.cfg.tom_depth_window, depth_max=self.cfg.tom_depth_max)
            self.depth_buf = tom3d.DepthBuffer()
            self._K: tuple[np.ndarray, int, int] | None = None  # camera_info K, width, height
            self._q: np.ndarray | None = None
            best = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
            self.create_subscription(Image, DEPTH_TOPIC, self.on_depth, QoSProfile(depth=2))
            self.create_subscription(CameraInfo, INFO_TOPIC, self.on_info, QoSProfile(depth=2))
            self.create_subscription(JointState, self.robot.joint_states_topic, self.on_joint_state, best)
            self.path_pub = self.create_publisher(Path, "magma/tom/path", 10)
            self.markers3d_pub = self.create_publisher(MarkerArray, "magma/tom/markers_3d", 10)
            self._Path, self._PoseStamped = Path, PoseStamped
            if self.tom_mode:
                from magma_ros.core.path_follow import PathFollowConfig
                from magma_ros.nodes.tom_follower import PathFollowerShell

                fcfg = declare_config(self, PathFollowConfig, prefix="tom_follow_", step_period=self.step_period)
                self.follower = PathFollowerShell(self, fcfg, self.robot, self.twist_pub, self.now,
                                                  require_subscriber=self.cfg.require_subscriber)
            self.get_logger().info(f"ToM 3-D: camera '{cam.name}' ({self.mount.mount}, parent '{cam.parent_frame}'), "
                                   f"depth on '{DEPTH_TOPIC}'")

        def on_depth(self, msg) -> None:
            if msg.encoding.lower() not in ("16uc1", "mono16") or msg.step < 2 * msg.width:
                self._tom3d_note = f"depth encoding '{msg.encoding}' ignored (expected 16UC1 mm)"
                return
            try:
                buf = np.frombuffer(msg.data, dtype="<u2" if not msg.is_bigendian else ">u2")
                d = buf[: msg.height * msg.step // 2].reshape(msg.height, msg.step // 2)[:, : msg.width]
            except ValueError:
                self._tom3d_note = f"depth image {msg.width}x{msg.height} does not match its data"
                return
            self.depth_buf.put(to_seconds(msg.header.stamp), d)

        def on_info(self, msg) -> None:
            K = np.asarray(msg.k, float).reshape(3, 3)
            if K[0, 0] > 0 and K[1, 1] > 0:
                self._K = (K, int(msg.width), int(msg.height))

        def on_joint_state(self, msg) -> None:
            from magma_ros.nodes.tom_follower import arm_positions

            q = arm_positions(list(msg.name), list(msg.position), self.robot.arm_joints)
            if q is not None:
                self._q = q

        def _intrinsics(self, w: int, h: int) -> np.ndarray:
            if self._K is not None and self._K[1:] == (w, h):
                return self._K[0]
            return self.mount.camera.intrinsics(w, h)  # no camera_info (yet): the configured model

        def gripper_pixel(self, frame: Frame):
            """Pixel of the TCP in ``frame`` (mark 1 of a ToM plan), or None when unknown or out of view."""
            if self._q is None:
                return None
            h, w = frame.image.shape[:2]
            try:
                T = self.mount.base_from_optical(self._q)
                p = self.mount.kinematics.fk(self._q)[:3, 3]
            except ValueError:
                return None
            px = self.tom3d.pixel_of(p, self._intrinsics(w, h), T, w, h)
            self._gripper_px = None if px is None else (frame.stamp, px, p)
            return px

        def publish_tom_3d(self, r: TomResult) -> None:
            depth = self.depth_buf.match(r.stamp)
            if depth is None:
                self._tom3d_counts["no_depth_frame"] += 1
                self._tom3d_note = "no aligned depth image for the ToM frame"
                return
            h, w = r.image.shape[:2]
            if depth.shape != (h, w):
                self._tom3d_note = f"depth {depth.shape[1]}x{depth.shape[0]} is not aligned to colour {w}x{h}"
                return
            try:
                T = self.mount.base_from_optical(self._q)
            except ValueError as e:
                self._tom3d_note = str(e)
                return
            gripper = self._gripper_px is not None and self._gripper_px[0] == r.stamp
            starts = {1: self._gripper_px[2]} if gripper else None
            interp = (1,) if gripper and self.cfg.tom_gripper_depth == "interpolate" else ()
            plan = self.tom3d.traces_to_3d(r.traces, depth, self._intrinsics(w, h), T, self.depth_opts,
                                           frame_id=self.base_link, starts=starts, interpolate=interp)
            c = self._tom3d_counts
            c["plans"] += 1
            c["points"] += plan.total
            c["dropped"] += plan.dropped
            c["filled"] += plan.filled
            self._tom3d_note = f"{plan.dropped} of {plan.total} points without depth" if plan.dropped else "ok"
            Marker, MarkerArray, Point = self._msgs[:3]
            arr = MarkerArray()
            for i, tr in enumerate(plan.traces):
                if len(tr.points) == 0:
                    continue
                mk = Marker()
                mk.header.stamp = to_time_msg(r.stamp)
                mk.header.frame_id = self.base_link
                mk.ns, mk.id, mk.action = "magma_tom_3d", i, Marker.ADD
                mk.type = Marker.LINE_STRIP if len(tr.points) > 1 else Marker.SPHERE_LIST
                mk.scale.x = mk.scale.y = mk.scale.z = 0.006 if len(tr.points) > 1 else 0.015
                mk.pose.orientation.w = 1.0
                mk.color.r, mk.color.g, mk.color.b, mk.color.a = (0.1, 0.9, 0.2, 1.0) if tr.mark == 1 else \
                    (1.0, 0.3, 0.2, 1.0)
                mk.points = [Point(x=float(x), y=float(y), z=float(z)) for x, y, z in tr.points]
                arr.markers.append(mk)
            self.markers3d_pub.publish(arr)
            if gripper:
                path = plan.trace(1)
            elif self.cfg.tom_gripper_mark:  # the gripper's mark was not placed (no joint states yet, TCP out
                self._tom3d_note = "gripper not located in the frame: no path"  # of view): no path of
                return  # another mark's trace passed off as the gripper's
            else:
                path = max(plan.traces, key=lambda t: len(t.points), default=None)
            if path is None or len(path.points) == 0:
                return
            pts = path.points.copy()
            pts[:, 2] = np.maximum(pts[:, 2], self.cfg.tom_path_min_z)
            msg = self._Path()
            msg.header.stamp = to_time_msg(r.stamp)
            msg.header.frame_id = self.base_link
            for x, y, z in pts:
                ps = self._PoseStamped()
                ps.header = msg.header
                ps.pose.position.x, ps.pose.position.y, ps.pose.position.z = float(x), float(y), float(z)
                ps.pose.orientation.w = 1.0
                msg.poses.append(ps)
            self.path_pub.publish(msg)
            if self.follower is not None and gripper and len(pts) > 1:
                self.follower.set_path(pts[1:])  # the future points; the follower starts from the TCP

        # ---------------------------------------------------------- questions
        def _init_ask(self) -> None:
            self.asker = None
            self.ask_ring = FrameRing(self.cfg.ask_buffer, self.cfg.ask_frame_spacing)
            self.answer_pub = self.create_publisher(String, "magma/answer", 10)
            self.create_subscription(String, "magma/ask", self.on_ask, 10)
            if not hasattr(self.policy, "ask"):
                return
            from magma_ros.model.policy import MAX_QA_IMAGES

            # tom mode runs no action inference: questions may use the (idle) action model ungated
            use_action_model = self.cfg.ask_shared or self.tom_mode
            gated = self.cfg.ask_shared and not self.tom_mode

            def answer(images, question):
                pol = self.policy if use_action_model else self.side_policy()
                return pol.ask(images, question, max_new_tokens=self.cfg.ask_max_tokens)

            def slack() -> float:  # before the first action nothing is due yet
                return self.loop.slack() if self.loop.stats.inferences else math.inf

            self.asker = AskWorker(answer, self.ask_ring, self.publish_answer, self.now, self.cfg.ask_frames,
                                   MAX_QA_IMAGES, self.cfg.ask_queue,
                                   action_busy=self.loop.busy if gated else None, slack=slack if gated else None)

        def on_ask(self, msg) -> None:
            if self.asker is None:
                from magma_ros.core.ask import Answer

                return self.publish_answer(Answer(msg.data, "", [], error=f"questions need policy:=local "
                                                                         f"(policy:={self.cfg.policy})"))
            self.get_logger().info(f"ask: '{msg.data[:200]}' (queued, {self.asker.pending} waiting)")
            self.asker.ask(msg.data)

        def publish_answer(self, a) -> None:
            text = a.answer if not a.error else f"(no answer: {a.error})"
            stamps = ", ".join(f"{s:.3f}" for s in a.stamps)
            self.get_logger().info(f"answer: '{a.question[:200]}' on {len(a.stamps)} frame(s) [stamps {stamps}] "
                                   f"-> '{text[:300]}' ({a.latency_s:.2f} s)")
            self.answer_pub.publish(String(data=text))

        def now(self) -> float:
            return self.get_clock().now().nanoseconds * 1e-9

        # ---------------------------------------------------------- inputs
        def on_image(self, msg) -> None:
            try:
                rgb = image_to_rgb(msg)
            except ValueError as e:
                if str(e) != self._bad_encoding:
                    self._bad_encoding = str(e)
                    self.get_logger().error(f"image ignored: {e}")
                return
            st = msg.header.stamp
            f = Frame(rgb, to_seconds(st), self.now(), msg.header.frame_id)
            self.loop.offer(f)
            self.ask_ring.offer(rgb, f.stamp if f.stamp > 0 else f.received)
            if self.tom is not None:
                self.tom.offer(f)

        def on_instruction(self, msg) -> None:
            self.loop.set_instruction(msg.data)  # the worker resets the policy's episode state
            self.get_logger().info(f"instruction: '{self.loop.instruction}'")

        # ---------------------------------------------------------- outputs (worker threads)
        def outputs_ready(self) -> str:
            if self.twist_pub.get_subscription_count() > 0:
                return ""
            return f"waiting for a subscriber on '{self.twist_pub.topic_name}' (servo not connected yet)"

        def publish_action(self, a: PolicyAction) -> None:
            TwistStamped, Float64 = self._msgs[4], self._msgs[5]
            m = TwistStamped()
            m.header.stamp = to_time_msg(a.stamp)
            m.header.frame_id = self.base_link
            m.twist.linear.x, m.twist.linear.y, m.twist.linear.z = (float(v) for v in a.linear)
            m.twist.angular.x, m.twist.angular.y, m.twist.angular.z = (float(v) for v in a.angular)
            self.twist_pub.publish(m)
            self.grip_pub.publish(Float64(data=float(a.gripper)))
            if self._last_report:
                self.get_logger().info("actions flowing")
                self._last_report = ""

        def report(self, why: str) -> None:
            if why != self._last_report:
                self.get_logger().warning(f"no action: {why}")
                self._last_report = why
                self.publish_diagnostics()

        def publish_tom(self, r: TomResult) -> None:
            Marker, MarkerArray, Point, Image = self._msgs[:4]
            if r.note != self._tom_note:
                if r.note:
                    self.get_logger().warning(f"ToM plan without traces: {r.note[:200]}")
                self._tom_note = r.note
            arr = MarkerArray()
            for i, tr in enumerate(r.traces):
                mk = Marker()
                mk.header.stamp = to_time_msg(r.stamp)
                mk.header.frame_id = "image"  # pixel coordinates: x right, y down, origin top-left
                mk.ns, mk.id, mk.type, mk.action = "magma_tom", i, Marker.LINE_STRIP, Marker.ADD
                mk.scale.x = 2.0
                mk.color.r, mk.color.g, mk.color.b, mk.color.a = 1.0, 0.2, 0.2, 1.0
                mk.points = [Point(x=float(x), y=float(y), z=0.0) for x, y in np.asarray(tr).reshape(-1, 2)]
                arr.markers.append(mk)
            self.tom_pub.publish(arr)
            from magma_ros.core import som

            try:
                over = som.draw_tom(r.image, r.marks, [t for t in r.traces if len(t) > 1] or None)
            except Exception as e:
                self.get_logger().warning(f"ToM overlay failed: {e}")
                return
            im = Image()
            im.header.stamp = to_time_msg(r.stamp)
            im.header.frame_id = "image"
            im.height, im.width = int(over.shape[0]), int(over.shape[1])
            im.encoding, im.step = "rgb8", int(over.shape[1]) * 3
            im.data = np.ascontiguousarray(over, dtype=np.uint8).tobytes()
            self.tom_img_pub.publish(im)
            if self.tom3d is not None:
                try:
                    self.publish_tom_3d(r)
                except Exception as e:  # noqa: BLE001 - a bad plan must not stop the ToM worker
                    self._tom3d_note = f"3-D failed: {type(e).__name__}: {e}"

        def publish_diagnostics(self) -> None:
            s = self.loop.stats
            stale = self.loop.camera_stale(self.now())
            if stale:
                level, message = 1, stale
            elif s.last_reason and s.last_reason != "ok":
                level, message = 1, s.last_reason
            else:
                level, message = 0, "ok" if s.published else "waiting"
            vals = {"inference_rate_hz": f"{s.rate():.3f}", "last_latency_s": f"{s.last_latency:.3f}",
                    "step_period_s": f"{self.step_period:.3f}", "inferences": s.inferences,
                    "published": s.published, "invalid": s.invalid, "stale_frames": s.stale,
                    "dropped_frames": self.loop.mailbox.dropped, "errors": s.errors,
                    "instruction": self.loop.instruction,
                    # matched DDS endpoints (discovery can take seconds): does anyone hear the actions?
                    "twist_subscribers": self.twist_pub.get_subscription_count()}
            remote = getattr(self.policy, "status", None)
            if callable(remote):  # policy:=remote: the connection to the policy server
                st = remote()
                vals.update({"remote_server": st["server"], "remote_state": st["state"],
                             "remote_robot_id": st["robot_id"], "remote_reconnects": st["reconnects"],
                             "remote_timeouts": st["timeouts"], "remote_failures": st["failures"],
                             "remote_rtt_s": f"{st['last_rtt_s']:.4f}",
                             "remote_last_error": st["last_error"] or "none"})
                if st["state"] != "connected" and level == 0 and s.inferences:
                    level, message = 1, f"policy server {st['state']}: {st['last_error'] or 'not connected'}"
            if self.tom is not None:
                vals.update({"tom_plans": self.tom.count, "tom_latency_s": f"{self.tom.last_latency:.3f}",
                             "tom_note": self._tom_note or "ok"})
            if self.tom3d is not None:
                c = self._tom3d_counts
                vals.update({"tom_3d_plans": c["plans"], "tom_3d_points": c["points"],
                             "tom_3d_points_dropped": c["dropped"], "tom_3d_points_filled": c["filled"],
                             "tom_3d_frames_without_depth": c["no_depth_frame"], "tom_3d_note": self._tom3d_note})
            if self.follower is not None:
                vals.update(self.follower.values())
            vals["action_source"] = self.cfg.action_source
            if self.asker is not None:
                vals.update({"ask_answered": self.asker.answered, "ask_refused": self.asker.refused,
                             "ask_pending": self.asker.pending, "ask_latency_s": f"{self.asker.last_latency:.3f}"})
            self.diag_pub.publish(diagnostic_array(self.get_clock().now().to_msg(), "magma_ros: policy", level,
                                                   message, vals, hardware_id=self.cfg.policy))
            if bool(stale) != bool(self._stale):  # log transitions, not every period
                if stale and self.loop.stats.inferences:
                    self.get_logger().warning(f"{stale}: publishing nothing")
                elif not stale and self._stale:
                    self.get_logger().info("camera images arriving again")
                self._stale = stale

        def close(self) -> None:
            self.loop.stop()
            if self.tom is not None:
                self.tom.stop()
            if self.asker is not None:
                self.asker.stop()
            close = getattr(self.policy, "close", None)
            if callable(close):
                close()

    return PolicyNode()


def main(args=None) -> int:
    """Console entry point (``magma_ros_policy``)."""
    from magma_ros.nodes._common import run_node

    return run_node(make_node, args=args)  # callbacks only hand over: inference, ToM and questions have threads


if __name__ == "__main__":
    raise SystemExit(main())
