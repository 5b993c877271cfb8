"""Follow a Cartesian TCP path (e.g. the gripper mark's ToM trace in 3-D) through the servo's twist input.

ROS-free. The follower turns a polyline of base-frame points into a time-parametrised reference
(trapezoidal speed profile: ``accel`` up to the requested TCP ``speed``, constant, ``accel`` down
to rest at the end) and, once per ``step_period``, a base-frame twist for ``magma/ee_twist``
(the servo applies a twist for exactly one step period, docs/nodes.md):

    linear = (p_ref(t + T) - p_ref(t)) / T  +  gain * (p_ref(t) - p_measured) / T

i.e. the path's own velocity plus a correction of the measured tracking error (``gain = 1``: each
step aims at the reference point due at the end of the step), capped at ``max_speed``. The angular
part holds the TCP orientation the path started with (``hold_orientation``), with the same gain.
Closed loop on the *measured* TCP pose (joint states + kinematics), so servo lag, sag or a
blocked arm never accumulate. The follower never moves faster than ``max_speed`` and gives up
(``aborted``, no more twists) when the tracking error exceeds ``max_error`` (something stopped or
pushed the arm: a safety hold, a collision, teleop).

``anchor`` says how a path relates to where the TCP is when it arrives:
``prepend`` (default) goes from the current TCP to the path's first point, then along the path;
``offset`` translates the whole path so it starts at the current TCP (a ToM trace as a relative
motion, e.g. when the traced mark is on the gripper's outside, not at the TCP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from magma_ros.core.errors import ConfigError, choose
from magma_ros.core.kinematics import pose_error

ANCHORS = ("prepend", "offset")


@dataclass(frozen=True)
class PathFollowConfig:
    """Path follower parameters (``tom_*`` parameters of the follower / policy node)."""

    speed: float = 0.05  # [m/s] requested TCP speed along the path
    accel: float = 0.2  # [m/s^2] speed ramp at start and end (trapezoidal profile)
    step_period: float = 0.2  # [s] one twist per step, applied by the servo for this long (= the servo's)
    gain: float = 1.0  # correction of the measured tracking error per step (0 = open loop, 1 = full)
    max_speed: float = 0.15  # [m/s] cap on the commanded linear speed (path velocity + correction)
    max_rot_speed: float = 0.5  # [rad/s] cap on the orientation-hold correction
    hold_orientation: bool = True  # keep the TCP orientation of the path's start
    goal_tolerance: float = 0.002  # [m] the path is done when the TCP is this close to its end
    settle_timeout: float = 2.0  # [s] after the reference reached the end, stop trying after this long
    max_error: float = 0.05  # [m] tracking error beyond this aborts the path (the arm was stopped/pushed)
    min_spacing: float = 0.002  # [m] path points closer than this to the previous one are skipped
    anchor: str = "prepend"  # prepend: TCP -> path start -> path; offset: the path shifted to start at the TCP

    def __post_init__(self):
        choose(self.anchor, ANCHORS, "anchor")
        for k in ("speed", "accel", "step_period", "max_speed", "max_rot_speed", "goal_tolerance", "max_error"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"path follower: {k} must be > 0, got {v}")
        if not 0 <= self.gain <= 1.5:
            raise ConfigError(f"path follower: gain must be in [0, 1.5], got {self.gain}")
        if self.speed > self.max_speed:
            raise ConfigError(f"path follower: speed {self.speed} m/s exceeds max_speed {self.max_speed} m/s")


class TimedPath:
    """A polyline (N, 3) [m] traversed with a trapezoidal speed profile; ``position(t)`` for t >= 0."""

    def __init__(self, points, speed: float, accel: float):
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        if len(p) == 0 or not np.isfinite(p).all():
            raise ValueError("a path needs at least one finite point")
        self.points = p
        seg = np.linalg.norm(np.diff(p, axis=0), axis=1) if len(p) > 1 else np.zeros(0)
        self.s = np.concatenate([[0.0], np.cumsum(seg)])  # (N,) arc length at each point
        self.length = float(self.s[-1])
        L, v, a = self.length, float(speed), float(accel)
        if 0 < L < v * v / a:  # too short to reach full speed: triangular profile
            v = math.sqrt(L * a)
        self.v, self.a = v, a
        self.t_acc = v / a if L > 0 else 0.0
        d_acc = 0.5 * a * self.t_acc ** 2
        self.t_cruise = max(0.0, (L - 2 * d_acc) / v) if L > 0 else 0.0
        self.duration = 2 * self.t_acc + self.t_cruise  # [s]

    def arc(self, t: float) -> float:
        """Arc length [m] reached at time t [s]."""
        if self.length == 0 or t <= 0:
            return 0.0
        ta, tc, a, v = self.t_acc, self.t_cruise, self.a, self.v
        if t < ta:
            return 0.5 * a * t * t
        if t < ta + tc:
            return 0.5 * a * ta * ta + v * (t - ta)
        if t < 2 * ta + tc:
            r = 2 * ta + tc - t
            return self.length - 0.5 * a * r * r
        return self.length

    def at_arc(self, s: float) -> np.ndarray:
        """Point (3,) at arc length s (clamped to the path)."""
        if self.length == 0:
            return self.points[0].copy()
        s = min(max(s, 0.0), self.length)
        i = int(np.searchsorted(self.s, s, side="right")) - 1
        i = min(max(i, 0), len(self.points) - 2)
        ds = self.s[i + 1] - self.s[i]
        f = 0.0 if ds <= 0 else (s - self.s[i]) / ds
        return self.points[i] + f * (self.points[i + 1] - self.points[i])

    def position(self, t: float) -> np.ndarray:
        """Reference point (3,) at time t [s] after the start."""
        return self.at_arc(self.arc(t))


def distance_to_polyline(points, polyline) -> np.ndarray:
    """Distance [m] of each point (M, 3) to the polyline (N, 3) (segments between consecutive points)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    L = np.asarray(polyline, dtype=np.float64).reshape(-1, 3)
    if len(L) == 1:
        return np.linalg.norm(p - L[0], axis=1)
    a, b = L[:-1], L[1:]  # (S, 3)
    ab = b - a
    denom = np.maximum((ab * ab).sum(axis=1), 1e-18)
    t = np.clip(((p[:, None, :] - a[None]) * ab[None]).sum(axis=2) / denom[None], 0.0, 1.0)  # (M, S)
    closest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(p[:, None, :] - closest, axis=2).min(axis=1)


@dataclass(frozen=True)
class FollowStep:
    """What the follower wants this step."""

    linear: np.ndarray | None  # (3,) [m/s] base frame, None = publish nothing
    angular: np.ndarray | None  # (3,) [rad/s] rotation-vector rate
    status: str  # idle | following | done | aborted: <why>
    error: float = 0.0  # [m] distance of the measured TCP to the reference point
    progress: float = 0.0  # 0..1 of the path's arc length (reference)


class PathFollower:
    """Time-parametrised Cartesian path following, one twist per step, closed loop on the measured TCP."""

    def __init__(self, config: PathFollowConfig = PathFollowConfig()):
        self.cfg = config
        self.path: TimedPath | None = None
        self.t0 = 0.0
        self.R0: np.ndarray | None = None
        self.status = "idle"
        self._pending = None  # (points, stamp): applied at the next step (needs the measured TCP)
        self.paths = 0  # paths started
        self.completed = 0
        self.aborted = 0

    def set_path(self, points) -> None:
        """A new path (N, 3) [m] base frame; replaces the current one from the next step."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        if len(p) == 0 or not np.isfinite(p).all():
            raise ValueError("path must be a non-empty list of finite (x, y, z) points")
        keep = [p[0]]
        for q in p[1:]:
            if np.linalg.norm(q - keep[-1]) >= self.cfg.min_spacing:
                keep.append(q)
        self._pending = np.asarray(keep)

    def cancel(self, why: str = "cancelled") -> None:
        """Stop following (no more twists)."""
        self.path, self._pending = None, None
        self.status = f"aborted: {why}"

    @property
    def active(self) -> bool:
        return self.path is not None or self._pending is not None

    def _start(self, points: np.ndarray, now: float, T_tcp: np.ndarray) -> None:
        p_tcp = T_tcp[:3, 3]
        if self.cfg.anchor == "offset":
            pts = points - points[0] + p_tcp
        else:
            pts = np.vstack([p_tcp, points]) if np.linalg.norm(points[0] - p_tcp) >= self.cfg.min_spacing \
                else np.vstack([p_tcp, points[1:]])
        self.path = TimedPath(pts, self.cfg.speed, self.cfg.accel)
        self.t0 = now
        self.R0 = T_tcp[:3, :3].copy()
        self.status = "following"
        self.paths += 1

    def step(self, now: float, T_tcp) -> FollowStep:
        """The twist for the step starting at ``now`` [s] given the measured TCP pose (4, 4, base frame)."""
        T_tcp = np.asarray(T_tcp, dtype=np.float64)
        if self._pending is not None:
            pts, self._pending = self._pending, None
            self._start(pts, now, T_tcp)
        if self.path is None:
            return FollowStep(None, None, self.status)
        c, path = self.cfg, self.path
        t = now - self.t0
        T = c.step_period
        ref, nxt = path.position(t), path.position(t + T)
        p = T_tcp[:3, 3]
        err = float(np.linalg.norm(ref - p))
        prog = path.arc(t) / path.length if path.length > 0 else 1.0
        if err > c.max_error:
            self.aborted += 1
            self.cancel(f"tracking error {err * 1000:.1f} mm > max_error {c.max_error * 1000:.0f} mm")
            return FollowStep(None, None, self.status, err, prog)
        end = path.points[-1]
        if t >= path.duration and np.linalg.norm(end - p) <= c.goal_tolerance:
            self.completed += 1
            self.path, self.status = None, "done"
            return FollowStep(None, None, "done", err, 1.0)
        if t >= path.duration + c.settle_timeout:
            self.aborted += 1
            self.cancel(f"end not reached within {c.settle_timeout:.1f} s "
                        f"({np.linalg.norm(end - p) * 1000:.1f} mm short)")
            return FollowStep(None, None, self.status, err, prog)
        lin = (nxt - ref) / T + c.gain * (ref - p) / T
        n = float(np.linalg.norm(lin))
        if n > c.max_speed:
            lin *= c.max_speed / n
        ang = np.zeros(3)
        if c.hold_orientation and self.R0 is not None:
            T_goal = np.eye(4)
            T_goal[:3, :3] = self.R0
            _, drot = pose_error(T_goal, T_tcp)
            ang = c.gain * drot / T
            m = float(np.linalg.norm(ang))
            if m > c.max_rot_speed:
                ang *= c.max_rot_speed / m
        return FollowStep(lin, ang, "following", err, prog)
