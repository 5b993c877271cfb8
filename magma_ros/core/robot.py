"""Per-robot description: joint names, limits, home pose, gripper mapping, controller topics.

Parsed in one place from ``config/robots/<robot>.yaml`` (ROS parameter file layout,
``/**: ros__parameters: ...``) into a frozen dataclass that every other component uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from magma_ros.core.errors import ConfigError, choose
from magma_ros.core.paths import data_path

ROBOTS = ("fr3", "panda", "wx250s")

# Name of the pseudo-joint that carries a normalized gripper command (0 closed ... 1 open)
# inside a JointTrajectory; the robot's own finger joint carries real units instead.
NORMALIZED_GRIPPER = "normalized_gripper"

DEFAULT_POSITION_MARGIN = 0.05  # [rad] RobotConfig.position_margin when a robot YAML does not set it


@dataclass(frozen=True)
class GripperConfig:
    """Gripper in real units and its mapping from the normalized command used upstream."""

    joint: str  # ros2_control finger joint commanded by position (fr3_finger_joint1, left_finger)
    closed: float  # finger position when fully closed [m] (normalized 0)
    open: float  # finger position when fully open [m] (normalized 1)
    velocity_max: float  # finger speed limit [m/s]
    mimic_joints: tuple[str, ...] = ()  # joints that mirror `joint` in the URDF (second finger)
    mimic_multipliers: tuple[float, ...] = ()  # multiplier per mimic joint (e.g. 1.0 or -1.0)

    def from_normalized(self, n: float) -> float:
        """Map a normalized command (0 closed ... 1 open, clipped) to the finger position [m]."""
        n = float(np.clip(n, 0.0, 1.0))
        return self.closed + n * (self.open - self.closed)

    def to_normalized(self, pos: float) -> float:
        """Map a finger position [m] to the normalized command (0 closed ... 1 open)."""
        return float(np.clip((pos - self.closed) / (self.open - self.closed), 0.0, 1.0))

    @property
    def low(self) -> float:
        return min(self.closed, self.open)

    @property
    def high(self) -> float:
        return max(self.closed, self.open)


@dataclass(frozen=True)
class PositionDependentVelocity:
    """Franka-style joint velocity limits that shrink near the position limits (libfranka).

    dq_upper_i(q) = min(vmax_i, max(0, -c_i + sqrt(max(0, k_i (q_upper_i - q_i)))))
    dq_lower_i(q) = max(-vmax_i, min(0,  c_i - sqrt(max(0, k_i (q_i - q_lower_i)))))
    """

    c: np.ndarray  # [rad/s]
    k: np.ndarray  # [rad/s^2]
    q_upper: np.ndarray  # [rad]
    q_lower: np.ndarray  # [rad]

    def bounds(self, q: np.ndarray, vmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) velocity bounds [rad/s] at joint position q."""
        up = np.minimum(vmax, np.maximum(0.0, -self.c + np.sqrt(np.maximum(0.0, self.k * (self.q_upper - q)))))
        lo = np.maximum(-vmax, np.minimum(0.0, self.c - np.sqrt(np.maximum(0.0, self.k * (q - self.q_lower)))))
        return lo, up


@dataclass(frozen=True)
class RobotConfig:
    """Everything the stack needs to know about one arm. Arrays are in `arm_joints` order."""

    name: str  # fr3 | panda | wx250s
    urdf: Path  # robot description used by kinematics and the simulator
    prefix: str  # link/joint name prefix ("fr3_", "panda_", "wx250s/" or "")
    base_link: str  # kinematic root (fr3_link0, panda_link0, wx250s/base_link)
    tcp_link: str  # tool centre point frame (fr3_hand_tcp, panda_hand_tcp, wx250s/ee_gripper_link)
    arm_joints: tuple[str, ...]  # joint names as the real driver publishes them
    position_min: np.ndarray  # [rad]
    position_max: np.ndarray  # [rad]
    velocity_max: np.ndarray  # [rad/s]
    acceleration_max: np.ndarray  # [rad/s^2]
    jerk_max: np.ndarray | None  # [rad/s^3]; None where the maker publishes none
    home: np.ndarray  # [rad] ready pose
    gripper: GripperConfig
    arm_controller: str  # JTC namespace, relative (e.g. "fr3_arm_controller", "wx250s/arm_controller")
    forward_controller: str  # forward_command_controller namespace (…/commands)
    gripper_controller: str  # gripper JTC namespace (…/joint_trajectory)
    joint_states_topic: str  # where the driver publishes joint states (relative)
    delta_mode: str  # servo: "target" (apply to previous target, Bridge) | "measured" (RT-1)
    position_dependent_velocity: PositionDependentVelocity | None = None
    # [rad] distance every commanded joint position keeps from position_min / position_max. ONE value
    # for the servo (it plans only inside the band) and the safety node (it clamps to the band), so a
    # servo target is never clamped downstream (MoveIt Servo: joint_limit_margins).
    position_margin: float = DEFAULT_POSITION_MARGIN
    sim_start: np.ndarray | None = None  # [rad] where the simulator starts the arm; None = home
    # Following error (safety node): the measured arm farther than this from what was commanded for
    # the state's stamp -> hold at the measured position until resume. None: no check.
    following_error_max: np.ndarray | None = None  # [rad] per joint
    following_error_lag: float = 0.1  # [s] the arm may lag its command by up to this much (not an error)
    extra: dict = field(default_factory=dict)  # unparsed keys, kept for forward compatibility

    @property
    def dof(self) -> int:
        return len(self.arm_joints)

    @property
    def start(self) -> np.ndarray:
        """[rad] the simulator's start pose: ``sim_start`` when the YAML sets one, else ``home``."""
        return (self.home if self.sim_start is None else self.sim_start).copy()


def _arr(d: dict, key: str, n: int, src: Path) -> np.ndarray:
    try:
        a = np.asarray(d[key], dtype=float)
    except KeyError:
        raise ConfigError(f"{src}: missing key '{key}'") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{src}: '{key}' must be a list of numbers") from None
    if a.shape != (n,):
        raise ConfigError(f"{src}: '{key}' needs {n} values, got {a.size}")
    return a


def load_robot(name_or_path: str | Path) -> RobotConfig:
    """Load ``config/robots/<name>.yaml`` (or an explicit YAML path) into a RobotConfig."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        src = p
        if not src.is_file():
            raise ConfigError(f"robot config file not found: {src}")
    else:
        choose(str(name_or_path), ROBOTS, "robot")
        src = data_path("config", "robots", f"{name_or_path}.yaml")
    try:
        raw = yaml.safe_load(src.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: malformed YAML ({str(e).splitlines()[0]})") from None
    try:
        d = dict(raw["/**"]["ros__parameters"])
    except (TypeError, KeyError):
        raise ConfigError(f"{src}: expected '/**: ros__parameters:' at the top") from None
    try:
        joints = tuple(str(j) for j in d["arm_joints"])
        n = len(joints)
        g = d["gripper"]
        gripper = GripperConfig(
            joint=str(g["joint"]),
            closed=float(g["closed"]),
            open=float(g["open"]),
            velocity_max=float(g["velocity_max"]),
            mimic_joints=tuple(g.get("mimic_joints", []) or []),
            mimic_multipliers=tuple(float(x) for x in g.get("mimic_multipliers", []) or []),
        )
        pdv = None
        if d.get("position_dependent_velocity"):
            v = d["position_dependent_velocity"]
            pdv = PositionDependentVelocity(
                c=_arr(v, "c", n, src), k=_arr(v, "k", n, src),
                q_upper=_arr(v, "q_upper", n, src), q_lower=_arr(v, "q_lower", n, src),
            )
        jerk = d.get("jerk_max") or None
        fe = d.get("following_error") or {}
        fe_max = None if "max" not in fe else _arr(fe, "max", n, src)
        if fe_max is not None and not np.all(fe_max > 0):
            raise ConfigError(f"{src}: following_error.max must be > 0 for every joint")
        fe_lag = float(fe.get("lag", 0.1))
        if not fe_lag >= 0:
            raise ConfigError(f"{src}: following_error.lag must be >= 0 s")
        urdf = Path(d["urdf"])
        if not urdf.is_absolute():
            urdf = data_path("urdf", d["urdf"])
        known = {"robot", "urdf", "prefix", "base_link", "tcp_link", "arm_joints", "position_min", "position_max",
                 "velocity_max", "acceleration_max", "jerk_max", "home", "gripper", "arm_controller",
                 "forward_controller", "gripper_controller", "joint_states_topic", "delta_mode",
                 "position_dependent_velocity", "position_margin", "sim_start", "following_error"}
        margin = float(d.get("position_margin", DEFAULT_POSITION_MARGIN))
        sim_start = None if d.get("sim_start") in (None, []) else _arr(d, "sim_start", n, src)
        cfg = RobotConfig(
            name=str(d["robot"]),
            urdf=urdf,
            prefix=str(d.get("prefix", "")),
            base_link=str(d["base_link"]),
            tcp_link=str(d["tcp_link"]),
            arm_joints=joints,
            position_min=_arr(d, "position_min", n, src),
            position_max=_arr(d, "position_max", n, src),
            velocity_max=_arr(d, "velocity_max", n, src),
            acceleration_max=_arr(d, "acceleration_max", n, src),
            jerk_max=None if jerk is None else _arr(d, "jerk_max", n, src),
            home=_arr(d, "home", n, src),
            gripper=gripper,
            arm_controller=str(d["arm_controller"]),
            forward_controller=str(d["forward_controller"]),
            gripper_controller=str(d["gripper_controller"]),
            joint_states_topic=str(d.get("joint_states_topic", "joint_states")),
            delta_mode=choose(str(d.get("delta_mode", "target")), ("target", "measured"), "delta_mode"),
            position_dependent_velocity=pdv,
            position_margin=margin,
            sim_start=sim_start,
            following_error_max=fe_max,
            following_error_lag=fe_lag,
            extra={k: v for k, v in d.items() if k not in known},
        )
    except KeyError as e:
        raise ConfigError(f"{src}: missing key {e}") from None
    if not np.all(cfg.position_min < cfg.position_max):
        raise ConfigError(f"{src}: position_min must be below position_max for every joint")
    if not np.all((cfg.home >= cfg.position_min) & (cfg.home <= cfg.position_max)):
        raise ConfigError(f"{src}: home pose outside the position limits")
    if not (math.isfinite(cfg.position_margin) and cfg.position_margin >= 0.0
            and np.all(cfg.position_max - cfg.position_min > 2 * cfg.position_margin)):
        raise ConfigError(f"{src}: position_margin must be >= 0 rad and leave room inside every joint's "
                          f"range, got {cfg.position_margin}")
    if cfg.sim_start is not None and not np.all((cfg.sim_start >= cfg.position_min + cfg.position_margin)
                                                & (cfg.sim_start <= cfg.position_max - cfg.position_margin)):
        raise ConfigError(f"{src}: sim_start must lie inside the position limits less position_margin")
    return cfg
