"""MuJoCo simulation: the scene (our URDFs + table, objects, camera) and the simulated arm.

No rclpy here; ``magma_ros.nodes.sim`` wraps :class:`~magma_ros.sim.arm.ArmSim` in ROS.

MuJoCo picks its OpenGL backend when it is first imported, from ``MUJOCO_GL``. Headless machines
need ``egl`` (libegl1 + libgl1-mesa-dri) or ``osmesa`` (libosmesa6); :func:`ensure_gl_backend`
chooses one of those when the variable is unset, so importing this package before mujoco is
enough. Import :class:`ArmSim` from ``magma_ros.sim.arm`` (or from here, lazily).
"""

from __future__ import annotations

import ctypes.util
import os
import sys


def ensure_gl_backend() -> str:
    """Set MUJOCO_GL / PYOPENGL_PLATFORM for offscreen rendering if unset; returns the backend.

    Preference: an explicit MUJOCO_GL, else EGL when libEGL is installed, else OSMesa. Must run
    before the first ``import mujoco`` in the process to take effect.
    """
    gl = os.environ.get("MUJOCO_GL", "").lower()
    if not gl and "mujoco" in sys.modules:  # too late to choose: mujoco kept its default (glfw)
        return "glfw"
    if not gl:
        if ctypes.util.find_library("EGL"):
            gl = "egl"
        elif ctypes.util.find_library("OSMesa"):
            gl = "osmesa"
        else:
            gl = "egl"  # rendering will fail with a clear message; physics still works
        os.environ["MUJOCO_GL"] = gl
    if gl in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", gl)
    return gl


ensure_gl_backend()


def __getattr__(name):  # lazy: importing magma_ros.sim does not import mujoco
    if name == "ArmSim":
        from magma_ros.sim.arm import ArmSim

        return ArmSim
    raise AttributeError(name)


__all__ = ["ArmSim", "ensure_gl_backend"]
