"""Independent limit audit of a controller command stream, built from the robot YAML alone.

The oracle that the tests, the system tests and the demo summary use for the safety node. It never
imports the safety filter: limits come from ``config/robots/<robot>.yaml`` (plus the margin and
scales the caller states), times from the stream itself (real elapsed time, not a nominal period).

What it checks is the path a controller executes, as straight pieces between knots:

- **Set-point streams** (forward_command_controller, Isaac Sim ``joint_command``): output ``k``,
  sent at time ``t_k``, is the position to reach one ``period`` later; consecutive outputs are
  joined by the piece ``(t_{k-1} + period, q_{k-1}) -> (t_k + period, q_k)``. A gap longer than
  ``max_gap`` is an interruption: the controller held its last set-point, so the next piece starts
  at rest and lasts one period (counted in ``interruptions``, not a violation: the sender was not
  running; what it must do afterwards is restart from rest, and that is checked).
- **JointTrajectory streams** (ros2_control JTC, positions only, linear interpolation): each
  message replaces the rest of the previous one at its start time (header stamp, or its arrival
  when the stamp is zero), from where the previous path is at that moment, through its points at
  ``start + time_from_start``; after the last point the controller holds.

For every piece of duration ``d`` from ``q0`` to ``q1``: ``v = (q1 - q0) / d`` inside
``±velocity_max · velocity_scale`` (FR3: also libfranka's position-dependent bounds at ``q0``);
``q1`` inside ``[position_min + margin, position_max - margin]`` (or no further out than ``q0``);
at every knot where the velocity changes, ``|Δv| <= acceleration_max · acceleration_scale · w`` with
``w`` the time since the previous velocity change, capped at one period (a velocity that has been
held for a period or more may change by one period's worth). Over any window of length ``T`` the
velocity therefore changes by at most ``A (T + period)``, whatever the timing of the messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from magma_ros.core.robot import RobotConfig, load_robot

_JUMP = 1e-9  # [rad] a zero-duration piece may move at most this much (float rounding)
_DV = 1e-9  # [rad/s] velocity differences below this ...
_DV_REL = 1e-6  # ... plus this fraction of the speed (nanosecond stamps) are not a velocity change


@dataclass
class LimitAudit:
    """Check a command stream against a robot's limits on real elapsed time (see the module doc).

    Feed it in time order with :meth:`point` (set-point streams) or :meth:`trajectory` (JTC
    messages); :attr:`violations` lists what broke a limit, with the time and the joint.
    """

    robot: RobotConfig | str | Path  # a RobotConfig, a robot name or a robot YAML path
    period: float  # [s] the sender's nominal output period (the acceleration window's cap)
    position_margin: float = 0.0  # [rad] kept from the position limits (0: the hard limits)
    velocity_scale: float = 1.0  # fraction of velocity_max allowed
    acceleration_scale: float = 1.0  # fraction of acceleration_max allowed
    max_gap: float | None = None  # [s] set-point streams: a longer gap is an interruption (None: 5 periods)
    tol: float = 1e-5  # relative slack for float rounding and nanosecond stamps (negative: demand slack)
    starts_at_rest: bool = True  # the stream is seen from its start (at rest); False: joined mid-stream (a
    #                              probe started after the graph), so the velocity before it is unknown
    violations: list = field(default_factory=list)
    interruptions: int = 0  # set-point gaps longer than max_gap
    pieces: int = 0  # pieces checked
    peak_velocity: float = 0.0  # largest |v| / limit seen (1.0 = at the limit)
    peak_acceleration: float = 0.0  # largest |Δv| / (A w) seen

    def __post_init__(self):
        r = self.robot if isinstance(self.robot, RobotConfig) else load_robot(self.robot)
        self.robot = r
        self.names = r.arm_joints
        self.q_lo = r.position_min + self.position_margin
        self.q_hi = r.position_max - self.position_margin
        self.v_max = r.velocity_max * self.velocity_scale
        self.a_max = r.acceleration_max * self.acceleration_scale
        self.pdv = r.position_dependent_velocity
        if self.max_gap is None:
            self.max_gap = 5.0 * self.period
        self._t: float | None = None  # time of the current knot
        self._q: np.ndarray | None = None  # position there
        self._v = np.zeros(r.dof)  # velocity of the piece ending there
        self._unknown = 0  # joined mid-stream: 2 = velocity unknown, 1 = how long it was held unknown
        self._since = self.period  # time since the last velocity change (capped use)
        self._pT = np.zeros(0)  # JTC: knot times of the active message ...
        self._pQ = np.zeros((0, r.dof))  # ... and positions
        self._pi = 0  # the next knot not yet reached

    # ------------------------------------------------------------------------------------ input
    def start_at(self, t: float, q, v=None) -> None:
        """Start the audit mid-motion: at ``t`` the path is at ``q`` moving at ``v`` (default rest),
        that velocity held for at least a period."""
        self._start(t, np.asarray(q, float).reshape(-1))
        self._unknown = 0
        if v is not None:
            self._v = np.asarray(v, float).reshape(-1).copy()

    def point(self, t: float, q) -> list[str]:
        """A set-point ``q`` [dof] sent at ``t`` [s], to be reached at ``t + period``."""
        q = self._arm(q, t)
        if q is None:
            return self.violations[-1:]
        n = len(self.violations)
        tau = t + self.period
        if self._q is None:
            self._start(tau, q)
            return []
        if tau - self._t > self.max_gap:  # the controller held q_prev meanwhile: restart at rest (known)
            self.interruptions += 1
            self._t, self._v, self._since, self._unknown = t, np.zeros_like(self._v), self.period, 0
        self._piece(tau, q)
        return self.violations[n:]

    def trajectory(self, start: float, times, points) -> list[str]:
        """A JointTrajectory taking effect at ``start`` [s]: ``points`` [P][dof] at ``start + times``."""
        n = len(self.violations)
        try:
            P = np.asarray(points, float)
            ts = np.asarray(times, float).reshape(-1)
        except ValueError:
            P, ts = np.zeros((0, 0)), np.zeros(0)
        if P.ndim != 2 or P.shape != (ts.size, self.robot.dof) or P.size == 0 or not np.all(np.isfinite(P)):
            self.violations.append(f"t={start:.4f}: malformed trajectory (shape {P.shape})")
            return self.violations[n:]
        if self._q is None and not self.starts_at_rest and ts[0] > 0.0:
            # joined mid-stream: where the path was at `start` is unknown; it starts at the first point
            self._start(start + float(ts[0]), P[0])
            ts, P = ts[1:], P[1:]
        elif self._q is None:
            self._start(start, P[0])
        else:
            self.advance(start)
        later = ts > 0.0
        self._pT, self._pQ, self._pi = start + ts[later], P[later], 0
        if not np.all(later):  # a point at time 0 replaces the set-point at once
            self._piece(start, P[np.flatnonzero(~later)[-1]])
        return self.violations[n:]

    def advance(self, t: float) -> None:
        """Follow the active JTC path up to time ``t`` (held after its last point)."""
        while self._pi < len(self._pT) and self._pT[self._pi] <= t + 1e-12:
            self._piece(float(self._pT[self._pi]), self._pQ[self._pi])
            self._pi += 1
        if t <= self._t + 1e-12:
            return
        if self._pi < len(self._pT):  # split the current piece at t (same velocity: no knot)
            tk, qk = float(self._pT[self._pi]), self._pQ[self._pi]
            f = (t - self._t) / (tk - self._t)
            self._piece(t, self._q + f * (qk - self._q))
        else:
            self._piece(t, self._q)  # holding

    def finish(self, until: float | None = None) -> list[str]:
        """Run the rest of the active JTC path (to ``until``, default its end and one period of hold)."""
        n = len(self.violations)
        if self._q is not None:
            last = float(self._pT[-1]) if self._pi < len(self._pT) else self._t
            self.advance(until if until is not None else last + self.period)
        return self.violations[n:]

    # ---------------------------------------------------------------------------------- checks
    def _arm(self, q, t: float) -> np.ndarray | None:
        q = np.asarray(q, float).reshape(-1)
        if q.shape != (self.robot.dof,) or not np.all(np.isfinite(q)):
            self.violations.append(f"t={t:.4f}: malformed command {q}")
            return None
        return q

    def _start(self, t: float, q: np.ndarray) -> None:
        self._t, self._q = t, q.copy()
        self._v = np.zeros_like(q)
        self._unknown = 0 if self.starts_at_rest else 2
        self._since = self.period
        r = self.robot  # a start may lie outside the margin band (then only move back), never outside the limits
        for i in np.flatnonzero((q < r.position_min - 1e-9) | (q > r.position_max + 1e-9)):
            self.violations.append(f"t={t:.4f}: {self.names[i]} starts at {q[i]:.5f} outside "
                                   f"[{r.position_min[i]:.5f}, {r.position_max[i]:.5f}]")

    def _check_position(self, q0: np.ndarray, q1: np.ndarray, t: float) -> None:
        lo = np.minimum(self.q_lo, q0) - 1e-9  # outside the band (start-up): never further out
        hi = np.maximum(self.q_hi, q0) + 1e-9
        for i in np.flatnonzero((q1 < lo) | (q1 > hi)):
            self.violations.append(f"t={t:.4f}: {self.names[i]} at {q1[i]:.5f} outside "
                                   f"[{self.q_lo[i]:.5f}, {self.q_hi[i]:.5f}]")

    def _piece(self, t1: float, q1: np.ndarray) -> None:
        q0, t0 = self._q, self._t
        d = t1 - t0
        self._check_position(q0, q1, t1)
        if d <= 1e-12:
            jump = np.abs(q1 - q0)
            for i in np.flatnonzero(jump > _JUMP):
                self.violations.append(f"t={t1:.4f}: {self.names[i]} jumps {jump[i]:.5f} rad in no time")
            self._q = q1.copy()
            return
        self.pieces += 1
        v = (q1 - q0) / d
        vlo, vhi = -self.v_max, self.v_max
        if self.pdv is not None:  # libfranka's bounds at the piece's start
            plo, phi = self.pdv.bounds(q0, self.v_max)
            vlo, vhi = np.maximum(vlo, plo), np.minimum(vhi, phi)
        slack = 1.0 + self.tol
        for i in np.flatnonzero((v > vhi * slack + 1e-6) | (v < vlo * slack - 1e-6)):
            self.violations.append(f"t={t0:.4f}: {self.names[i]} moves at {v[i]:.4f} rad/s over {d * 1e3:.2f} ms "
                                   f"(limit [{vlo[i]:.4f}, {vhi[i]:.4f}])")
        self.peak_velocity = max(self.peak_velocity, float(np.max(np.abs(v) / self.v_max)))
        dv = np.abs(v - self._v)
        changed = np.any(dv > _DV + _DV_REL * np.maximum(np.abs(v), np.abs(self._v)))
        if self._unknown == 2:  # joined mid-stream: the first piece's velocity sets the reference
            self._unknown, self._since = 1, d
        elif changed and self._unknown == 1:  # ... and its first change (how long the velocity before it
            self._unknown, self._since = 0, d  # was held is unknown); every later change is judged
        elif changed:
            w = min(self._since, self.period)
            allowed = self.a_max * w
            for i in np.flatnonzero(dv > allowed * slack + 1e-6):
                self.violations.append(f"t={t0:.4f}: {self.names[i]} velocity changes by {dv[i]:.4f} rad/s after "
                                       f"{w * 1e3:.2f} ms ({dv[i] / w:.2f} rad/s^2 > {self.a_max[i]:g})")
            self.peak_acceleration = max(self.peak_acceleration, float(np.max(dv / allowed)))
            self._since = d
        else:
            self._since += d
            if self._unknown == 1 and self._since >= self.period:  # seen held for a period: known enough
                self._unknown = 0
        self._t, self._q, self._v = t1, q1.copy(), v
