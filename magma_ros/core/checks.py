"""Input checks shared by the servo, the safety filter and the policy loop (ROS-free, numpy only).

- :func:`stamp_age`: is a header stamp usable now (not too old, not too far in the future)?
- :func:`read_joint_state`: a JointState's names/positions -> arm positions in ``arm_joints`` order
  (any order, extra joints allowed) and the gripper finger, or why the arm part is unusable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def stamp_age(stamp: float, now: float, max_age: float, future_tolerance: float = math.inf) -> tuple[str, float]:
    """Classify a stamp [s] at time ``now`` [s]: ``("", age)``, ``("stale", age)`` when older than
    ``max_age`` or ``("future", age)`` when more than ``future_tolerance`` ahead (age < 0).
    A zero stamp means "now" (ROS convention, as for JointTrajectoryController): age 0."""
    if stamp == 0.0:
        return "", 0.0
    age = now - stamp
    if age > max_age:
        return "stale", age
    if -age > future_tolerance:
        return "future", age
    return "", age


@dataclass(frozen=True)
class JointSample:
    """One joint-state message mapped onto a robot's joints."""

    arm: np.ndarray | None  # [dof] rad in arm_joints order; None when unusable or not present
    finger: float | None  # gripper finger position [m] when the message carries a finite one
    error: str  # '' or why the arm part is unusable ('' with arm None: the message names no arm joint)


def read_joint_state(names: Sequence[str], positions, arm_joints: Sequence[str],
                     finger_joint: str | None = None) -> JointSample:
    """Map ``names``/``positions`` (any order, extra joints allowed) onto ``arm_joints``."""
    names = [str(n) for n in names]
    try:
        pos = np.asarray(positions, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        return JointSample(None, None, "joint state positions are not numbers")
    if len(names) != pos.size:
        return JointSample(None, None, f"joint state has {len(names)} names but {pos.size} positions")
    idx = {n: i for i, n in enumerate(names)}
    finger = None
    if finger_joint is not None and finger_joint in idx and math.isfinite(pos[idx[finger_joint]]):
        finger = float(pos[idx[finger_joint]])
    if not any(j in idx for j in arm_joints):
        return JointSample(None, finger, "")  # e.g. a gripper-only joint state
    missing = [j for j in arm_joints if j not in idx]
    if missing:
        return JointSample(None, finger, f"joint state misses {', '.join(missing)}")
    q = pos[[idx[j] for j in arm_joints]]
    if not np.all(np.isfinite(q)):
        return JointSample(None, finger, "joint state has NaN/inf")
    return JointSample(q, finger, "")
