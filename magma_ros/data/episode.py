"""What one recorded frame holds, and the action in Magma's convention (ROS-free, numpy only).

Features of a recorded dataset (``recording_features``), per frame at the dataset rate:

========================== ======= ===============================================================
``observation.images.<c>`` video   colour image (H, W, 3) RGB
``observation.state``      float32 arm joint positions [rad] + gripper (0 closed ... 1 open, measured)
``observation.ee_pose``    float32 TCP pose in the base frame: x, y, z [m], qx, qy, qz, qw
``action``                 float32 Magma's convention: dx, dy, dz [m], droll, dpitch, dyaw [rad, static
                                   'sxyz'], gripper (0 closed ... 1 open): the base-frame TCP delta from this
                                   frame to one ``step_period`` later (the motion actually made)
``action.joints``          float32 the command that reached the controller (after the safety filter):
                                   arm joint positions [rad] + gripper (normalized)
``teleop.intent``          float32 the operator's request: teleop/ee_twist (vx, vy, vz [m/s], wx, wy, wz
                                   [rad/s]) + teleop/gripper; zeros when there was none
``safety.source``          int64   who drove the controller: 0 hold, 1 policy, 2 teleop (/safety/source)
``intervention``           bool    teleop drove this frame
``observation.stamp``      float64 the frame's ROS time [s] (node clock; lines up with the MCAP bag)
========================== ======= ===============================================================

The Magma action follows ``core/actions.py``: a decoded action ``[dx, dy, dz, droll, dpitch, dyaw, g]`` is
applied as ``p' = p + d``, ``R' = euler2mat(droll, dpitch, dyaw) @ R`` over one step period. Here the
inverse: ``d = p(t + T) - p(t)`` and ``(droll, dpitch, dyaw) = mat2euler(R(t + T) R(t)^T)``, with ``T``
the ``step_period`` (a whole number of frames).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from magma_ros.core.actions import euler2mat
from magma_ros.core.errors import ConfigError

SOURCES = {"hold": 0, "policy": 1, "teleop": 2}
MAGMA_ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]


def mat2euler(R) -> np.ndarray:
    """Rotation matrix (3, 3) -> static 'sxyz' Euler angles (roll, pitch, yaw) [rad], ``R = Rz Ry Rx``.

    The inverse of :func:`magma_ros.core.actions.euler2mat` (transforms3d's ``mat2euler`` for 'sxyz').
    """
    M = np.asarray(R, dtype=np.float64).reshape(3, 3)
    cy = math.hypot(M[0, 0], M[1, 0])
    if cy > 1e-12:
        roll = math.atan2(M[2, 1], M[2, 2])
        pitch = math.atan2(-M[2, 0], cy)
        yaw = math.atan2(M[1, 0], M[0, 0])
    else:  # gimbal lock: pitch = +-90 deg, yaw taken as 0
        roll = math.atan2(-M[1, 2], M[1, 1])
        pitch = math.atan2(-M[2, 0], cy)
        yaw = 0.0
    return np.array([roll, pitch, yaw])


def magma_delta(pose_from: np.ndarray, pose_to: np.ndarray, gripper: float) -> np.ndarray:
    """Base-frame TCP delta between two 4x4 poses in Magma's 7-D convention (float64)."""
    a, b = np.asarray(pose_from, np.float64), np.asarray(pose_to, np.float64)
    d = np.empty(7)
    d[:3] = b[:3, 3] - a[:3, 3]
    d[3:6] = mat2euler(b[:3, :3] @ a[:3, :3].T)
    d[6] = float(np.clip(gripper, 0.0, 1.0))
    return d


def apply_magma_delta(pose: np.ndarray, action) -> np.ndarray:
    """The pose reached by applying a Magma action to ``pose`` (for checks: the forward convention)."""
    a = np.asarray(action, np.float64)
    out = np.array(pose, np.float64, copy=True)
    out[:3, 3] = out[:3, 3] + a[:3]
    out[:3, :3] = euler2mat(*a[3:6]) @ out[:3, :3]
    return out


def pose_to_vector(pose: np.ndarray) -> np.ndarray:
    """4x4 pose -> (7,) x, y, z, qx, qy, qz, qw (w >= 0)."""
    from magma_ros.core.kinematics import matrix_to_quat

    p = np.asarray(pose, np.float64)
    return np.concatenate([p[:3, 3], matrix_to_quat(p[:3, :3])])


def step_frames(step_period: float, fps: int) -> int:
    """Frames per step period; ConfigError unless ``step_period * fps`` is a whole number >= 1."""
    k = step_period * fps
    if not (math.isfinite(k) and k >= 1 - 1e-6 and abs(k - round(k)) < 1e-6):
        raise ConfigError(f"step_period {step_period} s must be a whole number (>= 1) of frames at {fps} fps "
                          f"(e.g. {1.0 / fps:g}, {2.0 / fps:g} s)")
    return int(round(k))


def recording_features(camera: str, height: int, width: int, arm_joints: list[str]) -> dict:
    """The LeRobot features of a recording (see the module docstring)."""
    n = len(arm_joints) + 1
    joints = [*arm_joints, "gripper"]
    return {
        f"observation.images.{camera}": {"dtype": "video", "shape": [height, width, 3], "names": None},
        "observation.state": {"dtype": "float32", "shape": [n], "names": joints},
        "observation.ee_pose": {"dtype": "float32", "shape": [7], "names": ["x", "y", "z", "qx", "qy", "qz", "qw"]},
        "action": {"dtype": "float32", "shape": [7], "names": MAGMA_ACTION_NAMES},
        "action.joints": {"dtype": "float32", "shape": [n], "names": joints},
        "teleop.intent": {"dtype": "float32", "shape": [7], "names": ["vx", "vy", "vz", "wx", "wy", "wz", "gripper"]},
        "safety.source": {"dtype": "int64", "shape": [1], "names": list(SOURCES)},
        "intervention": {"dtype": "bool", "shape": [1], "names": None},
        "observation.stamp": {"dtype": "float64", "shape": [1], "names": None},
    }


@dataclass
class Sample:
    """One frame as sampled (before its Magma action is known)."""

    values: dict  # every feature except "action"
    pose: np.ndarray  # (4, 4) measured TCP pose
    gripper_command: float  # normalized gripper command in effect (0 closed ... 1 open)


class ActionLookahead:
    """Delays frames by one step period so each gets its Magma action from the pose reached.

    ``push(sample)`` returns the frames that are now complete (at most one); ``flush()`` returns the
    rest at the end of the episode, whose actions use the last pose (the arm's final position).
    """

    def __init__(self, k: int):
        if k < 1:
            raise ValueError("lookahead needs k >= 1 frames")
        self.k = k
        self._buf: deque[Sample] = deque()

    def _emit(self, s: Sample, target: np.ndarray) -> dict:
        return {**s.values, "action": magma_delta(s.pose, target, s.gripper_command).astype(np.float32)}

    def push(self, s: Sample) -> list[dict]:
        """Add the newest frame; returns the frame ``k`` back with its action, once there is one."""
        self._buf.append(s)
        if len(self._buf) > self.k:
            first = self._buf.popleft()
            return [self._emit(first, s.pose)]
        return []

    def flush(self) -> list[dict]:
        """The frames still waiting, with actions toward the last pose."""
        if not self._buf:
            return []
        last = self._buf[-1].pose
        out = [self._emit(s, last) for s in self._buf]
        self._buf.clear()
        return out

    def __len__(self) -> int:
        return len(self._buf)
