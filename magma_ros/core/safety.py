"""Safety filter: every joint command passes through here before it reaches a controller.

A pure, ROS-free state machine (numpy only). The node (``magma_ros.nodes.safety``) feeds it joint
states, commands, e-stop / reset / resume requests and calls :meth:`SafetyFilter.step` from its
output timer; each step returns the position to reach one output period ``dt`` after the step time.

Time is **real elapsed time** (the node clock), never the nominal period: the path the controller
executes is made of straight pieces, and for every piece (duration ``d``, velocity ``v``) and every
knot where the velocity changes (by ``Δv``, ``w`` = time since the previous change, capped at ``dt``):

- position inside ``[position_min + margin, position_max - margin]`` (a start outside that band may
  only move back towards it);
- ``|v| <= velocity_max * velocity_scale`` and, for FR3, inside libfranka's position-dependent
  bounds at the piece's start;
- ``|Δv| <= acceleration_max * acceleration_scale * w``; ``|Δa| <= jerk_max * jerk_scale * w`` where
  the robot publishes one (at the nominal rate the acceleration bound implies it);
- every state keeps a stopping distance: at full deceleration the arm stops inside the band.

Which path the controller executes depends on the interface (``controller``):

- ``jtc``: each message (stamped with the step time, or zero) starts where the previous message's
  path is at that time, reaches its first point ``dt`` later and then follows the braking tail
  (one period at the same velocity, then a uniform stop). The filter samples its own last message at
  the step time, so a late or early step continues exactly what the controller is doing.
- ``forward`` / ``isaac``: output ``k`` is a set-point to reach at ``t_k + dt``; pieces join
  consecutive set-points. A gap longer than ``max_output_gap`` is an interruption (the controller
  held its last set-point): the filter restarts at rest there.

The independent oracle for all of this is :class:`magma_ros.core.limit_audit.LimitAudit`.

A command that already satisfies the limits passes through unchanged (its linear interpolation
sampled at the output instants). One that does not is slowed down *along its direction* (uniform
scaling of the joint velocity vector; the path keeps its shape) and approaches its end point so that
it can stop there without overshoot.

State machine (``state``)::

    waiting --fresh joint states--> holding:waiting for command --valid command--> ok
    ok --no valid command for command_timeout--> holding:command timeout | holding:teleop timeout
    ok/holding --joint states older than state_timeout--> holding:stale joint states
    any --measured arm off its command--> holding:following error --resume--> holding:waiting for command
    any --estop--> stopping --standstill--> estopped --reset (still, fresh)--> holding:reset, waiting for resume
    holding:reset, waiting for resume --resume_policy | a new teleop command--> ...

Sources (``source``): ``policy``, ``teleop`` or ``hold``. A fresh teleop command preempts the policy
at once; once teleop has driven, the policy is ignored until :meth:`resume_policy`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from magma_ros.core.checks import read_joint_state, stamp_age
from magma_ros.core.errors import ConfigError, choose
from magma_ros.core.robot import NORMALIZED_GRIPPER, RobotConfig

SOURCES = ("policy", "teleop")
CONTROLLERS = ("jtc", "forward", "isaac")
GRIPPER_OUTPUTS = ("auto", "jtc", "franka", "none")
JTC_STAMPS = ("tick", "zero")

# Diagnostic levels (same numbers as diagnostic_msgs/DiagnosticStatus).
OK, WARN, ERROR = 0, 1, 2

_EPS = 1e-12
_DV = 1e-9  # [rad/s] velocity differences below this are not a velocity change
_SNAP = 1e-9  # [s] a step this close to a knot of the executed path counts as on it


@dataclass(frozen=True)
class SafetyConfig:
    """Parameters of the safety node (ROS parameters of the same names; see config/safety.yaml)."""

    robot: str = "fr3"  # fr3 | panda | wx250s, or a path to a robot YAML
    controller: str = "jtc"  # jtc | forward | isaac: which controller interface receives the output
    gripper_output: str = "auto"  # auto (isaac: in joint_command, else jtc) | jtc | franka | none
    output_rate: float = 100.0  # [Hz] output timer rate (dt = 1/output_rate); limits hold on real elapsed time
    position_margin: float = -1.0  # [rad] outputs stay this far inside the position limits; < 0: the
    #                                robot YAML's position_margin (one value with the servo)
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
    jtc_stamp: str = "tick"  # jtc: header stamp = the step time (controller on the node's clock) | zero
    #                          ("start on arrival": a controller on another, unsynchronized clock)
    late_tick: float = 0.5  # [periods] forward/isaac: stopping distances allow every later output to come
    #                         this much late (scheduler jitter); a later one still keeps the position
    #                         limits and may exceed the acceleration limit near a bound (docs/safety.md)
    output_on_command: bool = True  # node: an accepted command or an e-stop is output at once (the
    #                                 output ticks go on one period later), at most once between two
    #                                 ticks; false: outputs only on the output_rate ticks
    max_output_gap: float = 0.05  # [s] forward/isaac: a longer gap between outputs (the node was not
    #                               scheduled) is an interruption: the controller held, restart at rest
    following_error: bool = True  # hold when the measured arm departs from its command (robot YAML
    #                               following_error.max / .lag); false: no check
    following_error_stamps: bool = True  # compare at the joint state's header stamp (same clock as
    #                                      this node); false: at its arrival
    standstill_velocity: float = 0.05  # [rad/s] reset: the measured arm counts as standing still below
    standstill_window: float = 0.1  # [s] ... over at least this long

    def validate(self) -> SafetyConfig:
        """Raise ConfigError on a bad value; return self."""
        choose(self.controller, CONTROLLERS, "controller")
        choose(self.gripper_output, GRIPPER_OUTPUTS, "gripper_output")
        choose(self.jtc_stamp, JTC_STAMPS, "jtc_stamp")
        for name in ("output_rate", "command_timeout", "state_timeout", "max_output_gap", "standstill_velocity",
                     "standstill_window"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"safety: '{name}' must be a positive number, got {v}")
        for name in ("velocity_scale", "acceleration_scale", "jerk_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0 < v <= 1):
                raise ConfigError(f"safety: '{name}' must be in (0, 1], got {v}")
        for name in ("max_step", "future_tolerance", "late_tick"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"safety: '{name}' must be >= 0, got {v}")
        if not math.isfinite(self.position_margin):
            raise ConfigError(f"safety: 'position_margin' must be a number, got {self.position_margin}")
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


def brake_speed(d: np.ndarray, a: np.ndarray, dt: float, first: float | None = None,
                stretch: float = 1.0) -> np.ndarray:
    """Largest speed v >= 0 such that moving ``v * first`` now (default: one period ``dt``) and then
    braking travels at most ``d`` in total. The braking follows the velocity-change rule of the filter
    and of the audit: the first change after a piece of duration ``first`` is at most ``a *
    min(first, dt)``, every later one ``a * dt``, after pieces that last up to ``stretch * dt`` each
    (a set-point stream whose ticks may come late; 1: exactly one period), the last step to exactly
    zero. Exact for the discrete motion; the one stopping-distance formula of the filter.

    With m = min(first, dt) and v = a m + u (u > 0): v first + stretch * dist(u) <= d, where dist(u)
    is the distance of moving u for one period and shedding a dt per period after that.
    """
    d = np.maximum(d, 0.0)
    f = dt if first is None else max(float(first), 0.0)
    if f <= 0.0:
        return _brake_speed_periods(d / stretch, a, dt, 0.0)
    am = a * min(f, dt)
    u = _brake_speed_periods(np.maximum(d - am * f, 0.0) / stretch, a, dt, f / (stretch * dt) + 1.0)
    return np.where(d <= am * f, d / f, am + u)


def _brake_speed_periods(d: np.ndarray, a: np.ndarray, dt: float, rho: float) -> np.ndarray:
    """Largest v moving ``v * rho * dt`` and then shedding ``a * dt`` per period within ``d``.

    With u = v / (a dt), n = floor(u): distance / (a dt^2) = u (rho + n) - n (n + 1) / 2.
    """
    delta = d / (a * dt * dt)
    b = 2.0 * rho - 1.0
    n = np.maximum(np.floor((-b + np.sqrt(b * b + 8.0 * delta)) / 2.0), 0.0)  # last n with D(n) <= delta
    u = (delta + n * (n + 1.0) / 2.0) / np.maximum(rho + n, 1e-300)
    return u * a * dt


def uniform_stop(q: np.ndarray, v: np.ndarray, a_max: np.ndarray, dt: float, max_points: int = 200,
                 cruise: int = 0) -> np.ndarray:
    """Positions [n, dof] of a stop along the direction of motion from (q, v), one per period ``dt``:
    ``cruise`` periods at ``v``, then every joint shedding the same fraction of its speed per period,
    the largest that ``a_max`` allows (the last step to exactly zero). Empty when ``v`` is zero."""
    speed = np.abs(v)
    if np.all(speed < 1e-9):
        return np.zeros((0, q.size))
    r = float(np.min(a_max * dt / np.maximum(speed, 1e-300)))  # fraction of v shed per period
    n = math.ceil(1.0 / r - 1e-9) if r < 1.0 else 1
    scale = np.concatenate((np.ones(cruise), np.maximum(0.0, 1.0 - r * np.arange(1, n + 1))))[:max_points]
    return q + np.cumsum(scale[:, None] * v * dt, axis=0)


@dataclass
class _Path:
    """The path a JTC executes after one message: knots (times [K], positions [K, dof]), holding the
    last one; per piece its velocity; per knot whether the velocity changes there, and the
    acceleration at the last change (for the jerk bound)."""

    T: np.ndarray  # [K] s
    Q: np.ndarray  # [K, dof]
    v_before: np.ndarray  # [dof] velocity of the piece that ends at T[0]
    since_before: float  # [s] time since the last velocity change, at T[0] (before its knot)
    a_before: np.ndarray  # [dof] acceleration at that change
    dt: float

    def __post_init__(self):
        d = np.diff(self.T)
        V = np.diff(self.Q, axis=0) / np.maximum(d, 1e-300)[:, None]  # [K-1, dof]
        self.V = np.vstack((V, np.zeros((1, self.Q.shape[1]))))  # [K, dof] piece k starts at knot k; hold at the end
        prev = np.vstack((self.v_before[None], self.V[:-1]))
        self.change = np.any(np.abs(self.V - prev) > _DV, axis=1)  # [K]
        C = np.flatnonzero(self.change)  # knots where the velocity changes
        before = np.concatenate(([self.T[0] - self.since_before], self.T[C[:-1]]))  # the change before each
        w = np.maximum(np.minimum(self.T[C] - before, self.dt), 1e-12)
        acc_c = (self.V[C] - prev[C]) / w[:, None]  # [len(C), dof]
        last = np.maximum.accumulate(np.where(self.change, np.arange(len(self.T)), -1))  # last change <= k
        self.acc = np.where((last >= 0)[:, None], acc_c[np.searchsorted(C, np.maximum(last, 0))]
                            if C.size else 0.0, self.a_before)

    def state(self, t: float) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """(position, velocity, time since the last velocity change, acceleration there) at ``t``."""
        T = self.T
        if t <= T[0] + _SNAP:
            return self.Q[0].copy(), self.v_before.copy(), self.since_before + max(t - T[0], 0.0), self.a_before
        j = int(np.searchsorted(T, t, side="left"))  # T[j-1] < t <= T[j]
        if j < len(T) and T[j] - t <= _SNAP:
            q, i, t = self.Q[j].copy(), j - 1, T[j]  # on the knot: the piece that ends there
        else:
            i = j - 1
            q = self.Q[i] + self.V[i] * (t - T[i])
        ch = np.flatnonzero(self.change[:i + 1])
        if ch.size:
            c = int(ch[-1])
            return q, self.V[i].copy(), t - T[c], self.acc[c]
        return q, self.V[i].copy(), self.since_before + (t - T[0]), self.a_before

    def shift(self, delta: float) -> None:
        self.T = self.T + delta


class SafetyFilter:
    """Pure safety state machine; see the module docstring for the rules."""

    def __init__(self, robot: RobotConfig, config: SafetyConfig | None = None,
                 fk: Callable[[np.ndarray], np.ndarray] | None = None):
        self.robot = robot
        self.cfg = cfg = (config or SafetyConfig()).validate()
        self.dt = 1.0 / cfg.output_rate
        n = robot.dof
        self.margin = robot.position_margin if cfg.position_margin < 0 else cfg.position_margin
        self.q_lo = robot.position_min + self.margin  # [dof] rad
        self.q_hi = robot.position_max - self.margin
        if not np.all(self.q_lo < self.q_hi):
            raise ConfigError(f"safety: position_margin {self.margin} leaves no room for {robot.name}")
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
        self.path_mode = cfg.controller == "jtc"  # the controller executes our messages' paths
        self.cruise = 1 if (self.path_mode and cfg.jtc_braking_tail) else 0  # tail: one period at v first
        # set-point streams: a later output may come late, stretching the piece before it (jtc: the
        # controller runs our braking tail on its own clock, one period per piece)
        self.stretch = 1.0 if self.path_mode else 1.0 + cfg.late_tick
        self.fe_max = robot.following_error_max if cfg.following_error else None  # [dof] rad or None
        self.fe_lag = robot.following_error_lag
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
        self._samples: deque = deque()  # (receipt time, q) of recent joint states (standstill test)
        # output state: the last output and the piece that reaches it
        self.q = np.zeros(n)  # [dof] last output position
        self.v = np.zeros(n)  # [dof] velocity of the piece that reaches it
        self.a = np.zeros(n)  # [dof] acceleration at the last velocity change
        self._since = math.inf  # [s] forward/isaac: time since the last velocity change, at the last output
        self._path: _Path | None = None  # jtc: what the controller executes after our last message
        self._hist_T = np.zeros(0)  # [H] s: knots of the commanded path (following error) ...
        self._hist_Q = np.zeros((0, n))  # [H, dof] ... and their positions
        self.g: float | None = None  # last gripper output [m]
        self.g_target: float | None = None
        self.initialized = False
        # control state
        self.estopped = False
        self.policy_enabled = True
        self.await_start = False  # after a reset / following error: nothing moves until a deliberate start
        self._await_reason = ("", "")  # (hold reason, detail) of that wait
        self.active: _Command | None = None
        self.last_valid = {s: -math.inf for s in SOURCES}
        self._teleop_seen = -math.inf  # last teleop message of any kind (a new session starts after silence)
        self.hold_reason = "waiting for command"
        self.hold_detail = ""
        self.holding = True
        self._hold_cmd: _Command | None = None  # following error: move (within limits) to the measured arm
        self.last_rejection = ""
        self.infeasible_steps = 0  # steps where the limit box was empty (should stay 0)
        self.jerk_relaxed = 0  # steps where only dropping the jerk bound left a non-empty box
        self.cruise_dropped = 0  # jtc steps planned without the cruise period (a late message near a bound)
        self.interruptions = 0  # forward/isaac: output gaps longer than max_output_gap
        self.following_errors = 0
        self._t_last = -math.inf  # time of the last step
        # the step being planned: anchor (q, v, a), piece duration h, velocity-change window w
        self._h = self._w = self.dt
        self._cruise_now = self.cruise  # periods at speed before the tail of the step being planned
        self._q_next = self.q

    # ----------------------------------------------------------------------------------------- inputs
    def on_joint_state(self, names: Sequence[str], positions: Sequence[float], t: float,
                       stamp: float = 0.0) -> str:
        """Measured joint state (any order, extra joints allowed) received at ``t`` with header
        ``stamp`` (0: unknown). Returns '' or why it was ignored."""
        js = read_joint_state(names, positions, self.robot.arm_joints, self.robot.gripper.joint)
        if js.finger is not None:
            self.measured_gripper = js.finger
        if js.error:
            self.last_rejection = js.error
            return js.error
        if js.arm is None:
            return ""  # e.g. a gripper-only joint state
        self.measured = js.arm
        self.measured_t = float(t)
        self._samples.append((float(t), js.arm))
        while self._samples and self._samples[0][0] < t - 4.0 * self.cfg.standstill_window:
            self._samples.popleft()
        if self.fe_max is not None and self.initialized:
            s = float(stamp) if (self.cfg.following_error_stamps and stamp) else float(t)
            if not (t - 1.0 <= s <= t + self.cfg.future_tolerance):  # unusable stamp: its arrival
                s = float(t)
            self._check_following(js.arm, s)
        return ""

    def on_command(self, source: str, names: Sequence[str], positions, times, stamp: float,
                   t: float) -> Verdict:
        """A JointTrajectory from ``source`` (policy | teleop): joint names, positions [P][J],
        time_from_start [P] (s), header stamp (s, 0 = now) and the current time ``t``."""
        new_session = False
        if source == "teleop":  # a teleop message after silence = the deadman pressed again
            new_session = t - self._teleop_seen > self.cfg.command_timeout
            self._teleop_seen = float(t)
        v = self._check_command(source, names, positions, times, stamp, t, new_session)
        if not v.accepted:
            self.last_rejection = v.reason
        return v

    def _check_command(self, source, names, positions, times, stamp, t, new_session=False) -> Verdict:
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
        kind, age = stamp_age(stamp, t, self.cfg.command_timeout, self.cfg.future_tolerance)
        if kind == "stale":
            return Verdict(False, f"stale command (stamp {age:.3f} s old)")
        if kind == "future":
            return Verdict(False, f"command stamp {-age:.3f} s in the future")
        if stamp == 0.0:
            stamp = t
        # priority and deliberate start
        if source == "policy":
            if self._teleop_fresh(t):
                return Verdict(False, "teleop has priority: policy command ignored")
            if self.await_start:
                return Verdict(False, f"holding ({self.hold_reason}): the policy moves only after "
                                      "safety/resume_policy")
            if not self.policy_enabled:
                return Verdict(False, "policy disabled since teleop took over: call safety/resume_policy")
        elif self.await_start and not new_session:
            return Verdict(False, f"holding ({self.hold_reason}): release the teleop deadman and press it "
                                  "again, or call safety/resume_policy")
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
        here = self.q  # where the commanded path is at `start` (jtc: on our last message's path)
        if self._path is not None and start >= self._path.T[0]:
            here = self._path.state(start)[0]
        times_all = np.concatenate(([start], abs_t[keep]))
        pts_all = np.concatenate((here[None], arm[keep]), axis=0)
        if times_all[-1] <= times_all[0]:  # everything already due: go straight to the last point
            times_all = np.array([start, start + _EPS])
            pts_all = np.stack([here, arm[-1]])
        self.active = _Command(source, times_all, pts_all, float(t))
        self.last_valid[source] = float(t)
        if source == "teleop":
            self.policy_enabled = False
        self.await_start = False
        self._hold_cmd = None
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
        """Release the e-stop, only once the arm stands still (commanded and measured) with fresh
        joint states. The output stays where the stop left it (no re-anchoring, no jump) and nothing
        moves until :meth:`resume_policy` or a new teleop command (ISO 13850)."""
        if not self.estopped:
            return True, "not e-stopped: nothing to reset"
        if not self._state_fresh(t):
            return False, "joint states are not fresh: cannot reset"
        speed = self.commanded_speed(t)
        if speed > 0.0:
            return False, (f"the arm is still braking (commanded {speed:.3f} rad/s): reset refused, "
                           "the controlled stop goes on")
        m = self.measured_speed()
        if m is None:
            return False, "not enough recent joint states to tell that the arm stands still: reset refused"
        if m > self.cfg.standstill_velocity:
            return False, (f"the arm is still moving (measured {m:.3f} rad/s > {self.cfg.standstill_velocity:g}): "
                           "reset refused")
        self.estopped = False
        self._await("reset, waiting for resume")
        return True, ("e-stop released; holding until safety/resume_policy (or a new teleop command): "
                      "a reset never restarts motion by itself")

    def resume_policy(self, t: float) -> tuple[bool, str]:
        """Explicit start: the policy may drive again (also ends a reset / following-error hold)."""
        if self.estopped:
            return False, "e-stop latched: call safety/reset first"
        if self._teleop_fresh(t):
            return False, "teleop is driving: let it go silent first"
        self.policy_enabled = True
        if self.await_start:
            self.await_start = False
            self._hold_cmd = None
            self.hold_reason, self.hold_detail = "waiting for command", ""
        return True, "policy may drive again (from its next valid command)"

    def _await(self, reason: str, detail: str = "") -> None:
        self._await_reason = (reason, detail)
        self.await_start = True
        self.policy_enabled = False
        self._hold(reason)
        self.hold_detail = detail

    # ------------------------------------------------------------------------------ measured state
    def measured_speed(self) -> float | None:
        """Largest joint speed [rad/s] seen in the joint states over the last ``standstill_window``
        (at least that long a span needed; None otherwise)."""
        if not self._samples:
            return None
        t1, q1 = self._samples[-1]
        w = self.cfg.standstill_window
        if t1 - self._samples[0][0] < w - 1e-9:
            return None
        old = [(t, q) for t, q in self._samples if 0.5 * w <= t1 - t <= 1.5 * w]
        return max((float(np.max(np.abs(q1 - q))) / (t1 - t) for t, q in old), default=0.0)

    def commanded_speed(self, t: float) -> float:
        """Largest joint speed [rad/s] of the commanded path now (jtc: what the controller executes)."""
        v = self.v
        if self._path is not None:
            v = self._path.state(max(t, self._path.T[0]))[1]
        return float(np.max(np.abs(v))) if np.any(np.abs(v) > 1e-9) else 0.0

    def commanded_range(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-joint (min, max) of the commanded path over [t0, t1] (None before any output)."""
        T, Q = self._hist_T, self._hist_Q
        if T.size == 0:
            return None
        if self._path is not None and t1 > T[-1]:  # beyond the last output: what the controller executes
            extra = self._path.T > T[-1]
            T, Q = np.concatenate((T, self._path.T[extra])), np.vstack((Q, self._path.Q[extra]))
        t0, t1 = min(max(t0, T[0]), T[-1]), min(max(t1, T[0]), T[-1])
        i0, i1 = np.searchsorted(T, [t0, t1], side="left")
        lo, hi = max(i0 - 1, 0), min(i1 + 1, T.size)
        Tw, Qw = T[lo:hi], Q[lo:hi]  # the knots around the window
        ends = np.stack([self._interp(Tw, Qw, t0), self._interp(Tw, Qw, t1)])
        inside = Qw[(Tw > t0) & (Tw < t1)]
        allq = np.vstack((ends, inside))
        return allq.min(axis=0), allq.max(axis=0)

    @staticmethod
    def _interp(T: np.ndarray, Q: np.ndarray, t: float) -> np.ndarray:
        i = int(np.clip(np.searchsorted(T, t, side="right") - 1, 0, max(T.size - 2, 0)))
        if T.size == 1 or T[i + 1] <= T[i]:
            return Q[min(i, T.size - 1)]
        f = min(max((t - T[i]) / (T[i + 1] - T[i]), 0.0), 1.0)
        return Q[i] + f * (Q[i + 1] - Q[i])

    def _remember(self, t: float, q: np.ndarray) -> None:
        """Add a knot of the commanded path; keep the last 1.5 s."""
        self._hist_T = np.append(self._hist_T, t)
        self._hist_Q = np.vstack((self._hist_Q, q[None]))
        if self._hist_T.size > 64 and self._hist_T[32] < t - 1.5:
            self._hist_T, self._hist_Q = self._hist_T[32:], self._hist_Q[32:]

    def _check_following(self, q: np.ndarray, s: float) -> None:
        T = self._hist_T
        if T.size and s <= T[-1]:  # fast path: close to what was commanded at s -> no error possible
            j = int(np.searchsorted(T, s))
            lo = max(j - 1, 0)
            if np.all(np.abs(q - self._interp(T[lo:j + 1], self._hist_Q[lo:j + 1], s)) <= self.fe_max):
                return
        rng = self.commanded_range(s - self.fe_lag, s)
        if rng is None:
            return
        lo, hi = rng
        err = np.maximum(lo - q, q - hi)  # [dof] distance outside what was commanded in the lag window
        over = err - self.fe_max
        if not np.any(over > 0):
            return
        j = int(np.argmax(over))
        if not (self.hold_reason == "following error" and self.holding):
            self.following_errors += 1
            detail = (f"{self.robot.arm_joints[j]} {err[j]:.3f} rad from its command "
                      f"(tolerance {self.fe_max[j]:.3f} rad)")
            if not self.estopped:
                self._await("following error", detail)
            else:
                self.hold_detail = detail
        # hold at the measured arm: move there within the limits (no jump, no jump back)
        t0 = max(self._t_last, s)
        self._hold_cmd = _Command("hold", np.array([t0, t0 + _EPS]), np.stack([self.q, q]), t0)

    # ----------------------------------------------------------------------------------------- output
    def _state_fresh(self, t: float) -> bool:
        return self.measured is not None and t - self.measured_t <= self.cfg.state_timeout

    def _init_from_measured(self, t: float) -> None:
        self.q = self.measured.copy()
        self.v = np.zeros_like(self.q)
        self.a = np.zeros_like(self.q)
        self._since = math.inf
        self.active = None
        self.holding = True
        if self.measured_gripper is not None:
            g = self.robot.gripper
            self.g = float(np.clip(self.measured_gripper, g.low, g.high))
        self.g_target = self.g
        self.initialized = True
        self._hist_T, self._hist_Q = np.zeros(0), np.zeros((0, self.q.size))
        self._remember(t + self.dt, self.q.copy())
        if self.path_mode:
            self._path = _Path(np.array([t, t + self.dt]), np.stack([self.q, self.q]), self.v.copy(),
                               math.inf, self.a.copy(), self.dt)

    def _anchor(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """State the next piece starts from, and set its duration ``_h`` and velocity-change window ``_w``."""
        dt = self.dt
        if self._path is not None:  # jtc: where the controller is now on our last message's path
            q0, v0, since, a0 = self._path.state(t)
            self._h, self._w = dt, min(since, dt)
            return q0, v0, a0
        h = t - self._t_last
        if h > self.cfg.max_output_gap:  # the controller held the last set-point: restart at rest
            self.interruptions += 1
            self._h, self._w = dt, dt
            return self.q, np.zeros_like(self.v), np.zeros_like(self.a)
        self._h, self._w = h, min(self._since, dt)
        return self.q, self.v, self.a

    def step(self, t: float) -> Output | None:
        """Next output at time ``t`` (position to reach at ``t + dt``), or None before joint states."""
        if t < self._t_last - 1e-6:  # the clock jumped back (simulation reset): re-base, nothing is fresh
            self._rebase(t - self._t_last - self.dt)
        if not self.initialized:
            if not self._state_fresh(t):
                return None
            self._init_from_measured(t)
            self._t_last = t
            self.hold_reason = "waiting for command"
            return Output(self.q.copy(), self.v.copy(), self.g, self.g is not None)
        if t - self._t_last <= 1e-9:  # no time has passed: nothing new to send
            return Output(self.q.copy(), self.v.copy(), self.g, False)
        if not self.estopped:
            if not self._state_fresh(t):
                self._hold("stale joint states")
            elif self.await_start and self.hold_reason == "stale joint states":  # fresh again: still waiting
                self.hold_reason, self.hold_detail = self._await_reason
            elif (self.active is not None
                  and t - self.last_valid[self.active.source] > self.cfg.command_timeout):
                self._hold("teleop timeout" if self.active.source == "teleop" else "command timeout")
        q0, v0, a0 = self._anchor(t)
        self._cruise_now = self._tail_cruise()
        if self._hold_cmd is not None:  # following error: to the measured arm, then hold
            v_new = self._follow(self._hold_cmd, t, q0, v0, a0)
        elif self.estopped or self.active is None:
            v_new = self._limit(np.zeros_like(v0), None, q0, v0, a0)  # controlled stop, then hold still
        else:
            v_new = self._follow(self.active, t, q0, v0, a0)
        q_new = self._q_next
        if self._fk is not None and not self.estopped and self.active is not None:
            if not self._ws_ok(q_new, v_new):
                self._hold("workspace")
                v_new = self._limit(np.zeros_like(v0), None, q0, v0, a0)
                q_new = self._q_next
        changed = bool(np.any(np.abs(v_new - v0) > _DV))
        a_new = (v_new - v0) / max(self._w, 1e-12) if changed else a0
        if self._path is not None:
            since0 = self._path.state(t)[2]
            tail = np.zeros((0, q0.size))
            if self.cfg.jtc_braking_tail:
                tail = self.braking_tail(q_new, v_new, a_new, max_points=2000)
            T = t + self.dt * np.arange(len(tail) + 2)
            self._path = _Path(T, np.vstack((q0[None], q_new[None], tail)), v0, since0, a0, self.dt)
            self._remember(t, q0.copy())
        else:
            self._since = self._h if changed else self._since + self._h
        self._remember(t + self.dt, q_new.copy())
        self.q, self.v, self.a = q_new, v_new, a_new
        self._t_last = t
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

    def _rebase(self, delta: float) -> None:
        """Shift every stored time by ``delta`` (the clock jumped back); states and commands go stale."""
        self._t_last += delta
        if self._path is not None:
            self._path.shift(delta)
        self._hist_T = self._hist_T + delta
        self._samples.clear()
        self.measured_t = -math.inf
        self.last_valid = {s: -math.inf for s in SOURCES}
        self._teleop_seen = -math.inf
        if self._hold_cmd is not None:
            self._hold_cmd.times = self._hold_cmd.times + delta

    def _hold(self, reason: str) -> None:
        if self.hold_reason != reason:
            self.hold_detail = ""
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

    def _box(self, q, v, a, jerk: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Per-joint interval [lo, hi] of admissible velocities for the next piece (duration ``_h``,
        velocity change within ``A * _w``; acceleration change within ``J * _w`` unless ``jerk`` is
        False)."""
        w, A = self._w, self.a_max
        vlo, vhi = self._vel_bounds(q)
        lo = np.maximum(v - A * w, vlo)
        hi = np.minimum(v + A * w, vhi)
        if jerk and self.j_max is not None:
            lo = np.maximum(lo, v + a * w - self.j_max * w * w)
            hi = np.minimum(hi, v + a * w + self.j_max * w * w)
        slo, shi = self._stop_bounds(q)
        return np.maximum(lo, slo), np.minimum(hi, shi)

    def _stop_bounds(self, q) -> tuple[np.ndarray, np.ndarray]:
        """Velocities from which the arm can still stop inside the band after the next piece (``_h``):
        room above / below (0 when outside the band: never further out) -> (-down speed, up speed)."""
        A = self.a_max
        room = np.concatenate((np.maximum(self.q_hi, q) - q, q - np.minimum(self.q_lo, q)))
        bs = brake_speed(room, np.concatenate((A, A)), self.dt, first=self._h + self._cruise_now * self.dt,
                         stretch=self.stretch)
        n = q.size
        return -bs[n:], bs[:n]

    def _limit(self, v_c: np.ndarray, q_target: np.ndarray | None, q, v, a, box=None) -> np.ndarray:
        """Admissible velocity closest to ``v_c`` along the segment from the current velocity.

        Sets ``self._q_next`` (the next position); if ``v_c`` is admissible and came from
        ``q_target``, the next position is exactly ``q_target`` (pass-through).
        """
        h = self._h
        lo, hi = self._box(q, v, a) if box is None else box
        if np.all(v_c >= lo) and np.all(v_c <= hi):
            self._q_next = q_target.copy() if q_target is not None else q + v_c * h
            if q_target is not None:
                return (self._q_next - q) / h
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
            if np.any(lo > hi + _EPS) and self._cruise_now:
                # the cruise period goes first (it is a convenience for late messages, not a limit): a
                # message that comes after the previous tail began braking cannot add another period at
                # speed near a bound; without it the previous tail itself stays admissible
                self._cruise_now = 0
                lo, hi = self._box(q, v, a)
                if np.all(lo <= hi + _EPS):
                    self.cruise_dropped += 1
            if np.any(lo > hi + _EPS) and self.j_max is not None:
                # the jerk bound gives way first: after a very short piece (bunched ticks) it freezes
                # the acceleration, which may be heading into the stopping-distance bound
                lo, hi = self._box(q, v, a, jerk=False)
                if np.all(lo <= hi + _EPS):
                    self.jerk_relaxed += 1
            if np.any(lo > hi + _EPS):
                self.infeasible_steps += 1
                # priority: stopping distance / position and velocity over acceleration
                vlo, vhi = self._vel_bounds(q)
                slo, shi = self._stop_bounds(q)
                slo, shi = np.maximum(vlo, slo), np.minimum(vhi, shi)
                dv = self.a_max * self._w
                v_new = np.clip(np.clip(v_c, v - dv, v + dv), slo, shi)
            else:
                v_new = np.clip(v_c, lo, hi)
        self._q_next = q + v_new * h
        return v_new

    def _follow(self, cmd: _Command, t: float, q0, v0, a0) -> np.ndarray:
        """Velocity of the next piece while following ``cmd`` from the anchor (q0, v0, a0)."""
        h = self._h
        q_des = cmd.at(t + self.dt)
        v_track = (q_des - q0) / h
        # each joint must be able to stop where its path next reverses or ends
        e = cmd.turns[cmd.segment(t + self.dt)] - q0
        toward = (np.sign(v_track) == np.sign(e)) & (v_track != 0)
        lo, hi = self._box(q0, v0, a0)
        # the hold's tail keeps a cruise period (a late tick meets the arm still approaching, not
        # braking): it must stop at the measured arm after it, too; a tick that comes after the
        # previous tail began braking drops it (as for the limits)
        hold = cmd is self._hold_cmd
        first = h + (self._cruise_now * self.dt if hold else 0.0)
        stop = brake_speed(np.abs(e), self.a_max, self.dt, first=first, stretch=self.stretch)
        if (hold and self._cruise_now
                and np.any(toward & (np.minimum(np.abs(lo), np.abs(hi)) > stop) & (np.sign(lo) == np.sign(hi)))):
            self._cruise_now = 0
            lo, hi = self._box(q0, v0, a0)
            stop = brake_speed(np.abs(e), self.a_max, self.dt, first=h, stretch=self.stretch)
        if (np.all(v_track >= lo) and np.all(v_track <= hi)
                and np.all(~toward | (np.abs(v_track) <= stop * (1 + 1e-9) + 1e-12))):
            return self._limit(v_track, q_des, q0, v0, a0, box=(lo, hi))  # in limits: pass through unchanged
        # catch-up: scale along the direction for the velocity bounds and for stopping in time
        vlo, vhi = self._vel_bounds(q0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cap = np.where(v_track > 0, vhi / v_track, np.where(v_track < 0, vlo / v_track, np.inf))
            cap2 = np.where(toward, stop / np.abs(v_track), np.inf)
        s = min(1.0, float(np.min(cap)), float(np.min(cap2)))
        return self._limit(v_track * max(s, 0.0), None, q0, v0, a0, box=(lo, hi))

    def braking_tail(self, q=None, v=None, a=None, max_points: int = 200) -> np.ndarray:
        """Positions [n, dof], one per period, of a controlled stop from an output state (default:
        the last output; not applied).

        Used for JTC streaming: each message carries the next point plus this tail, so a late
        message never makes the controller stop abruptly at the end of its trajectory. While a
        command is followed the tail first keeps the velocity for one period (a message up to one
        period late meets an arm still at full speed, and continues it), then stops uniformly along
        the direction of motion; near a limit, where that would not do, the stop is computed step by
        step by the limiter. While stopping or holding still there is no cruise period; the approach
        to the measured arm after a following error keeps it.
        """
        q = self.q if q is None else q
        v = self.v if v is None else v
        a = self.a if a is None else a
        cruise = min(self._tail_cruise(), self._cruise_now)
        if cruise and self.pdv is not None:  # the cruise piece starts at q: inside the bounds there?
            vlo, vhi = self.pdv.bounds(q, self.v_max)
            if np.any(v < vlo - 1e-12) or np.any(v > vhi + 1e-12):
                cruise = 0
        dt = self.dt
        Q = uniform_stop(q, v, self.a_max, dt, max_points, cruise)
        if len(Q) == 0:
            return Q
        prev = np.vstack((q, Q[:-1]))
        V = (Q - prev) / dt
        lo = np.minimum(self.q_lo, q) - 1e-12
        hi = np.maximum(self.q_hi, q) + 1e-12
        ok = bool(np.all(Q >= lo) and np.all(Q <= hi))
        if ok and self.pdv is not None:
            vlo, vhi = self.pdv.bounds(prev, self.v_max)
            ok = bool(np.all(V >= vlo - 1e-12) and np.all(V <= vhi + 1e-12))
        if ok and self.j_max is not None:
            first = int(cruise)  # the first velocity change of the tail
            v_before = v if first == 0 else V[first - 1]
            a_before = a if first == 0 else np.zeros_like(a)
            if first < len(V):
                a0 = (V[first] - v_before) / dt
                ok = bool(np.all(np.abs(a0 - a_before) <= self.j_max * dt * (1 + 1e-9)))
        if ok:
            return Q
        return self._braking_tail_exact(q, v, a, max_points, cruise)

    def _tail_cruise(self) -> int:
        """Periods at speed before the braking tail starts: one while a command (or, after a following
        error, the measured arm) is followed."""
        moving = self._hold_cmd is not None or self.active is not None
        return self.cruise if (moving and not self.estopped) else 0

    def _braking_tail_exact(self, q, v, a, max_points: int, cruise: int = 0) -> np.ndarray:
        saved = (self._q_next, self._h, self._w, self._cruise_now)
        self._h = self._w = self.dt
        self._cruise_now = 0  # each step of the stop brakes at once (the cruise, if any, comes first)
        out = [q + v * self.dt * (k + 1) for k in range(cruise)]
        if cruise:
            q, a = out[-1], np.zeros_like(a)
        for _ in range(max_points - cruise):
            if np.all(np.abs(v) < 1e-9):
                break
            v_new = self._limit(np.zeros_like(v), None, q, v, a)
            q_new = self._q_next
            a = (v_new - v) / self.dt
            v, q = v_new, q_new
            out.append(q)
        self._q_next, self._h, self._w, self._cruise_now = saved
        return np.array(out).reshape(-1, self.robot.dof)

    def jtc_points(self) -> np.ndarray:
        """jtc: the points [n, dof] of the message for the last step (the next point, then the
        braking tail), one per period from the step time: exactly the path the filter assumes the
        controller executes."""
        if self._path is None:
            return self.q[None].copy()
        return self._path.Q[1:].copy()

    # ---------------------------------------------------------------------------------- workspace
    def _ws_violation(self, q: np.ndarray) -> float:
        if self._fk is None:
            return 0.0
        p = np.asarray(self._fk(q), float)[:3, 3]
        return float(np.max(np.concatenate([self._ws_lo - p, p - self._ws_hi, [0.0]])))

    def _ws_ok(self, q_new: np.ndarray, v_new: np.ndarray) -> bool:
        """The stopping point of a controlled stop from (q_new, v_new) must be inside the box
        (or closer to it than the current position is)."""
        stop = uniform_stop(q_new, v_new, self.a_max, self.dt, 10_000, self._cruise_now)
        q_stop = stop[-1] if len(stop) else q_new
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
            extra = f"; {self.hold_detail}" if self.hold_detail else ""
            return Status(st, "hold", ERROR, "e-stop latched" + (": decelerating" if moving else "") + extra)
        if not self.initialized:
            return Status("waiting", "hold", WARN, "waiting for fresh joint states")
        if self.holding or self.active is None:
            reason = self.hold_reason
            lvl = {"waiting for command": OK, "reset, waiting for resume": OK, "following error": ERROR}.get(reason,
                                                                                                            WARN)
            msg = f"holding: {reason}" + (f": {self.hold_detail}" if self.hold_detail else "")
            if self.await_start and reason == "following error":
                msg += "; call safety/resume_policy"
            return Status(f"holding:{reason}", "hold", lvl, msg)
        return Status("ok", self.active.source, OK, f"following {self.active.source}")
