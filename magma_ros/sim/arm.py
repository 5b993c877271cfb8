"""ArmSim: one simulated arm (MuJoCo) with position-controlled joints, a gripper and a camera.

Plain Python, no ROS: the sim node, the closed-loop tests and the demo all drive it directly.

    sim = ArmSim("fr3")                 # home pose, targets = home
    sim.set_targets(q, gripper_m=0.02)  # arm joints [rad] in config order, finger [m]
    sim.step(250)                       # 0.5 s at 2 ms
    T = sim.tcp_pose()                  # 4x4 TCP pose in the robot base frame
    rgb, depth = sim.render_color(), sim.render_depth()   # (H, W, 3) uint8, (H, W) uint16 mm
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from magma_ros.core.errors import ConfigError
from magma_ros.core.realsense import CameraConfig, load_camera_config
from magma_ros.core.robot import RobotConfig, load_robot
from magma_ros.sim.render import RgbdRenderer
from magma_ros.sim.scene import SimConfig, build_scene, load_sim_config, mujoco


@dataclass(frozen=True)
class CameraInfo:
    """Pinhole model of the rendered images (no distortion)."""

    K: np.ndarray  # (3, 3) [px]
    width: int  # [px]
    height: int  # [px]
    frame_id: str  # optical frame name (camera_color_optical_frame)
    parent_frame: str  # robot base link the extrinsic is expressed in
    T_base_optical: np.ndarray  # (4, 4) optical frame pose in the robot base frame (at the call)


def default_camera(robot_name: str) -> str:
    """Name of the camera config used by the simulated scene of ``robot_name``."""
    return f"sim_{robot_name}"


class ArmSim:
    """A MuJoCo arm on a table with cubes and a fixed RGB-D camera.

    ``robot``: a RobotConfig or a robot name; ``camera``: a camera config name
    (``config/cameras/<name>.yaml``), a CameraConfig, or None for ``sim_<robot>``.
    """

    def __init__(self, robot: RobotConfig | str, *, camera: str | CameraConfig | None = None,
                 width: int = 640, height: int = 480, config: SimConfig | str | None = None):
        self.robot = robot if isinstance(robot, RobotConfig) else load_robot(robot)
        cam = camera if camera is not None else default_camera(self.robot.name)
        self.camera = cam if isinstance(cam, CameraConfig) else load_camera_config(cam)
        if width <= 0 or height <= 0:
            raise ConfigError(f"image size must be positive, got {width}x{height}")
        self.width, self.height = int(width), int(height)
        self.config = config if isinstance(config, SimConfig) else load_sim_config(config)
        self.model, self.info = build_scene(self.robot, self.camera, self.config, width=self.width,
                                            height=self.height)
        self.data = mujoco.MjData(self.model)
        self._renderer = None
        self._fresh = False
        self._home_objects = {n: self.data.qpos[a:a + 7].copy() for n, a in self.info.object_qadr.items()}
        self.reset()

    # -- state ------------------------------------------------------------------------------------
    @property
    def time(self) -> float:
        """Simulated time [s] since the last reset."""
        return float(self.data.time)

    @property
    def timestep(self) -> float:
        """Physics step [s]."""
        return float(self.model.opt.timestep)

    def reset(self, q: np.ndarray | None = None, gripper_m: float | None = None) -> None:
        """Arm to ``q`` (home by default), fingers to ``gripper_m`` (open), objects back, time 0."""
        mujoco.mj_resetData(self.model, self.data)
        q = self.robot.home if q is None else self._check(q, "q")
        g = self.robot.gripper.open if gripper_m is None else float(gripper_m)
        q = np.clip(q, self.robot.position_min, self.robot.position_max)
        g = float(np.clip(g, self.robot.gripper.low, self.robot.gripper.high))
        self.data.qpos[self.info.arm_qadr] = q
        self.data.qpos[self.info.finger_qadr] = g
        self.data.qpos[self.info.mimic_qadr] = self.info.mimic_mult * g
        for n, a in self.info.object_qadr.items():
            self.data.qpos[a:a + 7] = self._home_objects[n]
        self.set_targets(q, g)
        mujoco.mj_forward(self.model, self.data)
        self._fresh = True

    def set_targets(self, q_arm, gripper_m: float | None = None, qd_arm=None) -> None:
        """Joint position targets [rad] (config order), optional finger target [m] and velocity [rad/s].

        Targets are clipped to the joint ranges; a wrong shape or NaN raises ValueError.
        """
        q = self._check(q_arm, "q_arm")
        self.data.ctrl[self.info.arm_pos_act] = np.clip(q, self.robot.position_min, self.robot.position_max)
        qd = np.zeros(self.robot.dof) if qd_arm is None else self._check(qd_arm, "qd_arm")
        self.data.ctrl[self.info.arm_vel_act] = qd
        if gripper_m is not None:
            g = float(gripper_m)
            if not np.isfinite(g):
                raise ValueError("gripper_m must be finite")
            self.data.ctrl[self.info.finger_act] = np.clip(g, self.robot.gripper.low, self.robot.gripper.high)

    def targets(self) -> tuple[np.ndarray, float]:
        """Current (arm position targets [rad], finger target [m])."""
        return (self.data.ctrl[self.info.arm_pos_act].copy(), float(self.data.ctrl[self.info.finger_act]))

    def step(self, n: int = 1) -> None:
        """Advance physics by ``n`` steps of :attr:`timestep`."""
        mujoco.mj_step(self.model, self.data, nstep=int(n))
        self._fresh = False

    def _forward(self) -> None:
        if not self._fresh:  # mj_step leaves positions-dependent quantities one step behind
            mujoco.mj_forward(self.model, self.data)
            self._fresh = True

    def q(self) -> np.ndarray:
        """Arm joint positions [rad], config order."""
        return self.data.qpos[self.info.arm_qadr].copy()

    def qd(self) -> np.ndarray:
        """Arm joint velocities [rad/s]."""
        return self.data.qvel[self.info.arm_dadr].copy()

    def effort(self) -> np.ndarray:
        """Actuator torque per arm joint [N·m] (position + velocity servo)."""
        f = self.data.actuator_force
        return f[self.info.arm_pos_act] + f[self.info.arm_vel_act]

    def gripper(self) -> float:
        """Finger joint position [m]."""
        return float(self.data.qpos[self.info.finger_qadr])

    def gripper_velocity(self) -> float:
        """Finger joint velocity [m/s]."""
        return float(self.data.qvel[self.info.finger_dadr])

    def gripper_effort(self) -> float:
        """Finger actuator force [N]."""
        return float(self.data.actuator_force[self.info.finger_act])

    def joint_state(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(names, position, velocity, effort): arm joints, the finger joint and its mimic joints."""
        i = self.info
        names = [*self.robot.arm_joints, self.robot.gripper.joint, *self.robot.gripper.mimic_joints]
        qpos, qvel = self.data.qpos, self.data.qvel
        pos = np.concatenate([qpos[i.arm_qadr], [qpos[i.finger_qadr]], qpos[i.mimic_qadr]])
        vel = np.concatenate([qvel[i.arm_dadr], [qvel[i.finger_dadr]], qvel[i.mimic_dadr]])
        eff = np.concatenate([self.effort(), [self.gripper_effort()], np.zeros(len(i.mimic_qadr))])
        return names, pos, vel, eff

    def body_pose(self, body: str | int) -> np.ndarray:
        """4x4 pose of a MuJoCo body (a URDF link or an object) in the robot base frame."""
        self._forward()
        b = body if isinstance(body, int) else mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, body)
        if b < 0:
            raise KeyError(f"no body '{body}'")
        return np.linalg.solve(self._world(self.info.base_body), self._world(b))

    def _world(self, b: int) -> np.ndarray:
        T = np.eye(4)
        T[:3, :3] = self.data.xmat[b].reshape(3, 3)
        T[:3, 3] = self.data.xpos[b]
        return T

    def tcp_pose(self) -> np.ndarray:
        """4x4 pose of ``robot.tcp_link`` in ``robot.base_link``, from MuJoCo."""
        return self.body_pose(self.info.tcp_body)

    def object_names(self) -> list[str]:
        """Names of the free objects in the scene."""
        return list(self.info.object_qadr)

    # -- camera -----------------------------------------------------------------------------------
    def camera_info(self) -> CameraInfo:
        """Intrinsics and extrinsics of the rendered images."""
        return CameraInfo(K=self.camera.intrinsics(self.width, self.height), width=self.width,
                          height=self.height, frame_id=self.camera.optical_frame,
                          parent_frame=self.robot.base_link, T_base_optical=self.camera_pose())

    def camera_pose(self, state: mujoco.MjData | None = None) -> np.ndarray:
        """4x4 pose of the camera's optical frame in the robot base frame (a wrist camera moves).

        From ``state`` (e.g. a rendered :meth:`snapshot`) or the live data as of the last forward pass
        (``reset`` or a render). Never runs MuJoCo itself: safe to call from a render thread while
        physics steps.
        """
        d = self.data if state is None else state
        c = self.info.camera
        T = np.eye(4)  # MuJoCo camera: looks along -z, y up -> optical: +z forward, y down
        T[:3, :3] = d.cam_xmat[c].reshape(3, 3) @ np.diag([1.0, -1.0, -1.0])
        T[:3, 3] = d.cam_xpos[c]
        b = self.info.base_body
        T_wb = np.eye(4)
        T_wb[:3, :3] = d.xmat[b].reshape(3, 3)
        T_wb[:3, 3] = d.xpos[b]
        return np.linalg.solve(T_wb, T)

    def snapshot(self, out: mujoco.MjData | None = None) -> mujoco.MjData:
        """Copy of the current state (positions, time) for rendering it elsewhere while physics goes on."""
        if out is None:
            out = mujoco.MjData(self.model)
        out.qpos[:] = self.data.qpos
        out.qvel[:] = self.data.qvel
        out.time = self.data.time
        return out

    def render_rgbd(self, state: mujoco.MjData | None = None,
                    depth: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Colour (H, W, 3) uint8 RGB and depth (H, W) uint16 [mm] from one render pass.

        Depth is along the optical axis (as a RealSense reports it); 0 where nothing is within
        ``camera.depth_max``. ``state``: render a :meth:`snapshot` instead of the live state.
        ``depth=False``: colour only (depth None). Render from one thread (the GL context belongs to it).
        """
        if self._renderer is None:
            try:
                self._renderer = RgbdRenderer(self.model, self.width, self.height, self.info.camera)
            except Exception as e:  # noqa: BLE001 - GL errors come in many types
                raise RuntimeError(
                    f"MuJoCo offscreen rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: {e}. "
                    "Install libegl1 libgl1-mesa-dri (MUJOCO_GL=egl) or libosmesa6 (MUJOCO_GL=osmesa), "
                    "and set MUJOCO_GL before mujoco is first imported.") from None
        if state is None:
            self._forward()
            state = self.data
        else:
            mujoco.mj_forward(self.model, state)
        rgb, d = self._renderer.render(state, depth=depth)
        if d is None:
            return rgb, None
        ok = np.isfinite(d) & (d > 0) & (d < self.camera.depth_max)
        depth = np.where(ok, np.rint(d * 1000.0), 0).astype(np.uint16)
        return rgb, depth

    def render_color(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB from the scene camera."""
        return self.render_rgbd()[0]

    def render_depth(self) -> np.ndarray:
        """(H, W) uint16 depth along the optical axis [mm], 0 where nothing is within depth_max."""
        return self.render_rgbd()[1]

    def close(self) -> None:
        """Free the renderer (GL context); call from the thread that rendered."""
        r, self._renderer = self._renderer, None
        if r is not None:
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check(self, v, what: str) -> np.ndarray:
        a = np.asarray(v, dtype=float).reshape(-1)
        if a.shape != (self.robot.dof,):
            raise ValueError(f"{what} needs {self.robot.dof} values, got {a.size}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{what} contains NaN/inf")
        return a
