"""Policy node: color image + instruction -> ``magma/ee_twist`` + ``magma/gripper`` (+ ToM plans).

A thin shell over :class:`magma_ros.core.policy_loop.PolicyLoop` (newest-frame mailbox, step
gating, staleness) and :class:`~magma_ros.core.policy_loop.TomWorker`. See docs/nodes.md.
Run: ``python -m magma_ros.nodes.policy --ros-args -p policy:=local -p model:=/path/to/Magma-8B``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from magma_ros.core.errors import ConfigError, choose
from magma_ros.core.policy_loop import Frame, PolicyAction, PolicyLoop, ScriptedPolicy, TomResult, TomWorker
from magma_ros.nodes._common import diagnostic_array, to_seconds, to_time_msg

POLICIES = ("local", "remote", "scripted")
IMAGE_TOPIC = "camera/camera/color/image_raw"


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
    tom_rate: float = 0.0  # [Hz] Trace-of-Mark plans (local policy only); 0 = off
    tom_marks: int = 10  # marks placed per ToM plan
    tom_max_tokens: int = 256  # ToM answer length cap (tokens); bounds one plan's cost
    tom_max_duty: float = 0.25  # at most this fraction of wall time goes to ToM plans (they compete with
    #                             the action loop for cores and the interpreter lock); 1 = no cap
    tom_shared: bool = False  # False: ToM gets its own model instance (never waits for/blocks actions;
    #                           twice the memory); True: share the action model, plans start only
    #                           while the action loop is idle and the last plan fits in the slack
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


def build_policy(cfg: PolicyNodeConfig):
    """The policy object for ``cfg.policy`` and its step period [s]."""
    import os

    choose(cfg.policy, POLICIES, "policy")
    if cfg.policy == "scripted":
        period = cfg.step_period or 0.2
        return ScriptedPolicy(parse_script(cfg.scripted_actions), loop=cfg.scripted_loop,
                              step_period=period), period
    if cfg.policy == "remote":
        from magma_ros.serve.client import RemotePolicy

        pol = RemotePolicy(cfg.host, cfg.port)
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


def _set_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` when n > 0 and torch is importable."""
    if n <= 0:
        return
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(int(n))


def make_tom_planner(policy, n_marks: int, max_tokens: int):
    """A ``plan(frame, instruction) -> TomResult`` over ``policy.predict_tom``.

    Marks go on strong image corners (``core.tom.feature_marks``), are drawn as numbered SoM marks
    and named in the prompt; each mark's line strip is its start point followed by the predicted
    future points (just the start where the model gave no trace for it).
    """
    import time

    from magma_ros.core import tom

    def plan(frame: Frame, instruction: str):
        img = frame.image
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
    from geometry_msgs.msg import Point, TwistStamped
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float64, String
    from visualization_msgs.msg import Marker, MarkerArray

    from magma_ros.core.robot import load_robot
    from magma_ros.nodes._common import declare_config

    class PolicyNode(Node):
        """ROS shell of the policy loop: image/instruction in, twist/gripper/ToM/diagnostics out."""

        def __init__(self):
            super().__init__("policy")
            self.cfg: PolicyNodeConfig = declare_config(self, PolicyNodeConfig)
            self.base_link = load_robot(self.cfg.robot).base_link
            if self.cfg.policy == "local":
                _set_torch_threads(self.cfg.torch_threads)
            self.policy, self.step_period = build_policy(self.cfg)
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
                tom_policy = self.policy
                if not self.cfg.tom_shared:
                    tom_policy, _ = build_policy(self.cfg)  # own instance: own lock, runs concurrently
                self.tom_pub = self.create_publisher(MarkerArray, "magma/tom", 10)
                self.tom_img_pub = self.create_publisher(Image, "magma/tom/image", 10)
                shared = self.cfg.tom_shared
                planner = make_tom_planner(tom_policy, self.cfg.tom_marks, self.cfg.tom_max_tokens)
                self.tom = TomWorker(planner, self.cfg.tom_rate, self.publish_tom,
                                     lambda: self.loop.instruction, self.loop.busy if shared else None,
                                     self.report, slack=self.loop.slack if shared else None,
                                     max_duty=self.cfg.tom_max_duty)
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
            self.loop.start()
            if self.tom is not None:
                self.tom.start()
            self.get_logger().info(
                f"policy:={self.cfg.policy} step_period {self.step_period:.3f} s, image_timeout "
                f"{self.cfg.image_timeout} s, tom_rate {self.cfg.tom_rate} Hz; listening on '{IMAGE_TOPIC}'")

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
            if self.tom is not None:
                vals.update({"tom_plans": self.tom.count, "tom_latency_s": f"{self.tom.last_latency:.3f}",
                             "tom_note": self._tom_note or "ok"})
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
            close = getattr(self.policy, "close", None)
            if callable(close):
                close()

    return PolicyNode()


def main(args=None) -> int:
    """Console entry point (``magma_ros_policy``)."""
    from magma_ros.nodes._common import run_node

    return run_node(make_node, args=args)


if __name__ == "__main__":
    raise SystemExit(main())
