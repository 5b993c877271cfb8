"""Camera model and the RealSense device layer (no ROS).

Two things live here:

- :class:`CameraConfig`: where a camera is mounted (extrinsics in the robot base frame, as the
  realsense2_camera frames ``camera_link`` / ``camera_color_optical_frame``) and its pinhole
  intrinsics, parsed from ``config/cameras/<name>.yaml``. The simulator places its camera with it,
  the camera and sim nodes publish its transform.
- The device boundary: :class:`CameraDevice` is the interface the camera node talks to
  (``start`` / ``wait_frames`` / ``stop``). :class:`RealSenseDevice` implements it on pyrealsense2
  (colour + depth aligned to colour, depth in millimetres as realsense2_camera publishes it);
  :class:`FakeRealSense` implements the same methods with synthetic frames and a scripted unplug,
  so the node above it is tested for real without hardware.

Conventions: images are numpy arrays, colour ``(H, W, 3) uint8`` RGB, depth ``(H, W) uint16``
in mm (0 = no measurement). Optical frame: z forward, x right, y down (REP 103).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import yaml

from magma_ros.core.errors import ConfigError
from magma_ros.core.paths import data_path

# camera_link (x forward, y left, z up) -> optical frame (z forward, x right, y down):
# columns are the optical axes expressed in camera_link coordinates.
R_LINK_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _rpy_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """URDF fixed-axis roll-pitch-yaw: R = Rz(yaw) Ry(pitch) Rx(roll)."""
    cr, sr, cp, sp, cy, sy = (math.cos(roll), math.sin(roll), math.cos(pitch), math.sin(pitch),
                              math.cos(yaw), math.sin(yaw))
    return np.array([
        [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
        [-sp, cp * sr, cp * cr],
    ])


@dataclass(frozen=True)
class CameraConfig:
    """Camera mount (extrinsics) and pinhole intrinsics; lengths in metres, angles in degrees."""

    name: str  # config name (file stem)
    parent_frame: str  # TF parent of camera_link, usually the robot base link (fr3_link0 …)
    position: tuple[float, float, float]  # camera origin in parent_frame [m]
    look_at: tuple[float, float, float] | None = None  # point on the optical axis [m]; or use rpy
    rpy: tuple[float, float, float] | None = None  # camera_link orientation (x fwd, z up) [rad]
    camera_name: str = "camera"  # realsense2_camera name: frames <name>_link, <name>_color_optical_frame
    width: int = 640  # [px] default resolution
    height: int = 480  # [px]
    fovy_deg: float = 42.5  # vertical field of view [deg] (D435 colour: 69 x 42.5 deg)
    fx: float = 0.0  # [px] at width x height; 0 = from fovy (square pixels, centred)
    fy: float = 0.0
    cx: float = 0.0
    cy: float = 0.0
    depth_max: float = 6.0  # [m] beyond this depth reads 0 (no measurement)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if (self.look_at is None) == (self.rpy is None):
            raise ConfigError(f"camera '{self.name}': give exactly one of look_at or rpy")
        if self.width <= 0 or self.height <= 0 or not (1.0 < self.fovy_deg < 179.0):
            raise ConfigError(f"camera '{self.name}': bad size {self.width}x{self.height} "
                              f"or fovy {self.fovy_deg}")

    @property
    def optical_frame(self) -> str:
        return f"{self.camera_name}_color_optical_frame"

    @property
    def link_frame(self) -> str:
        return f"{self.camera_name}_link"

    def rotation_optical(self) -> np.ndarray:
        """Rotation of the optical frame in parent_frame (3x3)."""
        if self.rpy is not None:
            return _rpy_matrix(*self.rpy) @ R_LINK_OPTICAL
        z = np.asarray(self.look_at, float) - np.asarray(self.position, float)
        if np.linalg.norm(z) < 1e-9:
            raise ConfigError(f"camera '{self.name}': look_at equals position")
        z /= np.linalg.norm(z)
        up = np.array([0.0, 0.0, 1.0])
        if abs(z @ up) > 0.999:  # looking straight down/up: image top toward +x
            up = np.array([1.0, 0.0, 0.0])
        x = np.cross(z, up)  # right = forward x up (y is down)
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        return np.stack([x, y, z], axis=1)

    def pose_optical(self) -> np.ndarray:
        """4x4 pose of the optical frame in parent_frame."""
        T = np.eye(4)
        T[:3, :3] = self.rotation_optical()
        T[:3, 3] = self.position
        return T

    def pose_link(self) -> np.ndarray:
        """4x4 pose of camera_link (x forward, y left, z up) in parent_frame."""
        T = self.pose_optical()
        T[:3, :3] = T[:3, :3] @ R_LINK_OPTICAL.T
        return T

    def intrinsics(self, width: int | None = None, height: int | None = None) -> np.ndarray:
        """3x3 K for an image of width x height (scaled from the configured resolution)."""
        w, h = width or self.width, height or self.height
        if self.fx > 0:
            sx, sy = w / self.width, h / self.height
            return np.array([[self.fx * sx, 0, (self.cx + 0.5) * sx - 0.5],
                             [0, self.fy * sy, (self.cy + 0.5) * sy - 0.5], [0, 0, 1.0]])
        f = 0.5 * h / math.tan(math.radians(self.fovy_deg) / 2)
        # pixel centres at integer coordinates (ROS): the principal point is (w-1)/2, (h-1)/2
        return np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1.0]])


def _tuple3(d: dict, key: str, src) -> tuple[float, float, float] | None:
    if d.get(key) is None:
        return None
    try:
        v = tuple(float(x) for x in d[key])
    except (TypeError, ValueError):
        raise ConfigError(f"{src}: '{key}' must be 3 numbers") from None
    if len(v) != 3 or not all(math.isfinite(x) for x in v):
        raise ConfigError(f"{src}: '{key}' must be 3 finite numbers")
    return v  # type: ignore[return-value]


def load_camera_config(name_or_path: str | Path) -> CameraConfig:
    """Load ``config/cameras/<name>.yaml`` (or an explicit YAML path) into a CameraConfig."""
    p = Path(str(name_or_path))
    if p.suffix in (".yaml", ".yml"):
        src = p
    else:
        src = data_path("config", "cameras", f"{name_or_path}.yaml")
        if not src.is_file():
            valid = sorted(f.stem for f in src.parent.glob("*.yaml"))
            from magma_ros.core.errors import choose

            choose(str(name_or_path), valid, "camera config")
    if not src.is_file():
        raise ConfigError(f"camera config file not found: {src}")
    try:
        raw = yaml.safe_load(src.read_text())
        d = dict(raw["/**"]["ros__parameters"])
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: malformed YAML ({str(e).splitlines()[0]})") from None
    except (TypeError, KeyError):
        raise ConfigError(f"{src}: expected '/**: ros__parameters:' at the top") from None
    known = {"parent_frame", "position", "look_at", "rpy", "camera_name", "width", "height", "fovy_deg",
             "fx", "fy", "cx", "cy", "depth_max"}
    try:
        return CameraConfig(
            name=p.stem, parent_frame=str(d["parent_frame"]), position=_tuple3(d, "position", src),
            look_at=_tuple3(d, "look_at", src), rpy=_tuple3(d, "rpy", src),
            camera_name=str(d.get("camera_name", "camera")), width=int(d.get("width", 640)),
            height=int(d.get("height", 480)), fovy_deg=float(d.get("fovy_deg", 42.5)),
            fx=float(d.get("fx", 0.0)), fy=float(d.get("fy", 0.0)), cx=float(d.get("cx", 0.0)),
            cy=float(d.get("cy", 0.0)), depth_max=float(d.get("depth_max", 6.0)),
            extra={k: v for k, v in d.items() if k not in known},
        )
    except KeyError as e:
        raise ConfigError(f"{src}: missing key {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{src}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Device layer


class DeviceError(RuntimeError):
    """No device, device lost (unplugged) or no frames in time. The camera node reconnects."""


@dataclass
class Frames:
    """One colour frame with the depth frame aligned to it."""

    color: np.ndarray  # (H, W, 3) uint8 RGB
    depth: np.ndarray  # (H, W) uint16 [mm], aligned to color; 0 = no data
    K: np.ndarray  # (3, 3) colour intrinsics [px]
    D: np.ndarray  # distortion coefficients (5,), plumb_bob order k1 k2 t1 t2 k3
    frame_number: int = 0
    device_time: float = 0.0  # device timestamp [s] (informational; ROS stamps come from the node clock)


class CameraDevice(Protocol):
    """What the camera node needs from a device. Every method may raise DeviceError."""

    def start(self) -> str:
        """Open the device and start streaming; returns a one-line description (model, serial)."""

    def wait_frames(self, timeout_s: float) -> Frames:
        """Block until the next aligned colour + depth pair."""

    def stop(self) -> None:
        """Stop streaming and release the device (never raises)."""


@dataclass(frozen=True)
class StreamConfig:
    """Requested streams (realsense2_camera's rgb_camera/depth_module profiles)."""

    width: int = 640  # [px] colour and (aligned) depth
    height: int = 480  # [px]
    fps: int = 30  # [Hz]
    serial: str = ""  # pick this device; "" = the first one found
    depth_width: int = 0  # [px] depth sensor mode before alignment; 0 = same as colour
    depth_height: int = 0  # [px] (e.g. 848x480 with 1920x1080 colour: the D435 depth has no 1080p mode)


class RealSenseDevice:
    """Intel RealSense through pyrealsense2: rgb8 colour + z16 depth aligned to colour, in mm."""

    def __init__(self, cfg: StreamConfig):
        self.cfg = cfg
        self._pipe = None
        self._align = None
        self._scale_mm = 1.0
        self._K = np.eye(3)
        self._D = np.zeros(5)

    def start(self) -> str:
        try:
            import pyrealsense2 as rs
        except ImportError as e:  # pragma: no cover - pyrealsense2 is in requirements on x86_64
            raise DeviceError(f"pyrealsense2 is not installed ({e})") from None
        devices = rs.context().query_devices()
        if len(devices) == 0:
            raise DeviceError("no RealSense device connected")
        try:
            cfg = rs.config()
            if self.cfg.serial:
                cfg.enable_device(self.cfg.serial)
            cfg.enable_stream(rs.stream.color, self.cfg.width, self.cfg.height, rs.format.rgb8, self.cfg.fps)
            dw, dh = self.cfg.depth_width or self.cfg.width, self.cfg.depth_height or self.cfg.height
            cfg.enable_stream(rs.stream.depth, dw, dh, rs.format.z16, self.cfg.fps)
            pipe = rs.pipeline()
            profile = pipe.start(cfg)
        except RuntimeError as e:
            c = self.cfg
            raise DeviceError(f"cannot start RealSense {c.width}x{c.height}@{c.fps}: {e}") from None
        dev = profile.get_device()
        depth_scale = dev.first_depth_sensor().get_depth_scale()  # metres per unit
        self._scale_mm = depth_scale * 1000.0
        intr = profile.get_stream(rs.stream.color).as_video_stream_profile().get_intrinsics()
        self._K = np.array([[intr.fx, 0, intr.ppx], [0, intr.fy, intr.ppy], [0, 0, 1.0]])
        self._D = np.asarray(list(intr.coeffs)[:5], dtype=float)
        self._align = rs.align(rs.stream.color)
        self._pipe = pipe
        name = dev.get_info(rs.camera_info.name)
        serial = dev.get_info(rs.camera_info.serial_number)
        return f"{name} serial {serial}, {self.cfg.width}x{self.cfg.height}@{self.cfg.fps}"

    def wait_frames(self, timeout_s: float) -> Frames:
        if self._pipe is None:
            raise DeviceError("device not started")
        try:
            fs = self._pipe.wait_for_frames(int(timeout_s * 1000))
            fs = self._align.process(fs)
            c, d = fs.get_color_frame(), fs.get_depth_frame()
        except RuntimeError as e:  # "Frame didn't arrive within ..." or device disconnected
            raise DeviceError(str(e)) from None
        if not c or not d:
            raise DeviceError("incomplete frameset")
        color = np.asanyarray(c.get_data()).copy()
        depth = np.asanyarray(d.get_data())
        if abs(self._scale_mm - 1.0) > 1e-9:
            depth = np.clip(depth.astype(np.float64) * self._scale_mm, 0, 65535)
        return Frames(color=color, depth=depth.astype(np.uint16, copy=True), K=self._K, D=self._D,
                      frame_number=int(c.get_frame_number()), device_time=c.get_timestamp() / 1000.0)

    def stop(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            try:
                pipe.stop()
            except RuntimeError:
                pass


class FakeRealSense:
    """Same methods as :class:`RealSenseDevice`; synthetic frames, scripted unplug / replug.

    The picture is a grey gradient with a bright square moving one pixel per frame; depth is a
    plane at ``depth_mm``. After ``unplug_after`` frames (0 = never) the device "disappears":
    ``wait_frames`` raises DeviceError and ``start`` keeps raising for ``unplug_for`` seconds.
    ``unplug()`` / ``plug()`` do the same by hand.
    """

    def __init__(self, cfg: StreamConfig, *, unplug_after: int = 0, unplug_for: float = 1.0,
                 depth_mm: int = 800, present: bool = True):
        self.cfg = cfg
        self.unplug_after = unplug_after
        self.unplug_for = unplug_for
        self.depth_mm = depth_mm
        self._present = present
        self._replug_at = 0.0
        self._running = False
        self._n = 0
        self._next_t = 0.0
        self.starts = 0  # how many times start() succeeded
        self._lock = threading.Lock()
        f = 0.5 * cfg.height / math.tan(math.radians(42.5) / 2)
        self.K = np.array([[f, 0, (cfg.width - 1) / 2], [0, f, (cfg.height - 1) / 2], [0, 0, 1.0]])

    def unplug(self, for_s: float = float("inf")) -> None:
        with self._lock:
            self._present = False
            self._replug_at = time.monotonic() + for_s

    def plug(self) -> None:
        with self._lock:
            self._present = True

    def _is_present(self) -> bool:
        if not self._present and time.monotonic() >= self._replug_at:
            self._present = True
        return self._present

    def start(self) -> str:
        with self._lock:
            if not self._is_present():
                raise DeviceError("no RealSense device connected")
            self._running = True
            self._next_t = time.monotonic()
            self.starts += 1
        return f"FakeRealSense, {self.cfg.width}x{self.cfg.height}@{self.cfg.fps}"

    def wait_frames(self, timeout_s: float) -> Frames:
        with self._lock:
            if not self._running:
                raise DeviceError("device not started")
            if not self._is_present():
                self._running = False
                raise DeviceError("device disconnected")
        delay = self._next_t - time.monotonic()
        if delay > timeout_s:
            time.sleep(timeout_s)
            raise DeviceError("frame didn't arrive in time")
        if delay > 0:
            time.sleep(delay)
        self._next_t = max(self._next_t + 1.0 / self.cfg.fps, time.monotonic() - 1.0 / self.cfg.fps)
        self._n += 1
        if self.unplug_after and self._n % self.unplug_after == 0:
            self.unplug(self.unplug_for)
        w, h = self.cfg.width, self.cfg.height
        color = np.empty((h, w, 3), np.uint8)
        color[...] = (np.arange(w, dtype=np.uint32) * 255 // max(w - 1, 1)).astype(np.uint8)[None, :, None]
        s = max(4, h // 10)
        x0 = self._n % max(w - s, 1)
        y0 = (h - s) // 2
        color[y0:y0 + s, x0:x0 + s] = (255, 40, 40)
        depth = np.full((h, w), self.depth_mm, np.uint16)
        depth[y0:y0 + s, x0:x0 + s] = max(self.depth_mm - 100, 1)
        return Frames(color=color, depth=depth, K=self.K, D=np.zeros(5), frame_number=self._n,
                      device_time=time.monotonic())

    def stop(self) -> None:
        with self._lock:
            self._running = False
