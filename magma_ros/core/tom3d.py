"""Trace-of-Mark plans in 3-D: pixel traces + aligned depth + intrinsics + extrinsic -> base-frame paths.

ROS-free and torch-free (numpy; the eye-in-hand case uses ``core.kinematics``).

Conventions:

- Pixels are ``(x, y)`` floats, origin top-left, pixel centres at integer coordinates (the ROS /
  OpenCV convention, the same as ``CameraConfig.intrinsics`` and ``core.tom``).
- Depth is the aligned depth image as realsense2_camera publishes it: ``(H, W) uint16`` in mm
  along the optical axis (z), 0 = no measurement.
- The optical frame is z forward, x right, y down (REP 103). A pixel ``(u, v)`` with depth ``z``
  back-projects to ``z * K^-1 [u, v, 1]``.
- Depth holes: the depth at a point is read at its nearest pixel; when that reads 0 (or lies outside
  ``[depth_min, depth_max]``) the nearest valid pixel in a ``(2 window + 1)^2`` square is used
  (``filled``); with none there, the point is dropped (``no_depth``). Points outside the image are
  dropped (``outside``). Nothing is ever guessed beyond the window.
- Extrinsic (:class:`CameraMount`): the camera config's ``parent_frame`` is either the robot's base
  link (eye-to-hand: a fixed pose) or another link of the arm (eye-in-hand: the camera pose is
  ``FK(parent_frame, q) @ T_parent_optical`` at the current joint state ``q``).

Limitation (inherent in 2-D traces): a future point is back-projected on the depth of the *current*
frame at that pixel, i.e. onto the surface seen there now. For a mark on an object that will be
carried through free space this is the surface behind it; the gripper path follower anchors the
path at the gripper (``core.path_follow``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from magma_ros.core.errors import ConfigError


# ----------------------------------------------------------------------------- camera model
def check_intrinsics(K) -> np.ndarray:
    """(3, 3) float pinhole matrix; ValueError when it is not one (zero focal length, NaN)."""
    K = np.asarray(K, dtype=np.float64)
    if K.shape == (9,):
        K = K.reshape(3, 3)
    if K.shape != (3, 3) or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"bad camera intrinsics K {K.tolist()}")
    return K


def project(points_cam, K) -> np.ndarray:
    """Optical-frame points (N, 3) [m] -> pixels (N, 2) ``(x, y)``; NaN for points with z <= 0."""
    p = np.asarray(points_cam, dtype=np.float64).reshape(-1, 3)
    K = check_intrinsics(K)
    z = p[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = K[0, 0] * p[:, 0] / z + K[0, 1] * p[:, 1] / z + K[0, 2]
        v = K[1, 1] * p[:, 1] / z + K[1, 2]
    out = np.stack([u, v], axis=1)
    out[~(z > 0)] = np.nan
    return out


def transform(T, points) -> np.ndarray:
    """Apply a 4x4 pose to points (N, 3) -> (N, 3)."""
    T = np.asarray(T, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return p @ T[:3, :3].T + T[:3, 3]


@dataclass(frozen=True)
class DepthOptions:
    """How depth is read for a trace point (the node's ``tom_depth_*`` parameters)."""

    window: int = 3  # [px] a hole is filled from the nearest valid pixel within +-window (0: no filling)
    depth_min: float = 0.1  # [m] readings below this count as holes (RealSense D435 min-Z ~0.1-0.3 m)
    depth_max: float = 6.0  # [m] readings beyond this count as holes
    depth_scale: float = 0.001  # [m per unit] 16UC1 depth in mm (realsense2_camera)

    def __post_init__(self):
        if self.window < 0 or not (0 <= self.depth_min < self.depth_max) or self.depth_scale <= 0:
            raise ConfigError(f"bad depth options {self}")


@dataclass
class BackProjection:
    """Result of :func:`back_project` for N input pixels."""

    points: np.ndarray  # (M, 3) [m] optical frame, M <= N, input order
    index: np.ndarray  # (M,) index of each point in the input
    filled: int = 0  # points whose depth came from a neighbour (hole filled)
    outside: int = 0  # points dropped: outside the image (or NaN)
    no_depth: int = 0  # points dropped: no valid depth within the window

    @property
    def dropped(self) -> int:
        """Points that have no 3-D position."""
        return self.outside + self.no_depth


def _window_offsets(r: int) -> np.ndarray:
    """(K, 2) integer offsets (dx, dy) in the square of radius r, sorted by distance (centre first)."""
    d = np.arange(-r, r + 1)
    dx, dy = np.meshgrid(d, d)
    off = np.stack([dx.ravel(), dy.ravel()], axis=1)
    dist = np.hypot(off[:, 0], off[:, 1])
    return off[np.lexsort((off[:, 0], off[:, 1], dist))]


def back_project(pixels, depth, K, options: DepthOptions = DepthOptions()) -> BackProjection:
    """Pixels (N, 2) + aligned depth (H, W) uint16 + K -> optical-frame points, holes filled or dropped.

    ``depth`` may also be float metres (then ``options.depth_scale`` is ignored: pass 1.0 or use the
    uint16 image). ValueError for a malformed depth image or K; never for bad pixels (they are counted).
    """
    px = np.asarray(pixels, dtype=np.float64).reshape(-1, 2)
    d = np.asarray(depth)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise ValueError(f"depth must be an (H, W) image, got shape {d.shape}")
    K = check_intrinsics(K)
    scale = options.depth_scale if np.issubdtype(d.dtype, np.integer) else 1.0
    h, w = d.shape
    n = len(px)
    finite = np.isfinite(px).all(axis=1)
    ui = np.full(n, -1, dtype=np.int64)
    vi = np.full(n, -1, dtype=np.int64)
    ui[finite] = np.floor(px[finite, 0] + 0.5).astype(np.int64)
    vi[finite] = np.floor(px[finite, 1] + 0.5).astype(np.int64)
    inside = finite & (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h)
    res = BackProjection(points=np.zeros((0, 3)), index=np.zeros(0, dtype=np.int64), outside=int((~inside).sum()))
    zs = np.full(n, np.nan)
    offsets = _window_offsets(options.window)
    for i in np.flatnonzero(inside):
        for k, (dx, dy) in enumerate(offsets):
            x, y = ui[i] + dx, vi[i] + dy
            if not (0 <= x < w and 0 <= y < h):
                continue
            z = float(d[y, x]) * scale
            if options.depth_min <= z <= options.depth_max:
                zs[i] = z
                res.filled += int(k > 0)
                break
        else:
            res.no_depth += 1
    keep = np.flatnonzero(np.isfinite(zs))
    if len(keep):
        uv1 = np.column_stack([px[keep], np.ones(len(keep))])
        rays = np.linalg.solve(K, uv1.T).T  # (M, 3) with z = 1
        res.points = rays * zs[keep, None]
    res.index = keep
    return res


# ----------------------------------------------------------------------------- extrinsic
class CameraMount:
    """Camera pose in the robot base frame: fixed (eye-to-hand) or through FK (eye-in-hand).

    ``camera``: a ``core.realsense.CameraConfig``; its ``parent_frame`` decides the mount: the
    robot's ``base_link`` -> fixed; any other link of the arm -> eye-in-hand (needs joint
    positions, ``kinematics`` a ``core.kinematics.Kinematics`` of the robot, built lazily).
    """

    def __init__(self, camera, robot, kinematics=None):
        self.camera = camera
        self.robot = robot
        self.T_parent_optical = camera.pose_optical()  # (4, 4)
        self.eye_in_hand = camera.parent_frame != robot.base_link
        self._kin = kinematics
        if self.eye_in_hand:
            kin = self.kinematics
            if not kin.model.existFrame(camera.parent_frame):
                raise ConfigError(f"camera '{camera.name}': parent_frame '{camera.parent_frame}' is neither "
                                  f"the base link '{robot.base_link}' nor a link of {robot.name}")

    @property
    def kinematics(self):
        if self._kin is None:
            from magma_ros.core.kinematics import Kinematics

            self._kin = Kinematics(self.robot)
        return self._kin

    @property
    def mount(self) -> str:
        """``eye_in_hand`` or ``eye_to_hand``."""
        return "eye_in_hand" if self.eye_in_hand else "eye_to_hand"

    def base_from_optical(self, q=None) -> np.ndarray:
        """4x4 pose of the optical frame in the base frame; ``q`` (n,) [rad] required eye-in-hand."""
        if not self.eye_in_hand:
            return self.T_parent_optical.copy()
        if q is None:
            raise ValueError(f"eye-in-hand camera on '{self.camera.parent_frame}': no joint state yet")
        return self.kinematics.frame_pose(self.camera.parent_frame, q) @ self.T_parent_optical


# ----------------------------------------------------------------------------- traces
@dataclass
class Trace3D:
    """One mark's trace in the base frame."""

    mark: int  # mark id (1-based, as the ToM prompt names it)
    points: np.ndarray  # (M, 3) [m] base frame, in trace order (dropped points left out)
    pixels: np.ndarray  # (M, 2) the pixels they came from
    filled: int = 0
    outside: int = 0
    no_depth: int = 0

    @property
    def dropped(self) -> int:
        return self.outside + self.no_depth


@dataclass
class Plan3D:
    """A ToM plan in 3-D: one :class:`Trace3D` per mark, the frames and the hole counts."""

    traces: list[Trace3D] = field(default_factory=list)
    T_base_optical: np.ndarray = field(default_factory=lambda: np.eye(4))
    frame_id: str = ""  # the base frame the points are in

    @property
    def dropped(self) -> int:
        """Points with no 3-D position (outside the image + no depth), all traces."""
        return sum(t.dropped for t in self.traces)

    @property
    def filled(self) -> int:
        return sum(t.filled for t in self.traces)

    @property
    def total(self) -> int:
        return sum(len(t.points) + t.dropped for t in self.traces)

    def trace(self, mark: int) -> Trace3D | None:
        """The trace of mark ``mark``, or None."""
        return next((t for t in self.traces if t.mark == mark), None)


DEPTH_MODES = ("surface", "interpolate")


def traces_to_3d(traces, depth, K, T_base_optical, options: DepthOptions = DepthOptions(),
                 marks=None, frame_id: str = "", starts=None, interpolate=()) -> Plan3D:
    """Pixel traces (list of (T_k, 2), or {mark: (T_k, 2)}) -> :class:`Plan3D` in the base frame.

    ``marks``: the mark id of each trace when a list is given (default 1..K). ``starts``: {mark:
    (3,) base-frame point} known start points (e.g. the TCP for the gripper's mark, whose pixel sees
    past the fingers), used instead of the depth at the trace's first pixel. ``interpolate``: marks
    whose intermediate points are not put on the surface seen at their pixel but on their pixel's
    ray at a camera depth interpolated (by index) between the start and the last point (depth-mode
    ``interpolate``: a gripper moving through free space to the surface it will reach).
    """
    if isinstance(traces, dict):
        items = sorted(traces.items())
    else:
        ids = list(marks) if marks is not None else list(range(1, len(traces) + 1))
        items = list(zip(ids, traces))
    T = np.asarray(T_base_optical, dtype=np.float64)
    plan = Plan3D(T_base_optical=T, frame_id=frame_id)
    starts = starts or {}
    T_inv = np.linalg.inv(T)
    Kc = check_intrinsics(K)
    for k, tr in items:
        px = np.asarray(tr, dtype=np.float64).reshape(-1, 2)
        bp = back_project(px, depth, K, options)
        pts, index = bp.points, bp.index
        if int(k) in starts and len(px):
            known = transform(T_inv, np.asarray(starts[int(k)], float).reshape(1, 3))
            if len(index) and index[0] == 0:
                pts = np.vstack([known, pts[1:]])
            else:
                pts, index = np.vstack([known, pts]), np.concatenate([[0], index])
        if int(k) in interpolate and len(index) >= 2 and len(px) > 2:
            z0, z1 = pts[0, 2], pts[-1, 2]
            i_last = index[-1]
            rays = np.linalg.solve(Kc, np.column_stack([px[: i_last + 1], np.ones(i_last + 1)]).T).T
            z = z0 + (z1 - z0) * np.arange(i_last + 1) / max(i_last, 1)
            mid = rays[1:-1] * z[1:-1, None]
            pts = np.vstack([pts[:1], mid, pts[-1:]])
            index = np.arange(i_last + 1)
        plan.traces.append(Trace3D(mark=int(k), points=transform(T, pts), pixels=px[index],
                                   filled=bp.filled, outside=bp.outside, no_depth=bp.no_depth))
    return plan


def pixel_of(point_base, K, T_base_optical, width: int, height: int) -> np.ndarray | None:
    """Pixel (2,) where a base-frame point appears, or None when it is behind the camera or off-image."""
    p_cam = transform(np.linalg.inv(np.asarray(T_base_optical, dtype=np.float64)), point_base)
    uv = project(p_cam, K)[0]
    if not np.isfinite(uv).all() or not (0 <= uv[0] <= width - 1 and 0 <= uv[1] <= height - 1):
        return None
    return uv


def resample_path(points, spacing: float) -> np.ndarray:
    """Drop consecutive points closer than ``spacing`` [m] (keeps first and last): de-noises a traced path."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(p) <= 2 or spacing <= 0:
        return p
    out = [p[0]]
    for q in p[1:-1]:
        if np.linalg.norm(q - out[-1]) >= spacing:
            out.append(q)
    if np.linalg.norm(p[-1] - out[-1]) > 0 or len(out) == 1:
        out.append(p[-1])
    return np.asarray(out)


class DepthBuffer:
    """The last few aligned depth images by stamp, so a ToM plan finds the depth of *its* colour frame."""

    def __init__(self, size: int = 8):
        from collections import deque

        self._items: deque = deque(maxlen=int(size))

    def put(self, stamp: float, depth: np.ndarray) -> None:
        """Store a depth image (H, W) with its header stamp [s]."""
        self._items.append((float(stamp), depth))

    def match(self, stamp: float, tolerance: float = 0.05) -> np.ndarray | None:
        """The depth image whose stamp is nearest ``stamp``, if within ``tolerance`` [s]; else None."""
        items = list(self._items)
        if not items:
            return None
        s, d = min(items, key=lambda it: abs(it[0] - stamp))
        return d if abs(s - stamp) <= tolerance else None
