"""Camera node: a RealSense (pyrealsense2) on the realsense2_camera topic names.

    python -m magma_ros.nodes.camera --ros-args -p width:=640 -p height:=480 -p fps:=30

Publishes (relative names; without a namespace they are realsense2_camera's defaults):
  camera/camera/color/image_raw                    sensor_msgs/Image rgb8
  camera/camera/color/camera_info                  sensor_msgs/CameraInfo
  camera/camera/aligned_depth_to_color/image_raw   sensor_msgs/Image 16UC1 [mm], aligned to colour
  camera/camera/aligned_depth_to_color/camera_info sensor_msgs/CameraInfo
  diagnostics                                      diagnostic_msgs/DiagnosticArray (on state change)
All messages of one frame carry the same stamp (the node clock when the frame arrived) and the
frame ``<camera_name>_color_optical_frame``. With no device the node logs one clear line and keeps
retrying every ``reconnect_period``; when the device is unplugged it logs, reconnects, resumes.
``device:=fake`` runs the synthetic FakeRealSense (tests, demos without hardware).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from magma_ros.core.errors import ConfigError, choose
from magma_ros.core.realsense import (
    CameraDevice,
    DeviceError,
    FakeRealSense,
    Frames,
    RealSenseDevice,
    StreamConfig,
    load_camera_config,
)
from magma_ros.nodes._common import declare_config, diagnostic_array, run_node

COLOR_TOPIC = "camera/camera/color/image_raw"
COLOR_INFO_TOPIC = "camera/camera/color/camera_info"
DEPTH_TOPIC = "camera/camera/aligned_depth_to_color/image_raw"
DEPTH_INFO_TOPIC = "camera/camera/aligned_depth_to_color/camera_info"
DEVICES = ("realsense", "fake")


class CameraPublisher:
    """The realsense2_camera topic set on ``node``: colour, aligned depth and their camera_info."""

    def __init__(self, node, depth: int = 2):
        from sensor_msgs.msg import CameraInfo, Image

        self._Image, self._CameraInfo = Image, CameraInfo
        self.color = node.create_publisher(Image, COLOR_TOPIC, depth)
        self.color_info = node.create_publisher(CameraInfo, COLOR_INFO_TOPIC, depth)
        self.depth = node.create_publisher(Image, DEPTH_TOPIC, depth)
        self.depth_info = node.create_publisher(CameraInfo, DEPTH_INFO_TOPIC, depth)

    def image(self, arr: np.ndarray, encoding: str, stamp, frame_id: str):
        """An Image message from a (H, W, 3) uint8 rgb8 or (H, W) uint16 16UC1 array."""
        m = self._Image()
        m.header.stamp = stamp
        m.header.frame_id = frame_id
        m.height, m.width = int(arr.shape[0]), int(arr.shape[1])
        m.encoding = encoding
        m.is_bigendian = 0
        arr = np.ascontiguousarray(arr)
        m.step = int(arr.strides[0])
        m.data = arr.tobytes()
        return m

    def info(self, K: np.ndarray, D: np.ndarray, width: int, height: int, stamp, frame_id: str):
        """A CameraInfo message (plumb_bob, no rectification: P = [K | 0])."""
        m = self._CameraInfo()
        m.header.stamp = stamp
        m.header.frame_id = frame_id
        m.width, m.height = int(width), int(height)
        m.distortion_model = "plumb_bob"
        m.d = [float(x) for x in np.asarray(D, float).reshape(-1)[:5]] + [0.0] * max(0, 5 - np.size(D))
        m.k = [float(x) for x in np.asarray(K, float).reshape(9)]
        m.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        P = np.zeros((3, 4))
        P[:, :3] = K
        m.p = [float(x) for x in P.reshape(12)]
        return m

    def wanted(self) -> tuple[bool, bool]:
        """(colour, depth): whether anything subscribes to that image or its camera_info.

        A simulator renders only what someone reads (a real camera streams regardless).
        """
        return (self.color.get_subscription_count() + self.color_info.get_subscription_count() > 0,
                self.depth.get_subscription_count() + self.depth_info.get_subscription_count() > 0)

    def publish(self, color: np.ndarray, depth: np.ndarray | None, K: np.ndarray, D: np.ndarray, stamp,
                frame_id: str) -> None:
        """Publish one frame: all four messages share ``stamp`` (builtin_interfaces/Time).

        ``depth`` None (not rendered): only the colour image and its camera_info.
        """
        h, w = color.shape[:2]
        info = self.info(K, D, w, h, stamp, frame_id)
        self.color.publish(self.image(color, "rgb8", stamp, frame_id))
        self.color_info.publish(info)
        if depth is not None:
            self.depth.publish(self.image(depth, "16UC1", stamp, frame_id))
            self.depth_info.publish(info)


@dataclass(frozen=True)
class CameraNodeConfig:
    """Parameters of the camera node."""

    device: str = "realsense"  # realsense (pyrealsense2) | fake (synthetic frames, no hardware)
    serial: str = ""  # RealSense serial number; "" = first device found
    width: int = 640  # [px] colour and aligned depth
    height: int = 480  # [px]
    fps: int = 30  # [Hz] device frame rate
    depth_width: int = 0  # [px] depth sensor mode (aligned to colour before publishing); 0 = as colour
    depth_height: int = 0  # [px]
    camera_config: str = ""  # config/cameras/<name>.yaml for the frame names and TF; "" = d435
    frame_timeout: float = 1.0  # [s] no frame for this long = device lost -> reconnect
    reconnect_period: float = 1.0  # [s] between reconnect attempts
    fake_unplug_after: int = 0  # fake device: simulate an unplug after this many frames (0 = never)
    fake_unplug_for: float = 1.0  # [s] fake device: how long it stays unplugged
    publish_tf: bool = True  # static TF parent_frame -> camera_link -> optical frame (needs tf2_msgs)

    def __post_init__(self):
        choose(self.device, DEVICES, "camera device")
        if self.width <= 0 or self.height <= 0 or self.fps <= 0:
            raise ConfigError(f"camera: width/height/fps must be positive, "
                              f"got {self.width}x{self.height}@{self.fps}")
        if self.frame_timeout <= 0 or self.reconnect_period <= 0:
            raise ConfigError("camera: frame_timeout and reconnect_period must be > 0")


def make_device(cfg: CameraNodeConfig) -> CameraDevice:
    """The device named by ``cfg.device``."""
    stream = StreamConfig(width=cfg.width, height=cfg.height, fps=cfg.fps, serial=cfg.serial,
                          depth_width=cfg.depth_width, depth_height=cfg.depth_height)
    if cfg.device == "fake":
        return FakeRealSense(stream, unplug_after=cfg.fake_unplug_after, unplug_for=cfg.fake_unplug_for)
    return RealSenseDevice(stream)


def _make_node(device: CameraDevice | None = None):
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node

    class CameraNode(Node):
        """Thin shell: a capture thread reads the device and publishes; reconnects on loss."""

        def __init__(self):
            super().__init__("camera")
            self.cfg = declare_config(self, CameraNodeConfig)
            self.cam = load_camera_config(self.cfg.camera_config or "d435")
            self.device = device if device is not None else make_device(self.cfg)
            self.pub = CameraPublisher(self)
            self.diag = self.create_publisher(DiagnosticArray, "diagnostics", 10)
            self.frames = 0
            self.state = ""
            self._status = None
            self.create_timer(1.0, self._publish_diag)
            self._stop = threading.Event()
            if self.cfg.publish_tf:
                _publish_static_camera_tf(self, self.cam)
            self._thread = threading.Thread(target=self._run, name="camera_capture", daemon=True)
            self._thread.start()

        def _report(self, level: int, state: str, message: str) -> None:
            """Log a state change once; diagnostics repeat the current state at 1 Hz."""
            if state == self.state:
                return
            self.state = state
            # (one call site per severity: rclpy refuses to change a call site's severity)
            if level == 0:
                self.get_logger().info(message)
            elif level == 1:
                self.get_logger().warn(message)
            else:
                self.get_logger().error(message)
            self._status = (level, state, message)
            self._publish_diag()

        def _publish_diag(self) -> None:
            if self._status is None:
                return
            level, state, message = self._status
            self.diag.publish(diagnostic_array(self.get_clock().now().to_msg(), "camera", level, message,
                                               {"state": state, "frames": self.frames},
                                               hardware_id=self.cfg.serial or self.cfg.device))

        def _run(self) -> None:
            while not self._stop.is_set():
                try:
                    self._connect_and_stream()
                except Exception as e:  # noqa: BLE001 - keep the capture loop alive whatever happens
                    if self._stop.is_set() or not self.context.ok():
                        return
                    self.get_logger().error(f"camera: capture loop error ({type(e).__name__}: {e})")
                    self._stop.wait(self.cfg.reconnect_period)

        def _connect_and_stream(self) -> None:
            """One connection: start the device, stream until it fails, release it."""
            try:
                desc = self.device.start()
            except DeviceError as e:
                self._report(2, "waiting", f"camera: {e}; retrying every {self.cfg.reconnect_period:g} s")
                self._stop.wait(self.cfg.reconnect_period)
                return
            except Exception as e:  # noqa: BLE001 - a driver bug must not kill the node
                self._report(2, "waiting", f"camera: cannot start device ({type(e).__name__}: {e}); "
                             f"retrying every {self.cfg.reconnect_period:g} s")
                self._stop.wait(self.cfg.reconnect_period)
                return
            self._report(0, "streaming", f"camera: streaming from {desc}")
            try:
                while not self._stop.is_set():
                    f = self.device.wait_frames(self.cfg.frame_timeout)
                    self._publish(f)
            except DeviceError as e:
                if not self._stop.is_set():
                    self._report(2, "lost", f"camera: device lost ({e}); reconnecting")
            except Exception as e:  # noqa: BLE001
                if not self._stop.is_set():
                    self._report(2, "lost", f"camera: capture failed ({type(e).__name__}: {e}); reconnecting")
            finally:
                self.device.stop()
            self._stop.wait(min(0.1, self.cfg.reconnect_period))

        def _publish(self, f: Frames) -> None:
            if f.color.ndim != 3 or f.depth.shape != f.color.shape[:2]:
                self.get_logger().warn(f"camera: dropping frame, shapes {f.color.shape} / {f.depth.shape}")
                return
            stamp = self.get_clock().now().to_msg()
            self.pub.publish(f.color, f.depth, f.K, f.D, stamp, self.cam.optical_frame)
            self.frames += 1

        def close(self) -> None:
            self._stop.set()
            self._thread.join(timeout=max(2.0, 2 * self.cfg.frame_timeout))

    return CameraNode()


def _publish_static_camera_tf(node, cam) -> None:
    """parent_frame -> camera_link -> optical frame on /tf_static, when tf2_msgs is importable."""
    try:
        from tf2_msgs.msg import TFMessage
    except ImportError:
        node.get_logger().info("tf2_msgs not available: camera transform not published on /tf_static")
        return
    from rclpy.qos import DurabilityPolicy, QoSProfile

    stamp = node.get_clock().now().to_msg()
    T_link = cam.pose_link()
    T_link_opt = np.linalg.solve(T_link, cam.pose_optical())
    msg = TFMessage(transforms=[transform_msg(T_link, cam.parent_frame, cam.link_frame, stamp),
                                transform_msg(T_link_opt, cam.link_frame, cam.optical_frame, stamp)])
    qos = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    node._tf_static_pub = node.create_publisher(TFMessage, "/tf_static", qos)
    node._tf_static_pub.publish(msg)


def transform_msg(T: np.ndarray, parent: str, child: str, stamp):
    """geometry_msgs/TransformStamped from a 4x4 pose of ``child`` in ``parent``."""
    from geometry_msgs.msg import TransformStamped

    m = TransformStamped()
    m.header.stamp = stamp
    m.header.frame_id = parent
    m.child_frame_id = child
    tr = m.transform.translation
    tr.x, tr.y, tr.z = (float(v) for v in T[:3, 3])
    w, x, y, z = _quat_wxyz(T[:3, :3])
    m.transform.rotation.w, m.transform.rotation.x = w, x
    m.transform.rotation.y, m.transform.rotation.z = y, z
    return m


def _quat_wxyz(R: np.ndarray) -> tuple[float, float, float, float]:
    """Unit quaternion (w, x, y, z) of a rotation matrix (Shepperd's method)."""
    t = np.trace(R)
    if t > 0:
        s = 2.0 * np.sqrt(t + 1.0)
        q = (0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s)
    else:
        i = int(np.argmax(np.diag(R)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + R[i, i] - R[j, j] - R[k, k])
        v = [0.0, 0.0, 0.0]
        v[i] = 0.25 * s
        v[j] = (R[j, i] + R[i, j]) / s
        v[k] = (R[k, i] + R[i, k]) / s
        q = ((R[k, j] - R[j, k]) / s, *v)
    n = float(np.linalg.norm(q))
    return tuple(float(x) / n for x in q)  # type: ignore[return-value]


def main(args=None) -> int:
    """Entry point: ``python -m magma_ros.nodes.camera``."""
    return run_node(_make_node, args=args)


if __name__ == "__main__":
    raise SystemExit(main())
