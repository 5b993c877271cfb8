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
- Velocity level, as MoveIt Servo: a step is a sequence of damped pseudo-inverse cycles along the
  straight TCP line, each scaled (never refused) for singularities (by the Jacobian's condition
  number, only when heading into one), joint velocity limits and the joint-limit band
  (``RobotConfig.position_margin``, the safety node's margin). Away from these every step lands its
  delta; otherwise the feasible part is carried out (:class:`StepInfo` says how much and why) and
  the target becomes the pose actually reached, so an unachievable part never accumulates.
- The node clock running backwards (simulator reset, looping bag) drops the stamp state and the
  joint state: the servo does not stall until the clock catches up.
- Output: joint positions for the arm joints plus the gripper's finger joint in metres, as one or
  more trajectory points spanning the step period (``time_from_start``), stamped "now". A step that
  carries out nothing (hard stop) still sends the held target, which keeps the safety node fed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from magma_ros.core.checks import read_joint_state, stamp_age
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
    """Servo parameters (ROS parameters of the servo node, same names).

    The singularity and joint-limit parameters are MoveIt Servo's (moveit_servo
    ``servo_parameters.yaml``), with its defaults.
    """

    robot: str = "fr3"  # fr3 | panda | wx250s (config/robots/<robot>.yaml)
    step_period: float = 0.2  # [s] each twist is applied for this long; MUST equal the policy's
    max_action_age: float = 2.0  # [s] twists/gripper commands older than this (stamp vs now) are dropped
    future_tolerance: float = 0.5  # [s] stamps further than this in the future are dropped (clock skew)
    delta_mode: str = ""  # "" = the robot's default; "target" (Bridge) | "measured" (RT-1)
    points: int = 1  # trajectory points per step (>1: the TCP line sampled at each point)
    max_delta_pos: float = 0.1  # [m] a step asking for a larger translation is refused (hold)
    max_delta_rot: float = 0.6  # [rad] a step asking for a larger rotation is refused (hold)
    max_target_drift: float = 0.05  # [m] target mode: re-anchor on the measured pose beyond this
    max_target_drift_rot: float = 0.35  # [rad] same, rotation
    state_timeout: float = 0.5  # [s] joint states older than this -> hold (nothing is computed)
    # velocity-level stepping (MoveIt Servo: publish_period): a step is carried out as step_period /
    # control_period cycles, each a damped pseudo-inverse step towards the TCP line, scaled (never refused)
    control_period: float = 0.02  # [s] one servo cycle inside a step
    joint_velocity_scale: float = 1.0  # (0, 1] fraction of the robot's velocity_max a cycle may use
    lower_singularity_threshold: float = 17.0  # Jacobian condition number where slowing down starts
    hard_stop_singularity_threshold: float = 30.0  # condition number where motion INTO a singularity stops
    leaving_singularity_threshold_multiplier: float = 2.0  # leaving: the slow-down ramp is this much wider
    leaving_singularity_min_scale: float = 0.25  # leaving (or not heading into) a singularity is never
    #                                               slowed below this, so the arm can always back out
    damping: float = 0.05  # [m] damped least squares: damping at an exact singularity ...
    singular_region: float = 0.05  # [m] ... ramping in as the smallest singular value falls below this
    singularity_escape: bool = True  # inside singular_region, a part of the twist the Jacobian has lost
    #                                  turns the arm along its null space (TCP still) until it can be done
    escape_velocity: float = 1.0  # [rad/s] speed of that null-space motion (per joint, at most)
    clock_jump: float = 0.1  # [s] the node clock running back by more than this = a clock reset (sim
    #                          reset, looping bag): stamp state is dropped and the next twist re-anchors
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
        if not (self.control_period > 0.0 and math.isfinite(self.control_period)):
            raise ConfigError(f"servo control_period must be > 0 s, got {self.control_period}")
        if not 0.0 < self.joint_velocity_scale <= 1.0:
            raise ConfigError(f"servo joint_velocity_scale must be in (0, 1], got {self.joint_velocity_scale}")
        if not 1.0 <= self.lower_singularity_threshold < self.hard_stop_singularity_threshold:
            raise ConfigError("servo: need 1 <= lower_singularity_threshold < hard_stop_singularity_threshold, "
                              f"got {self.lower_singularity_threshold}, {self.hard_stop_singularity_threshold}")
        if not self.leaving_singularity_threshold_multiplier >= 1.0:
            raise ConfigError("servo leaving_singularity_threshold_multiplier must be >= 1, got "
                              f"{self.leaving_singularity_threshold_multiplier}")
        if not 0.0 < self.leaving_singularity_min_scale <= 1.0:
            raise ConfigError("servo leaving_singularity_min_scale must be in (0, 1], got "
                              f"{self.leaving_singularity_min_scale}")
        for name in ("damping", "singular_region", "escape_velocity", "clock_jump"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0.0):
                raise ConfigError(f"servo {name} must be >= 0, got {v}")
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
class StepInfo:
    """How one twist was carried out (diagnostics)."""

    fraction: float  # share of the commanded TCP delta carried out: 1 = all, 0 = none (6-D, 0.1 m/rad)
    condition: float  # largest Jacobian condition number (sigma_max / sigma_min) met during the step
    singularity_scale: float  # smallest singularity slow-down factor applied (1 = none, 0 = hard stop)
    velocity_scale: float  # smallest joint-velocity-limit factor applied (1 = none)
    limited: str  # what held the step back most: "" | "singularity" | "joint velocity" | "joint limit"
    #               | "unreachable" (a part of the twist no joint motion gives, e.g. at the workspace edge)
    escape: float  # [rad] largest joint travel of the null-space motion used to leave a singularity


@dataclass(frozen=True)
class ServoResult:
    """What one input did: a command to publish (or None = hold) and why."""

    command: JointCommand | None
    reason: str  # "applied", "gripper", or why nothing was sent
    step: StepInfo | None = None  # twists that were applied: how much of the step was carried out


@dataclass
class ServoStats:
    """Counters for diagnostics."""

    applied: int = 0
    held_late: int = 0  # twists that arrived after the previous step had ended (arm held meanwhile)
    scaled: int = 0  # applied twists carried out less than 99 % (singularity, limits, workspace edge)
    clock_resets: int = 0  # the node clock jumped back (sim reset / looping bag): stamp state dropped
    dropped: dict = field(default_factory=dict)  # reason -> count
    last_step: StepInfo | None = None

    def drop(self, reason: str) -> None:
        """Count one held twist under the kind of ``reason`` (the text before ':' or ' (')."""
        key = reason.split(":")[0].split(" (")[0]  # the kind, not its figures (one diagnostics key each)
        self.dropped[key] = self.dropped.get(key, 0) + 1


@dataclass
class _Segment:
    t0: float  # node time the step started [s]
    times: tuple[float, ...]
    positions: np.ndarray  # (n, arm dof)


_ROT_WEIGHT = 0.1  # [m/rad] weight of rotation against translation in the step's fraction


def _weighted_norm(dp: np.ndarray, dr: np.ndarray) -> float:
    return math.sqrt(float(dp @ dp) + _ROT_WEIGHT ** 2 * float(dr @ dr))


def singularity_scale(kappa: float, into: bool, cfg: ServoConfig) -> float:
    """MoveIt Servo's slow-down factor at condition number ``kappa`` (common.cpp
    ``velocityScalingFactorForSingularity``), applied only to motion heading ``into`` the singularity.

    Into: 1 below ``lower_singularity_threshold``, linear down to 0 at ``hard_stop_singularity_threshold``
    (and 0 beyond). Not into: MoveIt's wider leaving ramp (``leaving_singularity_threshold_multiplier``)
    but never below ``leaving_singularity_min_scale``; MoveIt halts past the hard stop whatever the
    direction, here the arm can always back out.
    """
    lo, hard = cfg.lower_singularity_threshold, cfg.hard_stop_singularity_threshold
    if not kappa > lo:
        return 1.0
    if into:
        return 0.0 if kappa >= hard else 1.0 - (kappa - lo) / (hard - lo)
    upper = lo + (hard - lo) * cfg.leaving_singularity_threshold_multiplier
    return max(cfg.leaving_singularity_min_scale, 1.0 - (kappa - lo) / (upper - lo))


# --------------------------------------------------------------------------- the servo
class Servo:
    """Turns base-frame twists and a normalized gripper into joint commands (one step each).

    ``kinematics`` is a :class:`magma_ros.core.kinematics.Kinematics` for ``robot`` (``fk(q)``,
    ``jacobian(q)``, ``jacobian_pose(q)``; ``lower``/``upper`` when it narrows the limits). All times
    are seconds on one clock (the node clock; sim time under ``use_sim_time``).
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
        self._clock = -math.inf  # latest node time seen (a clock jumping back is detected against it)
        self.clock_note = ""  # one line about the last clock reset (the node logs it once)
        # The joint-limit band the servo plans in: the robot's limits (narrowed to the URDF's where the
        # kinematics has them) less RobotConfig.position_margin, the same margin the safety node keeps.
        lo = np.maximum(robot.position_min, getattr(kinematics, "lower", robot.position_min))
        hi = np.minimum(robot.position_max, getattr(kinematics, "upper", robot.position_max))
        self._q_lo, self._q_hi = lo + robot.position_margin, hi - robot.position_margin

    # ---------------------------------------------------------------- inputs
    def check_clock(self, now: float) -> bool:
        """Detect the node clock jumping back (True once per jump); every entry point calls this.

        A simulator reset (Isaac Sim) or a looping bag under ``use_sim_time`` restarts the clock. The
        stamps remembered from before would then be "newer" than every new twist until the clock caught
        up: they are dropped, with the joint state (its arrival time is on the old clock) and the
        target (the arm may have been teleported), so the next twist re-anchors on fresh joint states.
        """
        now = float(now)
        jumped = now < self._clock - self.cfg.clock_jump
        if jumped:
            self.clock_note = (f"node clock jumped back {self._clock - now:.3f} s (to {now:.3f} s): stamp "
                               "state reset, waiting for fresh joint states")
            self.stats.clock_resets += 1
            self._last_stamp = -math.inf
            self._gripper_stamp = -math.inf
            self._keepalive_t = -math.inf
            self._q, self._state_t, self._finger = None, None, None
            self.reset()
            self._clock = now
        else:
            self._clock = max(self._clock, now)
        return jumped

    def update_state(self, names, positions, t: float) -> bool:
        """Store a joint-state sample (any order, extra joints ignored). False if arm joints are missing."""
        self.check_clock(t)
        js = read_joint_state(names, positions, self.robot.arm_joints, self.robot.gripper.joint)
        if js.arm is None:
            return False
        self._q, self._state_t = js.arm, float(t)
        if js.finger is not None:
            self._finger = js.finger
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
    def position_band(self) -> tuple[np.ndarray, np.ndarray]:
        """([dof], [dof]) [rad] the joint range the servo plans in: the limits less ``position_margin``."""
        return self._q_lo.copy(), self._q_hi.copy()

    @property
    def target_q(self) -> np.ndarray | None:
        return None if self._target_q is None else self._target_q.copy()

    def _age_ok(self, stamp: float, now: float) -> str:
        kind, age = stamp_age(stamp, now, self.cfg.max_action_age, self.cfg.future_tolerance)  # 0 = "now"
        if kind == "stale":
            return f"stale: action {age:.2f} s old > max_action_age {self.cfg.max_action_age} s"
        if kind == "future":
            return f"future: stamp {-age:.2f} s ahead of the clock"
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
        self.check_clock(now)
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

        qs, info = self.plan_step(start_q, start_pose, dpos, drot)
        self.stats.last_step = info
        if info.fraction < 0.99:
            self.stats.scaled += 1

        if self._segment is not None and now > self._segment.t0 + self._segment.times[-1]:
            self.stats.held_late += 1
        if math.isfinite(self._last_stamp) and stamp != 0.0:
            self.last_spacing = eff_stamp - self._last_stamp
        self._last_stamp = eff_stamp
        # The target is the pose actually reached: a part of the delta that could not be carried out
        # (singularity, joint limit, workspace edge) is dropped, never kept as a runaway target.
        self._target_q = qs[-1].copy()
        self._target_pose = np.asarray(self.kin.fk(self._target_q), dtype=float)
        n = len(qs)
        times = tuple(T * k / n for k in range(1, n + 1))
        self._segment = _Segment(now, times, qs)
        self.stats.applied += 1
        return ServoResult(self._command(times, qs, now), "applied", info)

    # ---------------------------------------------------------------- the velocity-level step
    def plan_step(self, q0, start_pose: np.ndarray, dpos, drot) -> tuple[np.ndarray, StepInfo]:
        """Carry out the TCP delta ``(dpos, drot)`` from ``start_pose`` as far as the arm can in one step.

        The step is split into control cycles (``step_period / control_period``, a multiple of
        ``points``). Each cycle is one damped pseudo-inverse step from ``q`` towards the next point of
        the straight TCP line ``start_pose -> apply_delta(start_pose, dpos, drot)`` (so linearisation
        error is corrected on the way), then scaled as MoveIt Servo does, never refused:

        - singularity: by the Jacobian's condition number (:func:`singularity_scale`), only when the
          cycle heads into the singularity (its condition number after the cycle is higher);
        - joint velocity: uniformly, so no joint exceeds ``velocity_max * joint_velocity_scale`` (and,
          for the FR3, libfranka's position-dependent bounds);
        - joint limits: a joint at the ``position_margin`` band's edge that the step pushes outwards is
          frozen and the cycle re-solved without it; one moving towards the edge stops there.

        Inside ``singular_region`` a part of the twist the Jacobian cannot give at all (lost rank: the
        WidowX's collinear wrist rolls at home) drives a null-space self-motion (the TCP does not move)
        that turns the arm until that part can be given: from there the arm leaves the singularity.

        ``q0`` (n,) [rad] is where the step starts (previous target or measured joints), ``start_pose``
        (4, 4) its TCP pose. Returns the joint positions at the ``points`` output instants
        (points, n) [rad] and a :class:`StepInfo`.
        """
        cfg, rb = self.cfg, self.robot
        q = np.asarray(q0, dtype=float).copy()
        dpos = np.asarray(dpos, dtype=float)
        drot = np.asarray(drot, dtype=float)
        n_pts = cfg.points
        per_pt = max(1, math.ceil(cfg.step_period / cfg.control_period / n_pts - 1e-9))
        n_cyc = n_pts * per_pt
        dt = cfg.step_period / n_cyc
        lo, hi = self._q_lo, self._q_hi
        vmax = rb.velocity_max * cfg.joint_velocity_scale
        out = np.empty((n_pts, q.size))
        worst_kappa, worst_sing, worst_vel, escape_travel = 0.0, 1.0, 1.0, 0.0
        limited_by_joint = False
        for k in range(1, n_cyc + 1):
            ref = apply_delta(start_pose, dpos * (k / n_cyc), drot * (k / n_cyc))
            J, pose = self.kin.jacobian_pose(q)
            e = np.concatenate(pose_error(ref, pose))
            dq, sigma, frozen = self._dls(J, e, q, lo, hi)
            kappa = float(sigma[0] / sigma[-1]) if sigma[-1] > 0 else math.inf
            worst_kappa = max(worst_kappa, kappa)
            limited_by_joint |= bool(frozen.any())
            # singularity: heading into it = the inverse condition number falls over this cycle
            s_sing = 1.0
            if kappa > cfg.lower_singularity_threshold and np.any(dq):
                sig_next = np.linalg.svd(self.kin.jacobian(q + dq), compute_uv=False)
                into = float(sig_next[-1] / sig_next[0]) < float(sigma[-1] / sigma[0]) - 1e-12
                s_sing = singularity_scale(kappa, into, cfg)
            dq = dq * s_sing
            # escape: a self-motion (TCP still, so never slowed as "into") that regains the lost part
            if cfg.singularity_escape and sigma[-1] < cfg.singular_region:
                dn = self._escape(J, e - J @ (dq / max(s_sing, 1e-9)), e, q, dt, frozen)
                if dn is not None:
                    dq = dq + dn
                    escape_travel = max(escape_travel, float(np.abs(dn).max()))
            worst_sing = min(worst_sing, s_sing)
            if np.any(dq):
                q, s_vel, at_limit = self._limit_cycle(q, dq, dt, vmax, lo, hi)
                worst_vel = min(worst_vel, s_vel)
                limited_by_joint |= at_limit
            if k % per_pt == 0:
                out[k // per_pt - 1] = q
        # what was carried out: the reached pose against the commanded one (6-D, rotation weighted)
        goal = apply_delta(start_pose, dpos, drot)
        reached = np.asarray(self.kin.fk(q), dtype=float)
        want = _weighted_norm(dpos, drot)
        miss = _weighted_norm(*pose_error(goal, reached))
        fraction = 1.0 if want < 1e-12 else float(np.clip(1.0 - miss / want, 0.0, 1.0))
        limited = ""
        if fraction < 0.99:
            if worst_sing < 0.99:
                limited = "singularity"
            elif limited_by_joint:
                limited = "joint limit"
            elif worst_vel < 0.99:
                limited = "joint velocity"
            else:
                limited = "unreachable"
        return out, StepInfo(fraction, worst_kappa, worst_sing, worst_vel, limited, escape_travel)

    def _limit_cycle(self, q: np.ndarray, dq: np.ndarray, dt: float, vmax: np.ndarray, lo: np.ndarray,
                     hi: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """Scale one cycle's joint step ``dq`` uniformly (its direction kept) so that no joint exceeds its
        velocity bound and none leaves the band [lo, hi]; returns (new q, velocity scale, band hit)."""
        rb = self.robot
        vlo, vhi = -vmax, vmax
        if rb.position_dependent_velocity is not None:
            vlo, vhi = rb.position_dependent_velocity.bounds(q, vmax)
        v = dq / dt
        up, down = v > 0, v < 0
        ratio = np.full(v.size, np.inf)
        ratio[up] = vhi[up] / v[up]
        ratio[down] = vlo[down] / v[down]
        s_vel = min(1.0, max(0.0, float(ratio.min())))
        # joint-limit band: a joint moving outwards stops at the edge
        step = dq * s_vel
        up, down = step > 0, step < 0
        room = np.full(v.size, np.inf)
        room[up] = np.maximum(hi[up] - q[up], 0.0) / step[up]
        room[down] = np.maximum(q[down] - lo[down], 0.0) / -step[down]
        s_lim = min(1.0, float(room.min()))
        return q + step * s_lim, s_vel, s_lim < 1.0

    def _damped(self, J: np.ndarray, e: np.ndarray, free: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(damped pseudo-inverse of J applied to e (n,), singular values of J (6,)); ``free`` = the
        number of columns not zeroed (frozen joints do not count as a singularity)."""
        U, sigma, Vt = np.linalg.svd(J, full_matrices=False)
        cfg = self.cfg
        s_min = sigma[min(sigma.size, free if free is not None else sigma.size) - 1]
        lam2 = 0.0
        if s_min < cfg.singular_region:
            lam2 = cfg.damping ** 2 * (1.0 - (s_min / cfg.singular_region) ** 2)
        lam2 = max(lam2, 1e-12)  # keeps the step finite when the rank is lost exactly
        return Vt.T @ (sigma / (sigma * sigma + lam2) * (U.T @ e)), sigma

    def _dls(self, J: np.ndarray, e: np.ndarray, q: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        """Damped pseudo-inverse step for the TCP error ``e`` (6,), joints outside the band frozen.

        Returns (dq (n,), singular values of the full J (6,), frozen mask (n,)). The damping ramps in
        as the smallest singular value falls below ``singular_region`` (Nakamura / Maciejewski):
        lambda^2 = damping^2 (1 - (sigma_min / singular_region)^2).
        """
        dq, sigma = self._damped(J, e)
        frozen = np.zeros(q.size, bool)
        for _ in range(q.size):
            push = ((q >= hi - 1e-12) & (dq > 0)) | ((q <= lo + 1e-12) & (dq < 0))
            push &= ~frozen
            if not push.any():
                break
            frozen |= push
            Jw = J.copy()
            Jw[:, frozen] = 0.0
            dq = self._damped(Jw, e, int((~frozen).sum()))[0]
        dq[frozen] = 0.0
        return dq, sigma, frozen

    def _escape(self, J: np.ndarray, r: np.ndarray, e: np.ndarray, q: np.ndarray, dt: float,
                frozen: np.ndarray):
        """Null-space self-motion (n,) for one cycle that makes the lost part ``r`` (6,) of the twist
        reachable, or None.

        Candidates are the right singular vectors whose singular value is below ``singular_region``
        (self-motions: the TCP stays put to first order). For each, the change of J along it (central
        difference) shows how fast the direction of ``r`` becomes reachable; the best one is followed at
        ``escape_velocity``. Only while ``r`` is a real part of the command (> 5 % of the TCP error).
        """
        cfg = self.cfg
        rn = float(np.linalg.norm(r))
        if rn < 1e-9 or rn < 0.05 * float(np.linalg.norm(e)) or cfg.escape_velocity <= 0.0:
            return None
        _, sig, Vt = np.linalg.svd(J)
        cand = [i for i in range(Vt.shape[0]) if i >= sig.size or sig[i] < cfg.singular_region]
        r_hat = r / rn
        best, best_gain = None, 1e-6
        h = 1e-4
        for i in cand:
            nv = Vt[i].copy()
            nv[frozen] = 0.0
            if not np.any(nv):
                continue
            nv /= np.linalg.norm(nv)
            G = (self.kin.jacobian(q + h * nv) - self.kin.jacobian(q - h * nv)) / (2 * h)
            a = r_hat @ G  # (n,) growth of the reachable rate along r per radian of self-motion
            gain = float(np.linalg.norm(a))
            if gain > best_gain:
                # the sign that makes r more reachable (at an exact singularity both do: take +)
                grow = float((r_hat @ J) @ a)
                best, best_gain = (math.copysign(1.0, grow) if abs(grow) > 1e-9 else 1.0) * nv, gain
        if best is None:
            return None
        return best * (cfg.escape_velocity * dt / float(np.abs(best).max()))

    def on_gripper(self, value: float, stamp: float, now: float) -> ServoResult:
        """Set the gripper (0 closed ... 1 open). Re-sends the current step with the new finger value.

        The arm part is unchanged: the remainder of the running step, or (no step running) the last
        target / measured position over one step period.
        """
        self.check_clock(now)
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
        self.check_clock(now)
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
