"""End-effector servo: base-frame twists + normalized gripper -> joint targets (ROS-free).

Contract (see docs/nodes.md):

- A twist is an end-effector velocity in the robot's base frame (m/s and rad/s, the angular part a
  rotation-vector rate). It is applied for exactly one ``step_period``: the commanded delta is
  ``twist * step_period`` (position ``dpos``; rotation ``R_new = Exp(drotvec) @ R``). The step
  period is a parameter of the servo and must equal the policy's (the launch files pass the same
  value to both); twist spacing is only reported, never used to scale a delta.
- Each twist is used once. A twist whose stamp is not newer than the last applied one (duplicate or
  out of order), older than ``max_action_age`` or too far in the future is dropped. When the next
  twist is late the servo sends nothing new: the arm holds the last target.
- ``delta_mode`` (per robot, ``RobotConfig.delta_mode``): ``target`` applies each delta to the
  previous *target* pose (SimplerEnv's Bridge/WidowX controller; no sag accumulation), ``measured``
  applies it to the *measured* TCP pose (RT-1 / Google robot). In ``target`` mode the target is
  re-anchored to the measured pose on the first action and whenever the arm is found farther than
  ``max_target_drift`` from it (someone else moved it: teleop, e-stop, safety hold).
- IK failure (solver not converged, or a target outside the joint limits) -> hold, no output, the
  target is not advanced.
- Output: joint positions for the arm joints plus the gripper's finger joint in metres, as one or
  more trajectory points spanning the step period (``time_from_start``), stamped "now".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from magma_ros.core.errors import ConfigError, choose
from magma_ros.core.kinematics import pose_error, rotvec_to_matrix
from magma_ros.core.robot import RobotConfig


# --------------------------------------------------------------------------- pose deltas
def apply_delta(pose: np.ndarray, dpos, drotvec) -> np.ndarray:
    """Base-frame delta on a 4x4 pose: p + dpos, Exp(drotvec) @ R."""
    out = np.array(pose, dtype=float, copy=True)
    out[:3, 3] = out[:3, 3] + np.asarray(dpos, dtype=float)
    out[:3, :3] = rotvec_to_matrix(drotvec) @ out[:3, :3]
    return out


def pose_delta(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Base-frame delta that takes pose ``a`` to pose ``b``: (dpos [m], drotvec [rad])."""
    return pose_error(b, a)


# --------------------------------------------------------------------------- config and results
@dataclass(frozen=True)
class ServoConfig:
    """Servo parameters (ROS parameters of the servo node, same names)."""

    robot: str = "fr3"  # fr3 | panda | wx250s (config/robots/<robot>.yaml)
    step_period: float = 0.2  # [s] each twist is applied for this long; MUST equal the policy's
    max_action_age: float = 2.0  # [s] twists/gripper commands older than this (stamp vs now) are dropped
    future_tolerance: float = 0.5  # [s] stamps further than this in the future are dropped (clock skew)
    delta_mode: str = ""  # "" = the robot's default; "target" (Bridge) | "measured" (RT-1)
    points: int = 1  # trajectory points per step (>1: straight TCP line, IK at each point)
    max_delta_pos: float = 0.1  # [m] a step asking for a larger translation is refused (hold)
    max_delta_rot: float = 0.6  # [rad] a step asking for a larger rotation is refused (hold)
    max_target_drift: float = 0.05  # [m] target mode: re-anchor on the measured pose beyond this
    max_target_drift_rot: float = 0.35  # [rad] same, rotation
    state_timeout: float = 0.5  # [s] joint states older than this -> hold (nothing is computed)
    limit_margin: float = 0.0  # [rad] IK solutions closer than this to a position limit are refused
    max_joint_step: float = 0.5  # [rad] an IK answer moving any joint more than this in one step is refused
    ik_iters: int = 100  # damped-least-squares iterations per solve
    settle_time: float = 1.0  # [s] after a step ends its final target is re-sent (same target, fresh
    #                           stamp) for this long so a step the arm could not finish in one period
    #                           completes before the safety node's command watchdog holds; 0 = off
    keepalive_period: float = 0.2  # [s] re-send period during settle_time
    # node: drop twists / gripper commands while nothing subscribes to magma/joint_command. A command
    # published before DDS has matched the safety node is lost, and in target mode the servo's target
    # would then run ahead of the arm. False for consumers that do not show up as subscribers.
    require_subscriber: bool = True

    def validate(self) -> ServoConfig:
        """Raise ConfigError on values that make no sense; return self."""
        if not (self.step_period > 0.0 and math.isfinite(self.step_period)):
            raise ConfigError(f"servo step_period must be > 0 s, got {self.step_period}")
        if self.max_action_age <= 0.0:
            raise ConfigError(f"servo max_action_age must be > 0 s, got {self.max_action_age}")
        if self.points < 1:
            raise ConfigError(f"servo points must be >= 1, got {self.points}")
        if self.delta_mode:
            choose(self.delta_mode, ("target", "measured"), "delta_mode")
        return self


@dataclass(frozen=True)
class JointCommand:
    """A joint-space command: positions per point, ``times`` = time_from_start [s]."""

    joint_names: tuple[str, ...]  # arm joints, then the gripper finger joint (if known)
    times: tuple[float, ...]  # [s] strictly increasing, last one == the step period (or remainder)
    positions: np.ndarray  # (len(times), len(joint_names)); arm [rad], finger [m]
    stamp: float  # [s] node time when made (header.stamp)


@dataclass(frozen=True)
class ServoResult:
    """What one input did: a command to publish (or None = hold) and why."""

    command: JointCommand | None
    reason: str  # "applied", "gripper", or why nothing was sent


@dataclass
class ServoStats:
    """Counters for diagnostics."""

    applied: int = 0
    held_late: int = 0  # twists that arrived after the previous step had ended (arm held meanwhile)
    dropped: dict = field(default_factory=dict)  # reason -> count

    def drop(self, reason: str) -> None:
        key = reason.split(":")[0]
        self.dropped[key] = self.dropped.get(key, 0) + 1


@dataclass
class _Segment:
    t0: float  # node time the step started [s]
    times: tuple[float, ...]
    positions: np.ndarray  # (n, arm dof)


# --------------------------------------------------------------------------- the servo
class Servo:
    """Turns base-frame twists and a normalized gripper into joint commands (one step each).

    ``kinematics`` is a :class:`magma_ros.core.kinematics.Kinematics` for ``robot`` (``fk(q)``,
    ``solve(T, q_seed)``, ``solve_delta(q, dpos, drotvec, q_seed)``). All times are seconds on one
    clock (the node clock; sim time under ``use_sim_time``).
    """

    def __init__(self, robot: RobotConfig, kinematics, config: ServoConfig | None = None):
        self.robot = robot
        self.kin = kinematics
        self.cfg = (config or ServoConfig(robot=robot.name)).validate()
        self.delta_mode = self.cfg.delta_mode or robot.delta_mode
        self.stats = ServoStats()
        self._q: np.ndarray | None = None  # measured arm joints
        self._finger: float | None = None  # measured finger [m]
        self._state_t: float | None = None
        self._target_pose: np.ndarray | None = None  # target mode: last commanded TCP pose
        self._target_q: np.ndarray | None = None  # last commanded arm joints
        self._gripper_m: float | None = None  # last commanded finger [m]
        self._gripper_stamp = -math.inf
        self._last_stamp = -math.inf  # stamp of the last applied twist
        self._segment: _Segment | None = None
        self.last_spacing: float | None = None  # [s] stamp spacing of the last two applied twists
        self._keepalive_t = -math.inf

    # ---------------------------------------------------------------- inputs
    def update_state(self, names, positions, t: float) -> bool:
        """Store a joint-state sample (any order, extra joints ignored). False if arm joints are missing."""
        idx = {n: i for i, n in enumerate(names)}
        try:
            q = np.array([float(positions[idx[j]]) for j in self.robot.arm_joints])
        except (KeyError, IndexError, TypeError, ValueError):
            return False
        if not np.all(np.isfinite(q)):
            return False
        self._q, self._state_t = q, float(t)
        g = self.robot.gripper.joint
        if g in idx and idx[g] < len(positions) and math.isfinite(float(positions[idx[g]])):
            self._finger = float(positions[idx[g]])
        return True

    def reset(self) -> None:
        """Forget the target (next action re-anchors on the measured pose)."""
        self._target_pose = None
        self._target_q = None
        self._segment = None

    @property
    def has_state(self) -> bool:
        """True once a complete, finite arm joint state has arrived."""
        return self._q is not None

    @property
    def target_q(self) -> np.ndarray | None:
        return None if self._target_q is None else self._target_q.copy()

    def _age_ok(self, stamp: float, now: float) -> str:
        if stamp == 0.0:  # zero stamp = "now" (as for JointTrajectoryController)
            return ""
        if now - stamp > self.cfg.max_action_age:
            return f"stale: action {now - stamp:.2f} s old > max_action_age {self.cfg.max_action_age} s"
        if stamp - now > self.cfg.future_tolerance:
            return f"future: stamp {stamp - now:.2f} s ahead of the clock"
        return ""

    def _state_ok(self, now: float) -> str:
        if self._q is None:
            return "no joint states yet"
        if now - self._state_t > self.cfg.state_timeout:
            return f"joint states stale ({now - self._state_t:.2f} s > {self.cfg.state_timeout} s)"
        return ""

    def on_twist(self, stamp: float, linear, angular, now: float) -> ServoResult:
        """Apply one twist for one step period. Returns the command to send, or None (hold) and why."""
        res = self._on_twist(stamp, linear, angular, now)
        if res.command is None:
            self.stats.drop(res.reason)
        return res

    def _on_twist(self, stamp: float, linear, angular, now: float) -> ServoResult:
        try:
            v = np.asarray(linear, dtype=float).reshape(3)
            w = np.asarray(angular, dtype=float).reshape(3)
            stamp = float(stamp)
        except (TypeError, ValueError):
            return ServoResult(None, "invalid: twist must be 3 + 3 numbers")
        if not (np.all(np.isfinite(v)) and np.all(np.isfinite(w)) and math.isfinite(stamp)):
            return ServoResult(None, "invalid: NaN/inf in twist")
        why = self._age_ok(stamp, now)
        if why:
            return ServoResult(None, why)
        eff_stamp = now if stamp == 0.0 else stamp
        if eff_stamp <= self._last_stamp:
            return ServoResult(None, "duplicate: stamp not newer than the last applied action")
        why = self._state_ok(now)
        if why:
            return ServoResult(None, why)
        T = self.cfg.step_period
        dpos, drot = v * T, w * T
        if np.linalg.norm(dpos) > self.cfg.max_delta_pos or np.linalg.norm(drot) > self.cfg.max_delta_rot:
            return ServoResult(None, f"too large: |dpos| {np.linalg.norm(dpos):.3f} m, |drot| "
                               f"{np.linalg.norm(drot):.3f} rad per step (max {self.cfg.max_delta_pos} m, "
                               f"{self.cfg.max_delta_rot} rad)")

        # Start pose: previous target (target mode) or the measured pose.
        measured_pose = np.asarray(self.kin.fk(self._q), dtype=float)
        if self.delta_mode == "target" and self._target_pose is not None:
            dp, dr = pose_delta(self._target_pose, measured_pose)
            if (np.linalg.norm(dp) > self.cfg.max_target_drift
                    or np.linalg.norm(dr) > self.cfg.max_target_drift_rot):
                self._target_pose, self._target_q = None, None  # re-anchor: the arm was moved
        if self.delta_mode == "target" and self._target_pose is not None:
            start_pose, start_q = self._target_pose, self._target_q
        else:
            start_pose, start_q = measured_pose, self._q
        goal = apply_delta(start_pose, dpos, drot)

        # IK for each point along the straight TCP line (one point by default).
        n = self.cfg.points
        qs, seed = [], np.asarray(start_q, dtype=float)
        for k in range(1, n + 1):
            pose_k = goal if k == n else apply_delta(start_pose, dpos * k / n, drot * k / n)
            # No random restarts: a restart may jump to another IK branch.
            r = self.kin.solve(pose_k, seed, restarts=0, max_iters=self.cfg.ik_iters)
            if not getattr(r, "ok", False):
                return ServoResult(None, f"ik failed: {getattr(r, 'status', 'no solution')} "
                                         f"(pos err {r.pos_err * 1e3:.1f} mm, rot err {r.rot_err:.3f} rad)")
            q_k = np.asarray(r.q, dtype=float)
            jump = float(np.max(np.abs(q_k - seed)))
            if jump > self.cfg.max_joint_step:
                return ServoResult(None, f"ik failed: joint jump {jump:.2f} rad > max_joint_step "
                                         f"{self.cfg.max_joint_step} rad")
            lo = self.robot.position_min + self.cfg.limit_margin
            hi = self.robot.position_max - self.cfg.limit_margin
            if not np.all((q_k >= lo) & (q_k <= hi)) or not np.all(np.isfinite(q_k)):
                return ServoResult(None, "ik failed: solution outside the joint limits")
            qs.append(q_k)
            seed = q_k

        if self._segment is not None and now > self._segment.t0 + self._segment.times[-1]:
            self.stats.held_late += 1
        if math.isfinite(self._last_stamp) and stamp != 0.0:
            self.last_spacing = eff_stamp - self._last_stamp
        self._last_stamp = eff_stamp
        self._target_pose, self._target_q = goal, qs[-1]
        times = tuple(T * k / n for k in range(1, n + 1))
        self._segment = _Segment(now, times, np.array(qs))
        self.stats.applied += 1
        return ServoResult(self._command(times, np.array(qs), now), "applied")

    def on_gripper(self, value: float, stamp: float, now: float) -> ServoResult:
        """Set the gripper (0 closed ... 1 open). Re-sends the current step with the new finger value.

        The arm part is unchanged: the remainder of the running step, or (no step running) the last
        target / measured position over one step period.
        """
        try:
            value, stamp = float(value), float(stamp)
        except (TypeError, ValueError):
            return ServoResult(None, "invalid: gripper must be a number")
        if not (math.isfinite(value) and math.isfinite(stamp)):
            return ServoResult(None, "invalid: NaN/inf gripper")
        why = self._age_ok(stamp, now)
        if why:
            return ServoResult(None, why)
        eff_stamp = now if stamp == 0.0 else stamp
        if eff_stamp < self._gripper_stamp:
            return ServoResult(None, "duplicate: gripper stamp older than the last one")
        self._gripper_stamp = eff_stamp
        g = self.robot.gripper.from_normalized(value)
        changed = self._gripper_m is None or abs(g - self._gripper_m) > 1e-9
        self._gripper_m = g
        if not changed:
            return ServoResult(None, "gripper unchanged")
        why = self._state_ok(now)
        if why:
            return ServoResult(None, why)
        seg = self._segment
        if seg is not None and now < seg.t0 + seg.times[-1]:
            el = now - seg.t0
            keep = [i for i, t in enumerate(seg.times) if t > el + 1e-6]
            times = tuple(seg.times[i] - el for i in keep)
            return ServoResult(self._command(times, seg.positions[keep], now), "gripper")
        q = self._target_q if self._target_q is not None else self._q
        # a segment of its own, so the keep-alive also covers the fingers' travel time
        self._segment = _Segment(now, (self.cfg.step_period,), q[None, :].copy())
        return ServoResult(self._command((self.cfg.step_period,), q[None, :], now), "gripper")

    def keepalive(self, now: float) -> ServoResult:
        """Re-send the last step's final target while the arm settles (call periodically).

        Only between the end of the last step and ``settle_time`` after it, at most every
        ``keepalive_period``: the same joint target (nothing new), so a late next action still means
        the arm holds at the last target; once ``settle_time`` is over nothing is sent.
        """
        seg = self._segment
        if seg is None or self.cfg.settle_time <= 0:
            return ServoResult(None, "idle")
        end = seg.t0 + seg.times[-1]
        if now < end or now > end + self.cfg.settle_time:
            return ServoResult(None, "idle")
        if now - self._keepalive_t < self.cfg.keepalive_period - 1e-9:
            return ServoResult(None, "idle")
        self._keepalive_t = now
        return ServoResult(self._command((self.cfg.keepalive_period,), seg.positions[-1:], now), "keepalive")

    # ---------------------------------------------------------------- output
    def _command(self, times, arm_positions: np.ndarray, now: float) -> JointCommand:
        names = list(self.robot.arm_joints)
        pos = np.asarray(arm_positions, dtype=float)
        finger = self._gripper_m if self._gripper_m is not None else self._finger
        if finger is not None:
            names.append(self.robot.gripper.joint)
            pos = np.hstack([pos, np.full((pos.shape[0], 1), finger)])
        return JointCommand(tuple(names), tuple(float(t) for t in times), pos, float(now))
