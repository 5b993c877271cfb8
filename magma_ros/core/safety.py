"""Safety filter: every joint command passes through here before it reaches a controller.

A pure, ROS-free state machine (numpy only). The node (``magma_ros.nodes.safety``) feeds it joint
states, commands, e-stop / reset / resume requests and calls :meth:`SafetyFilter.step` at a fixed
``output_rate``; each step returns the next position to reach one output period ``dt`` later.

Guarantees, for every output relative to the previous one (``v = dq/dt``, ``a = dv/dt``,
``j = da/dt``, starting from rest at the measured position):

- position inside ``[position_min + margin, position_max - margin]`` (a start outside that band may
  only move back towards it);
- ``|v| <= velocity_max * velocity_scale`` and, for FR3, inside libfranka's position-dependent
  bounds evaluated at the previous output;
- ``|a| <= acceleration_max * acceleration_scale``; ``|j| <= jerk_max * jerk_scale`` where the robot
  publishes one (the output rate is checked to be low enough for the acceleration bound to imply it);
- every state keeps a stopping distance: at full deceleration the arm stops inside the band.

A command that already satisfies the limits passes through unchanged (its linear interpolation
sampled at the output instants). One that does not is slowed down *along its direction* (uniform
scaling of the joint velocity vector; the path keeps its shape) and approaches its end point so that
it can stop there without overshoot.

State machine (``state``)::

    waiting --fresh joint states--> holding:waiting for command --valid command--> ok
    ok --no valid command for command_timeout--> holding:command timeout | holding:teleop timeout
    ok/holding --joint states older than state_timeout--> holding:stale joint states
    any --estop--> stopping --standstill--> estopped --reset (fresh joint states)--> holding:reset

Sources (``source``): ``policy``, ``teleop`` or ``hold``. A fresh teleop command preempts the policy
at once; once teleop has driven, the policy is ignored until :meth:`resume_policy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from magma_ros.core.errors import ConfigError, choose
from magma_ros.core.robot import NORMALIZED_GRIPPER, RobotConfig

SOURCES = ("policy", "teleop")
CONTROLLERS = ("jtc", "forward", "isaac")
GRIPPER_OUTPUTS = ("auto", "jtc", "franka", "none")

# Diagnostic levels (same numbers as diagnostic_msgs/DiagnosticStatus).
OK, WARN, ERROR = 0, 1, 2

_EPS = 1e-12


@dataclass(frozen=True)
class SafetyConfig:
    """Parameters of the safety node (ROS parameters of the same names; see config/safety.yaml)."""

    robot: str = "fr3"  # fr3 | panda | wx250s, or a path to a robot YAML
    controller: str = "jtc"  # jtc | forward | isaac: which controller interface receives the output
    gripper_output: str = "auto"  # auto (isaac: in joint_command, else jtc) | jtc | franka | none
    output_rate: float = 100.0  # [Hz] fixed output rate; every limit is checked over dt = 1/output_rate
    position_margin: float = 0.05  # [rad] outputs stay this far inside the robot's position limits
    velocity_scale: float = 1.0  # (0, 1] fraction of the robot's velocity limits that may be used
    acceleration_scale: float = 1.0  # (0, 1] fraction of the robot's acceleration limits
    jerk_scale: float = 1.0  # (0, 1] fraction of the robot's jerk limits (where published)
    max_step: float = 0.5  # [rad] largest joint change a command may ask for between consecutive
    #                         points (the first from the current output); larger ones scale the whole
    #                         command towards the current output (LeRobot's max_relative_target); 0 = off
    command_timeout: float = 0.5  # [s] no valid command for this long -> hold; older stamps rejected
    future_tolerance: float = 0.05  # [s] command stamps further in the future are rejected
    state_timeout: float = 0.2  # [s] joint states older than this -> hold and report
    workspace_enabled: bool = False  # check the TCP against the box and minimum height below
    workspace_min: tuple[float, ...] = (-1.0, -1.0, -1.0)  # [m] TCP box corner, robot base frame
    workspace_max: tuple[float, ...] = (1.0, 1.0, 2.0)  # [m] TCP box corner, robot base frame
    min_tcp_height: float = 0.0  # [m] lowest allowed TCP z in the base frame (when enabled)
    jtc_braking_tail: bool = True  # jtc: append a braking-to-standstill tail to every message

    def validate(self) -> SafetyConfig:
        """Raise ConfigError on a bad value; return self."""
        choose(self.controller, CONTROLLERS, "controller")
        choose(self.gripper_output, GRIPPER_OUTPUTS, "gripper_output")
        for name in ("output_rate", "command_timeout", "state_timeout"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"safety: '{name}' must be a positive number, got {v}")
        for name in ("velocity_scale", "acceleration_scale", "jerk_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0 < v <= 1):
                raise ConfigError(f"safety: '{name}' must be in (0, 1], got {v}")
        for name in ("position_margin", "max_step", "future_tolerance"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"safety: '{name}' must be >= 0, got {v}")
        if self.workspace_enabled:
            lo, hi = np.asarray(self.workspace_min, float), np.asarray(self.workspace_max, float)
            if lo.shape != (3,) or hi.shape != (3,) or not np.all(lo < hi):
                raise ConfigError("safety: workspace_min/max need 3 values each with min < max")
        return self


@dataclass(frozen=True)
class Verdict:
    """What happened to one incoming command."""

    accepted: bool  # True: stored as the active command of its source
    reason: str = ""  # why rejected / ignored, or a note ("clamped to position limits")


@dataclass(frozen=True)
class Output:
    """One output step. Arrays are in ``robot.arm_joints`` order."""

    positions: np.ndarray  # [dof] rad, to be reached one period after the step time
    velocities: np.ndarray  # [dof] rad/s, (positions - previous positions) / dt
    gripper: float | None  # finger position [m]; None while unknown (no state, no command)
    gripper_changed: bool  # the gripper output moved this step (or got its first value)


@dataclass(frozen=True)
class Status:
    """Summary for /safety/state, /safety/source and /diagnostics."""

    state: str  # waiting | ok | holding:<reason> | stopping | estopped
    source: str  # policy | teleop | hold
    level: int  # OK / WARN / ERROR
    message: str  # human-readable reason


@dataclass
class _Command:
    source: str
    times: np.ndarray  # [P+1] absolute times; times[0] is the anchor (receipt / start)
    points: np.ndarray  # [P+1, dof]; points[0] is the output position at receipt
    received: float  # receipt time [s]
    turns: np.ndarray = None  # [P, dof] per segment: where each joint next stops or reverses

    def __post_init__(self):
        # A joint must be able to stop where its piecewise-linear path reverses (or ends).
        d = np.sign(np.diff(self.points, axis=0))  # [S, dof] direction per segment
        S = d.shape[0]
        brk = np.broadcast_to(np.arange(S)[:, None], d.shape).copy()  # segment k ends at a stop/turn
        same = np.zeros(d.shape, bool)
        same[:-1] = (d[:-1] == d[1:]) & (d[:-1] != 0)
        brk[same] = S
        nxt = np.minimum.accumulate(brk[::-1], axis=0)[::-1]  # [S, dof] next segment that ends there
        self.turns = np.take_along_axis(self.points, nxt + 1, axis=0)  # [S, dof]

    def segment(self, t: float) -> int:
        """Index k of the segment [times[k], times[k+1]) containing t (clamped)."""
        i = int(np.searchsorted(self.times, t, side="right"))
        return min(max(i - 1, 0), len(self.times) - 2)

    def at(self, t: float) -> np.ndarray:
        """Piecewise-linear interpolation (held constant after the last point)."""
        ts = self.times
        if t >= ts[-1]:
            return self.points[-1]
        if t <= ts[0]:
            return self.points[0]
        i = int(np.searchsorted(ts, t, side="right"))  # ts[i-1] <= t < ts[i]
        f = (t - ts[i - 1]) / (ts[i] - ts[i - 1])
        if f <= 0.0:
            return self.points[i - 1]
        return self.points[i - 1] + f * (self.points[i] - self.points[i - 1])


def brake_speed(d: np.ndarray, a: np.ndarray, dt: float) -> np.ndarray:
    """Largest speed v >= 0 such that moving ``v*dt`` now and then braking by ``a*dt`` per step
    (the last step to exactly zero) travels at most ``d`` in total. Exact for the discrete motion.

    With u = v/(a dt), n = floor(u): distance/(a dt^2) = (n+1)(u - n/2).
    """
    d = np.maximum(d, 0.0)
    delta = d / (a * dt * dt)
    n = np.floor((np.sqrt(1.0 + 8.0 * delta) - 1.0) / 2.0)
    u = delta / (n + 1.0) + n / 2.0
    return u * a * dt


class SafetyFilter:
    """Pure safety state machine; see the module docstring for the rules."""

    def __init__(self, robot: RobotConfig, config: SafetyConfig | None = None,
                 fk: Callable[[np.ndarray], np.ndarray] | None = None):
        self.robot = robot
        self.cfg = cfg = (config or SafetyConfig()).validate()
        self.dt = 1.0 / cfg.output_rate
        n = robot.dof
        self.q_lo = robot.position_min + cfg.position_margin  # [dof] rad
        self.q_hi = robot.position_max - cfg.position_margin
        if not np.all(self.q_lo < self.q_hi):
            raise ConfigError(f"safety: position_margin {cfg.position_margin} leaves no room for "
                              f"{robot.name}")
        self.v_max = robot.velocity_max * cfg.velocity_scale  # [dof] rad/s
        self.a_max = robot.acceleration_max * cfg.acceleration_scale  # [dof] rad/s^2
        self.j_max = None if robot.jerk_max is None else robot.jerk_max * cfg.jerk_scale  # [dof] rad/s^3
        if np.any(self.v_max <= 0) or np.any(self.a_max <= 0):
            raise ConfigError(f"safety: {robot.name} needs positive velocity and acceleration limits")
        if self.j_max is not None:
            # With |a| <= A on both sides, |da| <= 2A per step; the jerk bound J holds when 2A/dt <= J.
            rate_max = float(np.min(self.j_max / (2.0 * self.a_max)))
            if cfg.output_rate > rate_max + 1e-9:
                raise ConfigError(f"safety: output_rate {cfg.output_rate:g} Hz is too high for "
                                  f"{robot.name}'s jerk limits; use at most {rate_max:g} Hz")
        self.pdv = robot.position_dependent_velocity
        self.index = {j: i for i, j in enumerate(robot.arm_joints)}
        g = robot.gripper
        self.gripper_names = {g.joint, NORMALIZED_GRIPPER}
        self.ignored_names = set(g.mimic_joints)
        self._known = set(self.index) | self.gripper_names | self.ignored_names
        self._fk = None  # TCP pose (4, 4) in the base frame from q; only with the workspace check
        if cfg.workspace_enabled:
            if fk is None:
                from magma_ros.core.kinematics import Kinematics  # lazy: pinocchio only when needed

                fk = Kinematics(robot).fk
            self._fk = fk
        self._ws_lo = np.asarray(cfg.workspace_min, float)
        self._ws_hi = np.asarray(cfg.workspace_max, float)
        self._ws_lo[2] = max(self._ws_lo[2], cfg.min_tcp_height)

        # measured state
        self.measured: np.ndarray | None = None  # [dof] rad
        self.measured_t = -math.inf
        self.measured_gripper: float | None = None
        # output state (the trajectory we command)
        self.q = np.zeros(n)  # [dof] last output position
        self.v = np.zeros(n)  # [dof] last output velocity
        self.a = np.zeros(n)  # [dof] last output acceleration
        self.g: float | None = None  # last gripper output [m]
        self.g_target: float | None = None
        self.initialized = False
        # control state
        self.estopped = False
        self.policy_enabled = True
        self.active: _Command | None = None
        self.last_valid = {s: -math.inf for s in SOURCES}
        self.hold_reason = "waiting for command"
        self.holding = True
        self.last_rejection = ""
        self.infeasible_steps = 0  # steps where the limit box was empty (should stay 0)
        self._t_last = -math.inf  # time of the last step (detects a clock jumping back)

    # ----------------------------------------------------------------------------------------- inputs
    def on_joint_state(self, names: Sequence[str], positions: Sequence[float], t: float) -> str:
        """Measured joint state (any order, extra joints allowed). Returns '' or why it was ignored."""
        names = list(names)
        try:
            pos = np.asarray(positions, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            return self._reject_state("joint state positions are not numbers")
        if len(names) != pos.size:
            return self._reject_state(f"joint state has {len(names)} names but {pos.size} positions")
        idx = {str(nm): i for i, nm in enumerate(names)}
        gj = self.robot.gripper.joint
        if gj in idx and math.isfinite(pos[idx[gj]]):
            self.measured_gripper = float(pos[idx[gj]])
        if not any(j in idx for j in self.robot.arm_joints):
            return ""  # e.g. a gripper-only joint state
        missing = [j for j in self.robot.arm_joints if j not in idx]
        if missing:
            return self._reject_state(f"joint state misses {', '.join(missing)}")
        q = pos[[idx[j] for j in self.robot.arm_joints]]
        if not np.all(np.isfinite(q)):
            return self._reject_state("joint state has NaN/inf")
        self.measured = q
        self.measured_t = float(t)
        return ""

    def _reject_state(self, reason: str) -> str:
        self.last_rejection = reason
        return reason

    def on_command(self, source: str, names: Sequence[str], positions, times, stamp: float,
                   t: float) -> Verdict:
        """A JointTrajectory from ``source`` (policy | teleop): joint names, positions [P][J],
        time_from_start [P] (s), header stamp (s, 0 = now) and the current time ``t``."""
        v = self._check_command(source, names, positions, times, stamp, t)
        if not v.accepted:
            self.last_rejection = v.reason
        return v

    def _check_command(self, source, names, positions, times, stamp, t) -> Verdict:
        if source not in SOURCES:
            return Verdict(False, f"unknown source '{source}'")
        if self.estopped:
            return Verdict(False, "e-stop latched: command ignored until safety/reset")
        if not self.initialized:
            return Verdict(False, "no joint states yet: command ignored")
        names = [str(x) for x in names]
        col = {x: i for i, x in enumerate(names)}
        if len(col) != len(names):
            return Verdict(False, "duplicate joint names")
        unknown = [x for x in names if x not in self._known]
        if unknown:
            return Verdict(False, f"unknown joints: {', '.join(unknown)}")
        missing = [j for j in self.robot.arm_joints if j not in col]
        if missing:
            return Verdict(False, f"missing joints: {', '.join(missing)}")
        if NORMALIZED_GRIPPER in col and self.robot.gripper.joint in col:
            return Verdict(False, f"both {NORMALIZED_GRIPPER} and {self.robot.gripper.joint} given")
        try:
            ts = np.asarray(times, dtype=float).reshape(-1)
            stamp = float(stamp)
            P = np.asarray(positions, dtype=float)  # [P, J]
        except ValueError:  # ragged (inhomogeneous) or not numbers
            return Verdict(False, f"wrong number of positions (expected {len(names)} per point) "
                                  "or not numbers")
        except TypeError:
            return Verdict(False, "positions/times are not numbers")
        if P.size == 0:
            return Verdict(False, "empty trajectory")
        if P.ndim != 2 or P.shape[1] != len(names):
            return Verdict(False, f"wrong number of positions (expected {len(names)} per point)")
        if ts.size != P.shape[0]:
            return Verdict(False, f"{P.shape[0]} points but {ts.size} times")
        if not (np.isfinite(P).all() and np.isfinite(ts).all() and math.isfinite(stamp)):
            return Verdict(False, "NaN/inf in command")
        if ts[0] < 0 or (ts.size > 1 and (ts[1:] <= ts[:-1]).any()):
            return Verdict(False, "time_from_start must be >= 0 and strictly increasing")
        if stamp == 0.0:
            stamp = t
        if t - stamp > self.cfg.command_timeout:
            return Verdict(False, f"stale command (stamp {t - stamp:.3f} s old)")
        if stamp - t > self.cfg.future_tolerance:
            return Verdict(False, f"command stamp {stamp - t:.3f} s in the future")
        # priority
        if source == "policy":
            if self._teleop_fresh(t):
                return Verdict(False, "teleop has priority: policy command ignored")
            if not self.policy_enabled:
                return Verdict(False, "policy disabled since teleop took over: call safety/resume_policy")
        cols = [col[j] for j in self.robot.arm_joints]
        arm = P[:, cols]  # [P, dof] arm_joints order
        note = ""
        clamped = np.clip(arm, self.q_lo, self.q_hi)
        if not np.array_equal(clamped, arm):
            note = "clamped to position limits"
            arm = clamped
        if self.cfg.max_step > 0:  # largest joint change from the current output / between points
            jump = float(np.max(np.abs(np.diff(np.concatenate((self.q[None], arm)), axis=0))))
            if jump > self.cfg.max_step:
                arm = self.q + (arm - self.q) * (self.cfg.max_step / jump)
                note = "; ".join(x for x in (note, f"jump {jump:.3f} rad scaled to max_step") if x)
        if self.cfg.workspace_enabled:
            for p in arm:
                viol = self._ws_violation(p)
                if viol > 0 and viol >= self._ws_violation(self.q) - 1e-9:
                    return Verdict(False, f"TCP target outside the workspace by {viol:.3f} m")
        # gripper
        g = self.robot.gripper
        if NORMALIZED_GRIPPER in col:
            self.g_target = g.from_normalized(float(P[-1, col[NORMALIZED_GRIPPER]]))
        elif g.joint in col:
            self.g_target = float(np.clip(P[-1, col[g.joint]], g.low, g.high))
        # store (anchored at the current output, JTC style: start from the current state)
        start = max(stamp, t)
        abs_t = stamp + ts
        keep = abs_t > start
        if not np.any(keep):
            keep[-1] = True
            abs_t = abs_t.copy()
            abs_t[-1] = start
        times_all = np.concatenate(([start], abs_t[keep]))
        pts_all = np.concatenate((self.q[None], arm[keep]), axis=0)
        if times_all[-1] <= times_all[0]:  # everything already due: go straight to the last point
            times_all = np.array([start, start + _EPS])
            pts_all = np.stack([self.q, arm[-1]])
        self.active = _Command(source, times_all, pts_all, float(t))
        self.last_valid[source] = float(t)
        if source == "teleop":
            self.policy_enabled = False
        self.holding = False
        return Verdict(True, note)

    def _teleop_fresh(self, t: float) -> bool:
        return t - self.last_valid["teleop"] <= self.cfg.command_timeout

    def estop(self, t: float) -> None:
        """Latch the e-stop: stop following commands now, decelerate, hold."""
        self.estopped = True
        self.active = None
        if self.g is not None:
            self.g_target = self.g

    def reset(self, t: float) -> tuple[bool, str]:
        """Release the e-stop (needs fresh joint states); motion restarts from the measured position."""
        if not self.estopped:
            return True, "not e-stopped: nothing to reset"
        if not self._state_fresh(t):
            return False, "joint states are not fresh: cannot reset"
        self.estopped = False
        self._init_from_measured()
        self.hold_reason = "reset, waiting for command"
        return True, "e-stop released; holding at the measured position until a valid command"

    def resume_policy(self, t: float) -> tuple[bool, str]:
        """Explicit hand-back to the policy."""
        if self.estopped:
            return False, "e-stop latched: call safety/reset first"
        if self._teleop_fresh(t):
            return False, "teleop is driving: let it go silent first"
        self.policy_enabled = True
        return True, "policy may drive again (from its next valid command)"

    # ----------------------------------------------------------------------------------------- output
    def _state_fresh(self, t: float) -> bool:
        return self.measured is not None and t - self.measured_t <= self.cfg.state_timeout

    def _init_from_measured(self) -> None:
        self.q = self.measured.copy()
        self.v = np.zeros_like(self.q)
        self.a = np.zeros_like(self.q)
        self.active = None
        self.holding = True
        if self.measured_gripper is not None:
            g = self.robot.gripper
            self.g = float(np.clip(self.measured_gripper, g.low, g.high))
        self.g_target = self.g
        self.initialized = True

    def step(self, t: float) -> Output | None:
        """Next output at time ``t`` (position to reach at ``t + dt``), or None before joint states."""
        if t < self._t_last - 1e-6:  # the clock jumped back (simulation reset): nothing is fresh
            self.measured_t = -math.inf
            self.last_valid = {s: -math.inf for s in SOURCES}
        self._t_last = t
        if not self.initialized:
            if not self._state_fresh(t):
                return None
            self._init_from_measured()
            self.hold_reason = "waiting for command"
        if not self.estopped:
            if not self._state_fresh(t):
                self._hold("stale joint states")
            elif (self.active is not None
                  and t - self.last_valid[self.active.source] > self.cfg.command_timeout):
                self._hold("teleop timeout" if self.active.source == "teleop" else "command timeout")
        if self.estopped or self.active is None:
            v_new = self._limit(np.zeros_like(self.v), None)  # controlled stop, then hold still
        else:
            v_new = self._follow(self.active, t)
        q_new = self._q_next
        if self._fk is not None and not self.estopped and self.active is not None:
            if not self._ws_ok(q_new, v_new):
                self._hold("workspace")
                v_new = self._limit(np.zeros_like(self.v), None)
                q_new = self._q_next
        self.a = (v_new - self.v) / self.dt
        self.v = v_new
        self.q = q_new
        # gripper
        changed = False
        if self.g is None and self.g_target is not None:
            self.g = self.g_target
            changed = True
        elif self.g is not None and self.g_target is not None and self.g != self.g_target:
            step = self.robot.gripper.velocity_max * self.dt
            self.g = float(self.g + np.clip(self.g_target - self.g, -step, step))
            changed = True
        return Output(self.q.copy(), self.v.copy(), self.g, changed)

    def _hold(self, reason: str) -> None:
        if not self.holding or self.hold_reason != reason:
            self.hold_reason = reason
        self.holding = True
        self.active = None
        if self.g is not None:
            self.g_target = self.g

    # --------------------------------------------------------------------------------- limiter math
    def _vel_bounds(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = -self.v_max, self.v_max
        if self.pdv is not None:
            plo, phi = self.pdv.bounds(q, self.v_max)
            lo, hi = np.maximum(lo, plo), np.minimum(hi, phi)
        return lo, hi

    def _box(self, q, v, a) -> tuple[np.ndarray, np.ndarray]:
        """Per-joint interval [lo, hi] of admissible next velocities."""
        dt, A = self.dt, self.a_max
        vlo, vhi = self._vel_bounds(q)
        lo = np.maximum(v - A * dt, vlo)
        hi = np.minimum(v + A * dt, vhi)
        if self.j_max is not None:
            lo = np.maximum(lo, v + a * dt - self.j_max * dt * dt)
            hi = np.minimum(hi, v + a * dt + self.j_max * dt * dt)
        # room above / below (0 when outside the band: never further out)
        room = np.concatenate((np.maximum(self.q_hi, q) - q, q - np.minimum(self.q_lo, q)))
        bs = brake_speed(room, np.concatenate((A, A)), dt)
        n = q.size
        return np.maximum(lo, -bs[n:]), np.minimum(hi, bs[:n])

    def _limit(self, v_c: np.ndarray, q_target: np.ndarray | None, q=None, v=None, a=None,
               box=None) -> np.ndarray:
        """Admissible next velocity closest to ``v_c`` along the segment from the current velocity.

        Sets ``self._q_next`` (the next position); if ``v_c`` is admissible and came from
        ``q_target``, the next position is exactly ``q_target`` (pass-through).
        """
        q = self.q if q is None else q
        v = self.v if v is None else v
        a = self.a if a is None else a
        lo, hi = self._box(q, v, a) if box is None else box
        if np.all(v_c >= lo) and np.all(v_c <= hi):
            self._q_next = q_target.copy() if q_target is not None else q + v_c * self.dt
            if q_target is not None:
                return (self._q_next - q) / self.dt
            return v_c
        w = v_c - v
        with np.errstate(divide="ignore", invalid="ignore"):
            r_hi = np.where(w > 0, (hi - v) / w, np.where(w < 0, (lo - v) / w, np.inf))
            r_lo = np.where(w > 0, (lo - v) / w, np.where(w < 0, (hi - v) / w, -np.inf))
        still = w == 0
        ok_still = np.all((v[still] >= lo[still] - _EPS) & (v[still] <= hi[still] + _EPS))
        r_max = min(1.0, float(np.min(r_hi)))
        r_min = max(0.0, float(np.max(r_lo)))
        if ok_still and r_min <= r_max:
            v_new = v + r_max * w
            v_new = np.clip(v_new, lo, hi)  # remove rounding
        else:
            if np.any(lo > hi + _EPS):
                self.infeasible_steps += 1
                # priority: stopping distance / position and velocity over acceleration
                vlo, vhi = self._vel_bounds(q)
                up = np.maximum(self.q_hi, q) - q
                dn = q - np.minimum(self.q_lo, q)
                slo = np.maximum(vlo, -brake_speed(dn, self.a_max, self.dt))
                shi = np.minimum(vhi, brake_speed(up, self.a_max, self.dt))
                v_new = np.clip(np.clip(v_c, v - self.a_max * self.dt, v + self.a_max * self.dt), slo, shi)
            else:
                v_new = np.clip(v_c, lo, hi)
        self._q_next = q + v_new * self.dt
        return v_new

    def _follow(self, cmd: _Command, t: float) -> np.ndarray:
        """Velocity for the next step while following ``cmd``."""
        dt = self.dt
        q_des = cmd.at(t + dt)
        v_track = (q_des - self.q) / dt
        # each joint must be able to stop where its path next reverses or ends
        e = cmd.turns[cmd.segment(t + dt)] - self.q
        stop = brake_speed(np.abs(e), self.a_max, dt)
        toward = (np.sign(v_track) == np.sign(e)) & (v_track != 0)
        lo, hi = self._box(self.q, self.v, self.a)
        if (np.all(v_track >= lo) and np.all(v_track <= hi)
                and np.all(~toward | (np.abs(v_track) <= stop * (1 + 1e-9) + 1e-12))):
            return self._limit(v_track, q_des, box=(lo, hi))  # in limits: pass through unchanged
        # catch-up: scale along the direction for the velocity bounds and for stopping in time
        vlo, vhi = self._vel_bounds(self.q)
        with np.errstate(divide="ignore", invalid="ignore"):
            cap = np.where(v_track > 0, vhi / v_track, np.where(v_track < 0, vlo / v_track, np.inf))
            cap2 = np.where(toward, stop / np.abs(v_track), np.inf)
        s = min(1.0, float(np.min(cap)), float(np.min(cap2)))
        return self._limit(v_track * max(s, 0.0), None, box=(lo, hi))

    def braking_tail(self, max_points: int = 200) -> np.ndarray:
        """Positions [n, dof] of a controlled stop from the current output state (not applied).

        Used for JTC streaming: each message carries the next point plus this tail, so a late
        message never makes the controller stop abruptly at the end of its trajectory. The stop is
        the same as the filter's own (uniform deceleration along the direction of motion); near a
        limit, where that would not do, it is computed step by step by the limiter.
        """
        speed = np.abs(self.v)
        if np.all(speed < 1e-9):
            return np.zeros((0, self.robot.dof))
        dt = self.dt
        r = float(np.min(self.a_max * dt / np.maximum(speed, 1e-300)))  # fraction of v shed per step
        n = min(max_points, math.ceil(1.0 / r - 1e-9))
        scale = np.maximum(0.0, 1.0 - r * np.arange(1, n + 1))  # [n]
        V = scale[:, None] * self.v  # [n, dof]
        Q = self.q + np.cumsum(V * dt, axis=0)  # [n, dof]
        prev = np.vstack((self.q, Q[:-1]))
        lo = np.minimum(self.q_lo, self.q) - 1e-12
        hi = np.maximum(self.q_hi, self.q) + 1e-12
        ok = bool(np.all(Q >= lo) and np.all(Q <= hi))
        if ok and self.pdv is not None:
            vlo, vhi = self.pdv.bounds(prev, self.v_max)
            ok = bool(np.all(V >= vlo - 1e-12) and np.all(V <= vhi + 1e-12))
        if ok and self.j_max is not None:
            a0 = (V[0] - self.v) / dt
            ok = bool(np.all(np.abs(a0 - self.a) <= self.j_max * dt * (1 + 1e-9)))
        if ok:
            return Q
        return self._braking_tail_exact(max_points)

    def _braking_tail_exact(self, max_points: int) -> np.ndarray:
        q, v, a = self.q.copy(), self.v.copy(), self.a.copy()
        out = []
        saved = getattr(self, "_q_next", None)
        for _ in range(max_points):
            if np.all(np.abs(v) < 1e-9):
                break
            v_new = self._limit(np.zeros_like(v), None, q, v, a)
            q_new = self._q_next
            a = (v_new - v) / self.dt
            v, q = v_new, q_new
            out.append(q)
        self._q_next = saved
        return np.array(out).reshape(-1, self.robot.dof)

    # ---------------------------------------------------------------------------------- workspace
    def _ws_violation(self, q: np.ndarray) -> float:
        if self._fk is None:
            return 0.0
        p = np.asarray(self._fk(q), float)[:3, 3]
        return float(np.max(np.concatenate([self._ws_lo - p, p - self._ws_hi, [0.0]])))

    def _ws_ok(self, q_new: np.ndarray, v_new: np.ndarray) -> bool:
        """The stopping point of a controlled stop from (q_new, v_new) must be inside the box
        (or closer to it than the current position is)."""
        speed = np.abs(v_new)
        if np.all(speed < 1e-12):
            q_stop = q_new
        else:
            r = float(np.min(self.a_max * self.dt / np.maximum(speed, 1e-12)))
            n_steps = math.ceil(1.0 / min(r, 1.0))
            q_stop = q_new + v_new * self.dt * (n_steps + 1) / 2.0
        viol = self._ws_violation(q_stop)
        return viol <= 0 or viol < self._ws_violation(self.q) - 1e-9

    # ------------------------------------------------------------------------------------- status
    @property
    def source(self) -> str:
        if self.estopped or not self.initialized or self.holding or self.active is None:
            return "hold"
        return self.active.source

    def status(self) -> Status:
        """Current state, source and diagnostic level."""
        if self.estopped:
            moving = bool(np.any(np.abs(self.v) > 1e-9))
            st = "stopping" if moving else "estopped"
            return Status(st, "hold", ERROR, "e-stop latched" + (": decelerating" if moving else ""))
        if not self.initialized:
            return Status("waiting", "hold", WARN, "waiting for fresh joint states")
        if self.holding or self.active is None:
            lvl = OK if self.hold_reason in ("waiting for command", "reset, waiting for command") else WARN
            return Status(f"holding:{self.hold_reason}", "hold", lvl, f"holding: {self.hold_reason}")
        return Status("ok", self.active.source, OK, f"following {self.active.source}")


@dataclass
class LimitChecker:
    """Independent check of an output stream against a robot's limits (tests, benchmark, fuzz).

    Limits are recomputed here from the robot description and the config (not taken from the
    filter's own arrays). Feed outputs in order with :meth:`check`; call :meth:`restart` where the
    stream legitimately restarts at rest from the measured position (start-up, reset).
    """

    filt: SafetyFilter  # only its robot, config and period are used
    tol: float = 1e-7  # relative tolerance for floating-point rounding (negative: demand slack)
    violations: list = field(default_factory=list)

    def __post_init__(self):
        r, c = self.filt.robot, self.filt.cfg
        self.dt = 1.0 / c.output_rate
        self.q_lo = r.position_min + c.position_margin
        self.q_hi = r.position_max - c.position_margin
        self.v_max = r.velocity_max * c.velocity_scale
        self.a_max = r.acceleration_max * c.acceleration_scale
        self.j_max = None if r.jerk_max is None else r.jerk_max * c.jerk_scale
        self.pdv = r.position_dependent_velocity
        self.q = self.v = self.a = None

    def restart(self, q: np.ndarray) -> None:
        self.q = np.asarray(q, float).copy()
        self.v = np.zeros_like(self.q)
        self.a = np.zeros_like(self.q)

    def check(self, q_new: np.ndarray) -> list[str]:
        """Check the next output; returns (and records) what it violates."""
        dt, tol = self.dt, self.tol
        bad = []
        q_new = np.asarray(q_new, float)
        lo = np.minimum(self.q_lo, self.q) - 1e-9  # outside the band (start-up): never further out
        hi = np.maximum(self.q_hi, self.q) + 1e-9
        if np.any(q_new < lo) or np.any(q_new > hi):
            bad.append(f"position {q_new} outside [{self.q_lo}, {self.q_hi}]")
        v = (q_new - self.q) / dt
        vlo, vhi = -self.v_max, self.v_max
        if self.pdv is not None:  # libfranka's bounds at the previous output
            plo, phi = self.pdv.bounds(self.q, self.v_max)
            vlo, vhi = np.maximum(vlo, plo), np.minimum(vhi, phi)
        if np.any(v > vhi * (1 + tol) + 1e-9) or np.any(v < vlo * (1 + tol) - 1e-9):
            bad.append(f"velocity {v} outside [{vlo}, {vhi}]")
        a = (v - self.v) / dt
        if np.any(np.abs(a) > self.a_max * (1 + tol) + 1e-6):
            bad.append(f"acceleration {a} beyond {self.a_max}")
        if self.j_max is not None:
            j = (a - self.a) / dt
            if np.any(np.abs(j) > self.j_max * (1 + tol) + 1e-3):
                bad.append(f"jerk {j} beyond {self.j_max}")
        self.q, self.v, self.a = q_new, v, a
        self.violations.extend(bad)
        return bad
