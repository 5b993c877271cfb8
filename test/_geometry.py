"""Independent reference rotations for tests (plain numpy; deliberately not the project's own helpers)."""

import math

import numpy as np


def rot(axis: str, a: float) -> np.ndarray:
    """Elementary rotation about x, y or z by ``a`` radians."""
    c, s = math.cos(a), math.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def exp_so3(rv) -> np.ndarray:
    """Rodrigues: rotation vector -> rotation matrix."""
    th = float(np.linalg.norm(rv))
    if th < 1e-12:
        return np.eye(3)
    k = np.asarray(rv) / th
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * K + (1 - math.cos(th)) * K @ K
