"""Offscreen RGB-D rendering of one MuJoCo camera: one render pass gives colour and depth.

``mujoco.Renderer`` renders the scene twice for colour + depth; this reads both buffers after a
single ``mjr_render`` (half the GPU/CPU time on software GL). The GL context belongs to the
thread that created it: render and close from that thread.
"""

from __future__ import annotations

import numpy as np

from . import ensure_gl_backend

ensure_gl_backend()
import mujoco  # noqa: E402


class RgbdRenderer:
    """Colour (uint8 RGB) + metric depth (float32 m along the optical axis) from a fixed camera."""

    def __init__(self, model: mujoco.MjModel, width: int, height: int, camera: int):
        self.model, self.width, self.height, self.camera = model, int(width), int(height), int(camera)
        self._gl = mujoco.GLContext(self.width, self.height)
        self._gl.make_current()
        self._con = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150.value)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN.value, self._con)
        self._reversed_z = hasattr(self._con, "readDepthMap")
        if self._reversed_z:  # MuJoCo >= 3.3: reversed-Z depth buffer, 1 = near ... 0 = far
            self._con.readDepthMap = mujoco.mjtDepthMap.mjDEPTH_ZEROFAR
        self._scene = mujoco.MjvScene(model, maxgeom=10000)
        self._opt = mujoco.MjvOption()
        self._cam = mujoco.MjvCamera()
        self._cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._cam.fixedcamid = self.camera
        self._rect = mujoco.MjrRect(0, 0, self.width, self.height)
        self._rgb = np.empty((self.height, self.width, 3), np.uint8)
        self._z = np.empty((self.height, self.width), np.float32)

    def render(self, data: mujoco.MjData, depth: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(rgb (H, W, 3) uint8, depth (H, W) float32 [m]) for the current state of ``data``.

        ``depth=False``: the depth buffer is neither read back nor converted (None; a third of the cost).
        """
        if self._con is None:
            raise RuntimeError("renderer is closed")
        self._gl.make_current()
        mujoco.mjv_updateScene(self.model, data, self._opt, None, self._cam,
                               mujoco.mjtCatBit.mjCAT_ALL.value, self._scene)
        mujoco.mjr_render(self._rect, self._scene, self._con)
        mujoco.mjr_readPixels(self._rgb, self._z if depth else None, self._rect, self._con)
        if not depth:
            return np.flipud(self._rgb).copy(), None
        extent = self.model.stat.extent
        near = np.float64(np.float32(self.model.vis.map.znear * extent))
        far = np.float64(np.float32(self.model.vis.map.zfar * extent))
        z = self._z.astype(np.float64)
        if self._reversed_z:
            c = -0.5 * (-(far + near) / (far - near)) - 0.5
            d = -0.5 * (-(2.0 * far * near) / (far - near))
            with np.errstate(divide="ignore"):
                depth = d / (z + c)
        else:  # classic depth buffer, 0 = near ... 1 = far
            depth = near / (1.0 - z * (1.0 - near / far))
        # OpenGL rows start at the bottom
        return np.flipud(self._rgb).copy(), np.flipud(depth).astype(np.float32)

    def close(self) -> None:
        """Free the GL resources (from the creating thread)."""
        con, self._con = self._con, None
        if con is None:
            return
        try:
            self._gl.make_current()
            con.free()
            self._gl.free()
        except Exception:  # noqa: BLE001 - at process exit the GL context may already be gone
            pass
