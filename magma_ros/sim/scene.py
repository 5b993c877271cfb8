"""Build the MuJoCo scene for one robot: our URDF + table, cubes, lights, camera, actuators.

The robot comes from ``urdf/<robot>.urdf`` (MuJoCo's URDF importer; fixed frames such as the TCP
stay bodies, the finger mimic becomes a joint equality). Per robot, ``config/sim/mujoco.yaml``
sets the joint gains and the objects on the table. The robot base sits at the world origin on the
table top (z = 0), so world coordinates equal the robot base frame.

Arm joints get two actuators each — a position servo (kp) and a velocity servo (kv) — so a
trajectory follower can feed the desired velocity forward (force = kp (q* - q) + kv (qd* - qd)),
as ros2_control's JTC does; every robot body is gravity compensated (as Franka's controller and
the Dynamixel position loop effectively are), so the arm holds its target with no sag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from magma_ros.core.errors import ConfigError
from magma_ros.core.paths import data_path
from magma_ros.core.realsense import CameraConfig
from magma_ros.core.robot import RobotConfig

from . import ensure_gl_backend

ensure_gl_backend()
import mujoco  # noqa: E402  (after the GL backend is chosen)

CAMERA_NAME = "camera"  # the MuJoCo camera that renders the RealSense images
TCP_SITE = "tcp"
ROBOT_CONTYPE, ROBOT_CONAFFINITY = 2, 1  # robot geoms touch the world, never each other
WORLD_CONTYPE, WORLD_CONAFFINITY = 1, 3


@dataclass(frozen=True)
class RobotPhysics:
    """Joint servo gains and joint properties for one robot, arrays in arm_joints order."""

    kp: tuple[float, ...]  # position gain per arm joint [N·m/rad]
    kv: tuple[float, ...]  # velocity gain per arm joint [N·m·s/rad]
    armature: tuple[float, ...]  # rotor inertia added per arm joint [kg·m²]
    damping: float = 0.0  # passive joint damping, every joint [N·m·s/rad]
    frictionloss: float = 0.0  # dry friction, every joint [N·m]; > 0 leaves a steady-state error
    gripper_kp: float = 2000.0  # finger position gain [N/m]
    gripper_kv: float = 40.0  # finger damping [N·s/m]
    gripper_force: float = 70.0  # finger force limit [N]
    gripper_armature: float = 0.01  # [kg]


@dataclass(frozen=True)
class SceneObject:
    """A free box on the table."""

    name: str
    size: float  # edge length [m]
    xy: tuple[float, float]  # position on the table, robot base frame [m]
    rgba: tuple[float, float, float, float]
    mass: float = 0.05  # [kg]


@dataclass(frozen=True)
class SimConfig:
    """Physics and scene settings (config/sim/mujoco.yaml)."""

    timestep: float = 0.002  # physics step [s]; <= 0.002 (>= 500 Hz)
    table_size: tuple[float, float] = (1.2, 1.4)  # table top x, y extent [m]
    table_center_x: float = 0.35  # [m] in the robot base frame; top at z = 0
    table_height: float = 0.75  # [m] floor at z = -table_height
    physics: dict = field(default_factory=dict)  # robot name -> RobotPhysics
    objects: dict = field(default_factory=dict)  # robot name -> tuple[SceneObject, ...]

    def __post_init__(self):
        if not (0 < self.timestep <= 0.002):
            raise ConfigError(f"sim timestep must be in (0, 0.002] s (>= 500 Hz), got {self.timestep}")


def _floats(v, n: int | None, what: str) -> tuple[float, ...]:
    try:
        t = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a list of numbers") from None
    if n is not None and len(t) != n:
        raise ConfigError(f"{what} needs {n} values, got {len(t)}")
    return t


def load_sim_config(path: str | Path | None = None) -> SimConfig:
    """Parse ``config/sim/mujoco.yaml`` (or ``path``) into a SimConfig."""
    src = Path(path) if path else data_path("config", "sim", "mujoco.yaml")
    if not src.is_file():
        raise ConfigError(f"sim config file not found: {src}")
    try:
        d = dict(yaml.safe_load(src.read_text())["/**"]["ros__parameters"])
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: malformed YAML ({str(e).splitlines()[0]})") from None
    except (TypeError, KeyError):
        raise ConfigError(f"{src}: expected '/**: ros__parameters:' at the top") from None
    physics, objects = {}, {}
    try:
        for robot, p in (d.get("physics") or {}).items():
            n = len(p["kp"])
            physics[robot] = RobotPhysics(
                kp=_floats(p["kp"], n, f"{src}: physics.{robot}.kp"),
                kv=_floats(p["kv"], n, f"{src}: physics.{robot}.kv"),
                armature=_floats(p["armature"], n, f"{src}: physics.{robot}.armature"),
                **{k: float(p[k]) for k in ("damping", "frictionloss", "gripper_kp", "gripper_kv",
                                            "gripper_force", "gripper_armature") if k in p},
            )
        for robot, objs in (d.get("objects") or {}).items():
            objects[robot] = tuple(
                SceneObject(name=str(n), size=float(o["size"]), xy=_floats(o["xy"], 2, f"{src}: {n}.xy"),
                            rgba=_floats(o["rgba"], 4, f"{src}: {n}.rgba"), mass=float(o.get("mass", 0.05)))
                for n, o in (objs or {}).items())
        return SimConfig(
            timestep=float(d.get("timestep", 0.002)),
            table_size=_floats(d.get("table_size", (1.2, 1.4)), 2, f"{src}: table_size"),
            table_center_x=float(d.get("table_center_x", 0.35)),
            table_height=float(d.get("table_height", 0.75)),
            physics=physics, objects=objects,
        )
    except KeyError as e:
        raise ConfigError(f"{src}: missing key {e}") from None


@dataclass
class SceneInfo:
    """Names and indices the simulated arm needs, resolved once after compiling."""

    arm_qadr: np.ndarray  # qpos address per arm joint
    arm_dadr: np.ndarray  # qvel address per arm joint
    arm_pos_act: np.ndarray  # position actuator id per arm joint
    arm_vel_act: np.ndarray  # velocity actuator id per arm joint
    finger_qadr: int
    finger_dadr: int
    finger_act: int
    mimic_qadr: np.ndarray  # qpos address per mimic joint
    mimic_dadr: np.ndarray
    mimic_mult: np.ndarray
    base_body: int
    tcp_body: int
    camera: int
    object_qadr: dict  # object name -> qpos address of its free joint


def _mat_to_quat(R: np.ndarray) -> np.ndarray:
    q = np.zeros(4)
    mujoco.mju_mat2Quat(q, np.ascontiguousarray(R, dtype=np.float64).reshape(9))
    return q


def build_scene(robot: RobotConfig, camera: CameraConfig, sim: SimConfig, *,
                width: int = 640, height: int = 480) -> tuple[mujoco.MjModel, SceneInfo]:
    """Compile the scene for ``robot`` with ``camera``; returns the model and its index table."""
    if not Path(robot.urdf).is_file():
        raise ConfigError(f"robot description not found: {robot.urdf}")
    phys = sim.physics.get(robot.name)
    if phys is None:
        raise ConfigError(f"no physics.{robot.name} section in the sim config")
    if len(phys.kp) != robot.dof:
        raise ConfigError(f"physics.{robot.name}: {len(phys.kp)} gains for {robot.dof} joints")
    spec = mujoco.MjSpec.from_file(str(robot.urdf))
    spec.modelname = f"magma_ros_{robot.name}"
    spec.compiler.fusestatic = False
    spec.option.timestep = sim.timestep
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    spec.option.cone = mujoco.mjtCone.mjCONE_ELLIPTIC
    spec.option.impratio = 10.0  # firmer grasps (less slip) with elliptic cones
    spec.visual.global_.offwidth = max(int(width), 640)
    spec.visual.global_.offheight = max(int(height), 480)
    # No multisampling: the resolved depth buffer of an MSAA framebuffer is off by a few mm, and
    # rendering is ~2x faster on software GL.
    spec.visual.quality.offsamples = 0
    spec.visual.map.znear = 0.01
    spec.visual.map.zfar = 50.0
    spec.stat.extent = 1.0  # znear/zfar are in units of extent: 1 cm ... 50 m
    spec.stat.center = [0.35, 0.0, 0.2]
    spec.visual.headlight.ambient = [0.35, 0.35, 0.35]
    spec.visual.headlight.diffuse = [0.4, 0.4, 0.4]

    names = {b.name for b in spec.bodies}
    for link in (robot.base_link, robot.tcp_link):
        if link not in names:
            raise ConfigError(f"{robot.urdf}: no link '{link}'")
    joints = {j.name: j for j in spec.joints}
    needed = (*robot.arm_joints, robot.gripper.joint, *robot.gripper.mimic_joints)
    missing = [j for j in needed if j not in joints]
    if missing:
        raise ConfigError(f"{robot.urdf}: joints {missing} not found")

    # Robot: gravity compensated, no self-collision, joint properties from the sim config.
    base = spec.body(robot.base_link)
    base.pos = [0.0, 0.0, 0.0]
    for b in spec.bodies:
        if b.name != "world":
            b.gravcomp = 1.0
    for g in spec.geoms:
        g.contype, g.conaffinity = ROBOT_CONTYPE, ROBOT_CONAFFINITY
        g.rgba = [0.92, 0.92, 0.92, 1.0]
        g.friction = [1.5, 0.02, 0.002]
        g.condim = 4
    for j in spec.joints:
        j.damping = [phys.damping, 0.0, 0.0]  # MuJoCo >= 3.4: polynomial damping coefficients
        j.frictionloss = phys.frictionloss
    for i, name in enumerate(robot.arm_joints):
        joints[name].armature = phys.armature[i]
    for name in (robot.gripper.joint, *robot.gripper.mimic_joints):
        joints[name].armature = phys.gripper_armature
        joints[name].damping = [max(phys.damping, 0.5 * phys.gripper_kv), 0.0, 0.0]
    # Hand / finger geoms dark so they stand out in the images.
    finger_bodies = set()
    for name in (robot.gripper.joint, *robot.gripper.mimic_joints):
        finger_bodies.add(joints[name].parent.name)
    for g in spec.geoms:
        if g.parent.name in finger_bodies:
            g.rgba = [0.2, 0.2, 0.22, 1.0]
    # Joints that are neither arm nor gripper (the WidowX gripper servo horn) are locked at 0.
    for name, j in joints.items():
        if name not in needed and j.type != mujoco.mjtJoint.mjJNT_FREE:
            eq = spec.add_equality()
            eq.type = mujoco.mjtEq.mjEQ_JOINT
            eq.name1 = name
            eq.data[:5] = [0, 0, 0, 0, 0]
    # The finger mimic: the importer turns <mimic> into a joint equality; add it if it did not.
    have_eq = {(e.name1, e.name2) for e in spec.equalities if e.type == mujoco.mjtEq.mjEQ_JOINT}
    for name, mult in zip(robot.gripper.mimic_joints, robot.gripper.mimic_multipliers or
                          (1.0,) * len(robot.gripper.mimic_joints)):
        if (name, robot.gripper.joint) not in have_eq:
            eq = spec.add_equality()
            eq.type = mujoco.mjtEq.mjEQ_JOINT
            eq.name1, eq.name2 = name, robot.gripper.joint
            eq.data[:5] = [0, mult, 0, 0, 0]
    for e in spec.equalities:  # stiff constraint (small timeconst) so the fingers move as one
        e.solref = [0.005, 1.0]
    spec.body(robot.tcp_link).add_site(name=TCP_SITE, size=[0.005, 0, 0], rgba=[1, 0, 0, 0.0])

    # Actuators: arm = position servo + velocity servo; gripper = position servo on the finger.
    for i, name in enumerate(robot.arm_joints):
        lo, hi = joints[name].range
        a = spec.add_actuator(name=f"{name}_pos", target=name, trntype=mujoco.mjtTrn.mjTRN_JOINT)
        a.set_to_position(kp=phys.kp[i], kv=0.0)
        a.ctrlrange = [lo, hi]
        a.ctrllimited = mujoco.mjtLimited.mjLIMITED_TRUE
        v = spec.add_actuator(name=f"{name}_vel", target=name, trntype=mujoco.mjtTrn.mjTRN_JOINT)
        v.set_to_velocity(kv=phys.kv[i])
        vmax = float(robot.velocity_max[i]) * 2.0
        v.ctrlrange = [-vmax, vmax]
        v.ctrllimited = mujoco.mjtLimited.mjLIMITED_TRUE
    g = robot.gripper
    a = spec.add_actuator(name=f"{g.joint}_pos", target=g.joint, trntype=mujoco.mjtTrn.mjTRN_JOINT)
    a.set_to_position(kp=phys.gripper_kp, kv=phys.gripper_kv)
    a.ctrlrange = [g.low, g.high]
    a.ctrllimited = mujoco.mjtLimited.mjLIMITED_TRUE
    a.forcerange = [-phys.gripper_force, phys.gripper_force]
    a.forcelimited = mujoco.mjtLimited.mjLIMITED_TRUE

    # World: floor, table (top at z = 0), light, objects, camera.
    wb = spec.worldbody
    floor = wb.add_geom(name="floor", type=mujoco.mjtGeom.mjGEOM_PLANE, size=[3, 3, 0.05],
                        pos=[0, 0, -sim.table_height], rgba=[0.45, 0.47, 0.5, 1])
    sx, sy = sim.table_size
    table = wb.add_geom(name="table", type=mujoco.mjtGeom.mjGEOM_BOX, size=[sx / 2, sy / 2, 0.02],
                        pos=[sim.table_center_x, 0, -0.02], rgba=[0.72, 0.58, 0.42, 1])
    for geom in (floor, table):
        geom.contype, geom.conaffinity = WORLD_CONTYPE, WORLD_CONAFFINITY
        geom.friction = [1.0, 0.01, 0.001]
    light = wb.add_light(name="top", pos=[0.3, 0.0, 2.5], dir=[0, 0, -1])
    light.castshadow = False
    light.diffuse = [0.6, 0.6, 0.6]
    for obj in sim.objects.get(robot.name, ()):
        b = wb.add_body(name=obj.name, pos=[obj.xy[0], obj.xy[1], obj.size / 2 + 1e-4])
        b.add_freejoint(name=f"{obj.name}_free")
        geom = b.add_geom(name=obj.name, type=mujoco.mjtGeom.mjGEOM_BOX, size=[obj.size / 2] * 3,
                          rgba=list(obj.rgba), mass=obj.mass)
        geom.contype, geom.conaffinity = WORLD_CONTYPE, WORLD_CONAFFINITY
        geom.condim = 4
        geom.friction = [1.2, 0.02, 0.002]
    # MuJoCo cameras look along -z with y up; the optical frame looks along +z with y down.
    # The camera hangs from its config's parent_frame: the base link (world = base here) for a fixed
    # camera, or a robot link (e.g. fr3_hand) for a wrist-mounted one that moves with the arm.
    R_mj = camera.rotation_optical() @ np.diag([1.0, -1.0, -1.0])
    if camera.parent_frame == robot.base_link:
        mount = wb
    elif camera.parent_frame in names:
        mount = spec.body(camera.parent_frame)
    else:
        raise ConfigError(f"camera '{camera.name}': parent_frame '{camera.parent_frame}' is not a link of "
                          f"{robot.name} (base link: {robot.base_link})")
    mount.add_camera(name=CAMERA_NAME, pos=list(camera.position), quat=list(_mat_to_quat(R_mj)),
                     fovy=_fovy_for(camera, width, height))
    spec.add_key(name="home")

    model = spec.compile()
    info = _index(model, robot)
    return model, info


def _fovy_for(camera: CameraConfig, width: int, height: int) -> float:
    """Vertical FOV [deg] giving the configured focal length at this resolution."""
    fy = camera.intrinsics(width, height)[1, 1]
    return math.degrees(2 * math.atan(0.5 * height / fy))


def _index(model: mujoco.MjModel, robot: RobotConfig) -> SceneInfo:
    def jid(name):
        return mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, name)

    def aid(name):
        return mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_ACTUATOR, name)

    arm = [jid(n) for n in robot.arm_joints]
    fj = jid(robot.gripper.joint)
    mim = [jid(n) for n in robot.gripper.mimic_joints]
    mult = robot.gripper.mimic_multipliers or (1.0,) * len(mim)
    objects = {}
    for j in range(model.njnt):
        if model.jnt_type[j] == mujoco.mjtJoint.mjJNT_FREE:
            objects[model.body(model.jnt_bodyid[j]).name] = int(model.jnt_qposadr[j])
    return SceneInfo(
        arm_qadr=model.jnt_qposadr[arm].copy(), arm_dadr=model.jnt_dofadr[arm].copy(),
        arm_pos_act=np.array([aid(f"{n}_pos") for n in robot.arm_joints]),
        arm_vel_act=np.array([aid(f"{n}_vel") for n in robot.arm_joints]),
        finger_qadr=int(model.jnt_qposadr[fj]), finger_dadr=int(model.jnt_dofadr[fj]),
        finger_act=aid(f"{robot.gripper.joint}_pos"),
        mimic_qadr=model.jnt_qposadr[mim].copy() if mim else np.zeros(0, int),
        mimic_dadr=model.jnt_dofadr[mim].copy() if mim else np.zeros(0, int),
        mimic_mult=np.asarray(mult, float),
        base_body=mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, robot.base_link),
        tcp_body=mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, robot.tcp_link),
        camera=mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, CAMERA_NAME),
        object_qadr=objects,
    )
