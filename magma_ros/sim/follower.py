"""Setpoint generators for the simulated controllers (numpy only, no ROS, no MuJoCo).

:class:`TrajectoryFollower` samples a joint trajectory the way ros2_control's
JointTrajectoryController does: a new trajectory replaces the old one from the moment it is
received, starting from the current setpoint (position and velocity, so streaming short
trajectories gives a continuous path), through each point at its ``time_from_start``; linear
interpolation when points carry positions only, cubic Hermite when every point carries
velocities; after the last point the last position is held (velocity 0). Joints a trajectory does
not name keep their current setpoint.
"""

from __future__ import annotations

import numpy as np


class TrajectoryFollower:
    """Joint setpoint over time for ``n`` joints; times are in seconds on any monotonic clock."""

    def __init__(self, q0):
        q0 = np.asarray(q0, dtype=float).reshape(-1)
        self.n = q0.size
        self.hold(q0, 0.0)

    def hold(self, q, t: float) -> None:
        """Hold position ``q`` from time ``t`` on."""
        q = np.asarray(q, dtype=float).reshape(self.n)
        self._t = np.array([t])
        self._q = q[None, :].copy()
        self._v = np.zeros((1, self.n))
        self._hermite = False

    @property
    def end_time(self) -> float:
        """Time of the last point of the active trajectory."""
        return float(self._t[-1])

    def set_trajectory(self, t_now: float, times, positions, velocities=None, mask=None) -> None:
        """Follow ``positions`` (K, m) at ``t_now + times`` (K,) from the current setpoint.

        ``mask`` (n,) bool selects the joints the m columns belong to (default: all, m = n).
        ``velocities`` (K, m) or None. Raises ValueError on bad shapes, NaN/inf or times that do
        not increase.
        """
        times = np.asarray(times, dtype=float).reshape(-1)
        mask = np.ones(self.n, bool) if mask is None else np.asarray(mask, bool).reshape(self.n)
        m = int(mask.sum())
        P = np.asarray(positions, dtype=float)
        if times.size == 0 or P.shape != (times.size, m):
            raise ValueError(f"trajectory needs {times.size} points of {m} positions, got shape {P.shape}")
        V = None if velocities is None else np.asarray(velocities, dtype=float)
        if V is not None and V.shape != P.shape:
            raise ValueError(f"velocities shape {V.shape} != positions shape {P.shape}")
        finite = np.all(np.isfinite(times)) and np.all(np.isfinite(P))
        if not (finite and (V is None or np.all(np.isfinite(V)))):
            raise ValueError("trajectory contains NaN/inf")
        if np.any(times < 0) or np.any(np.diff(times) <= 0):
            raise ValueError("time_from_start must be >= 0 and strictly increasing")
        q0, v0 = self.sample(t_now)
        K = times.size
        Q = np.repeat(q0[None, :], K, axis=0)
        Q[:, mask] = P
        Vf = np.zeros((K, self.n))
        if V is not None:
            Vf[:, mask] = V
        if times[0] == 0.0:  # a point at the start replaces the current setpoint (JTC: sampled at once)
            self._t, self._q, self._v = t_now + times, Q, Vf
        else:
            self._t = np.concatenate([[t_now], t_now + times])
            self._q = np.concatenate([q0[None, :], Q])
            self._v = np.concatenate([v0[None, :], Vf])
        self._hermite = V is not None

    def sample(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(position, velocity) setpoint at time ``t``."""
        T = self._t
        if t >= T[-1] or T.size == 1:
            return self._q[-1].copy(), np.zeros(self.n)
        if t <= T[0]:
            return self._q[0].copy(), self._v[0].copy() if self._hermite else np.zeros(self.n)
        i = int(np.searchsorted(T, t, side="right")) - 1
        h = T[i + 1] - T[i]
        s = (t - T[i]) / h
        q0, q1 = self._q[i], self._q[i + 1]
        if not self._hermite:
            return q0 + s * (q1 - q0), (q1 - q0) / h
        v0, v1 = self._v[i] * h, self._v[i + 1] * h
        s2, s3 = s * s, s * s * s
        q = (2 * s3 - 3 * s2 + 1) * q0 + (s3 - 2 * s2 + s) * v0 + (-2 * s3 + 3 * s2) * q1 + (s3 - s2) * v1
        dq = ((6 * s2 - 6 * s) * q0 + (3 * s2 - 4 * s + 1) * v0
              + (-6 * s2 + 6 * s) * q1 + (3 * s2 - 2 * s) * v1) / h
        return q, dq
