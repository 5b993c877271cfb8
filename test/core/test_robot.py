"""Robot descriptions: YAML configs, URDFs (parsed as plain XML, in MuJoCo) and their agreement."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from magma_ros.core.errors import ConfigError
from magma_ros.core.paths import data_path
from magma_ros.core.robot import ROBOTS, load_robot

# Published values (ROBOT_FACTS / makers' sources), written out here independently of the YAMLs.
EXPECTED = {
    "fr3": dict(
        joints=tuple(f"fr3_joint{i}" for i in range(1, 8)),
        lower=[-2.7437, -1.7837, -2.9007, -3.0421, -2.8065, 0.5445, -3.0159],
        upper=[2.7437, 1.7837, 2.9007, -0.1518, 2.8065, 4.5169, 3.0159],
        vel=[2.62, 2.62, 2.62, 2.62, 5.26, 4.18, 5.26],
        acc=[10.0] * 7, jerk=[5000.0] * 7,
        home=[0, -np.pi / 4, 0, -3 * np.pi / 4, 0, np.pi / 2, np.pi / 4],
        finger=("fr3_finger_joint1", 0.0, 0.04), mimic=("fr3_finger_joint2", 1.0),
        base="fr3_link0", tcp="fr3_hand_tcp", arm="fr3_arm_controller", states="joint_states", delta="measured"),
    "panda": dict(
        joints=tuple(f"panda_joint{i}" for i in range(1, 8)),
        lower=[-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973],
        upper=[2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973],
        vel=[2.175] * 4 + [2.61] * 3,
        acc=[15, 7.5, 10, 12.5, 15, 20, 20], jerk=[7500, 3750, 5000, 6250, 7500, 10000, 10000],
        home=[0, -np.pi / 4, 0, -3 * np.pi / 4, 0, np.pi / 2, np.pi / 4],
        finger=("panda_finger_joint1", 0.0, 0.04), mimic=("panda_finger_joint2", 1.0),
        base="panda_link0", tcp="panda_hand_tcp", arm="panda_arm_controller", states="joint_states",
        delta="measured"),
    "wx250s": dict(
        joints=("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate"),
        lower=[-(np.pi - 1e-5), math.radians(-108), math.radians(-123), -(np.pi - 1e-5), math.radians(-100),
               -(np.pi - 1e-5)],
        upper=[np.pi - 1e-5, math.radians(114), math.radians(92), np.pi - 1e-5, math.radians(123), np.pi - 1e-5],
        vel=[np.pi] * 6, acc=None, jerk=None, home=[0.0] * 6,
        finger=("left_finger", 0.015, 0.037), mimic=("right_finger", -1.0),
        base="wx250s/base_link", tcp="wx250s/ee_gripper_link", arm="wx250s/arm_controller",
        states="wx250s/joint_states", delta="target"),
}


def urdf_tree(name: str) -> ET.Element:
    return ET.parse(load_robot(name).urdf).getroot()


def urdf_joints(root: ET.Element) -> dict[str, ET.Element]:
    return {j.get("name"): j for j in root.findall("joint")}


# ------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ROBOTS)
def test_config_matches_published_values(name):
    cfg, exp = load_robot(name), EXPECTED[name]
    assert cfg.name == name and cfg.arm_joints == exp["joints"]
    assert np.allclose(cfg.position_min, exp["lower"], atol=1e-12)
    assert np.allclose(cfg.position_max, exp["upper"], atol=1e-12)
    assert np.allclose(cfg.velocity_max, exp["vel"], atol=1e-12)
    if exp["acc"] is not None:
        assert np.allclose(cfg.acceleration_max, exp["acc"])
        assert np.allclose(cfg.jerk_max, exp["jerk"])
    else:  # WidowX: no published acceleration / jerk; a conservative project choice and no jerk limit
        assert np.all(cfg.acceleration_max > 0) and np.all(cfg.acceleration_max <= 5.0)
        assert cfg.jerk_max is None
    assert np.allclose(cfg.home, exp["home"], atol=1e-12)
    g = cfg.gripper
    assert (g.joint, g.closed, g.open) == exp["finger"]
    assert g.mimic_joints == (exp["mimic"][0],) and g.mimic_multipliers == (exp["mimic"][1],)
    assert 0 < g.velocity_max <= 0.2
    assert (cfg.base_link, cfg.tcp_link, cfg.arm_controller) == (exp["base"], exp["tcp"], exp["arm"])
    assert cfg.joint_states_topic == exp["states"] and cfg.delta_mode == exp["delta"]
    # Relative names so that a namespace per arm works.
    for topic in (cfg.arm_controller, cfg.forward_controller, cfg.gripper_controller, cfg.joint_states_topic):
        assert topic and not topic.startswith("/")
    assert cfg.urdf.is_file() and cfg.urdf.name == f"{name}.urdf"


def test_gripper_normalized_mapping():
    g = load_robot("wx250s").gripper
    assert g.from_normalized(0.0) == pytest.approx(0.015)
    assert g.from_normalized(1.0) == pytest.approx(0.037)
    assert g.from_normalized(0.5) == pytest.approx(0.026)
    assert g.from_normalized(7.0) == pytest.approx(0.037) and g.from_normalized(-3) == pytest.approx(0.015)
    for n in np.linspace(0, 1, 11):
        assert g.to_normalized(g.from_normalized(n)) == pytest.approx(n)
    f = load_robot("fr3").gripper
    assert f.from_normalized(1.0) * 2 == pytest.approx(0.08)  # Franka width 0-0.08 m, per finger 0-0.04 m


def test_fr3_position_dependent_velocity_limits_agree_with_position_limits():
    cfg = load_robot("fr3")
    pdv = cfg.position_dependent_velocity
    assert pdv is not None and load_robot("panda").position_dependent_velocity is None
    mid = (cfg.position_min + cfg.position_max) / 2
    lo, up = pdv.bounds(mid, cfg.velocity_max)
    assert np.allclose(up, cfg.velocity_max) and np.allclose(lo, -cfg.velocity_max)  # full speed mid-range
    # At the ready pose joint 2 (-pi/4) is close enough to its lower limit to be slowed downwards:
    # libfranka: max(-2.62, min(0, 0.20 - sqrt(5.17 * (q + 1.79180)))).
    lo, up = pdv.bounds(cfg.home, cfg.velocity_max)
    assert lo[1] == pytest.approx(0.20 - math.sqrt(5.17 * (-math.pi / 4 + 1.79180)))
    assert up[1] == pytest.approx(2.62)
    # At the datasheet position limits (just inside libfranka's q_upper / q_lower) the velocity further
    # out is (nearly) zero: < 0.005 rad/s, e.g. joint 2: -0.2 + sqrt(5.17 * (1.7918 - 1.7837)) = 0.0046.
    lo, up = pdv.bounds(cfg.position_max, cfg.velocity_max)
    assert np.all(up >= 0) and np.all(up < 0.005) and np.allclose(lo, -cfg.velocity_max)
    lo, up = pdv.bounds(cfg.position_min, cfg.velocity_max)
    assert np.all(lo <= 0) and np.all(lo > -0.005) and np.allclose(up, cfg.velocity_max)


# --------------------------------------------------------------------------------------- URDFs
@pytest.mark.parametrize("name", ROBOTS)
def test_urdf_limits_and_names_match_config(name):
    cfg = load_robot(name)
    root = urdf_tree(name)
    joints = urdf_joints(root)
    links = {link.get("name") for link in root.findall("link")}
    assert cfg.base_link in links and cfg.tcp_link in links
    assert not root.findall(".//mesh"), "URDFs must not reference mesh files"
    for i, jn in enumerate(cfg.arm_joints):
        j = joints[jn]
        assert j.get("type") == "revolute"
        lim = j.find("limit")
        assert float(lim.get("lower")) == pytest.approx(cfg.position_min[i], abs=1e-12)
        assert float(lim.get("upper")) == pytest.approx(cfg.position_max[i], abs=1e-12)
        assert float(lim.get("velocity")) == pytest.approx(cfg.velocity_max[i], abs=1e-12)
        assert float(lim.get("effort")) > 0
    g = cfg.gripper
    fj = joints[g.joint]
    assert fj.get("type") == "prismatic"
    lim = fj.find("limit")
    assert (float(lim.get("lower")), float(lim.get("upper"))) == pytest.approx((g.low, g.high))
    for mj, mult in zip(g.mimic_joints, g.mimic_multipliers):
        mimic = joints[mj].find("mimic")
        assert mimic is not None and mimic.get("joint") == g.joint
        assert float(mimic.get("multiplier", "1")) == mult
    # Every link that a joint moves has a plausible inertial (mass > 0, positive-definite inertia that
    # satisfies the triangle inequality, as simulators require).
    moving = {j.find("child").get("link") for j in joints.values() if j.get("type") != "fixed"}
    by_name = {link.get("name"): link for link in root.findall("link")}
    for ln in moving:
        inertial = by_name[ln].find("inertial")
        assert inertial is not None, ln
        assert 0 < float(inertial.find("mass").get("value")) < 5.0
        a = {k: float(v) for k, v in inertial.find("inertia").attrib.items()}
        eig = np.linalg.eigvalsh(np.array([[a["ixx"], a["ixy"], a["ixz"]], [a["ixy"], a["iyy"], a["iyz"]],
                                           [a["ixz"], a["iyz"], a["izz"]]]))
        assert eig[0] > 0 and eig[0] + eig[1] >= eig[2], (ln, eig)


@pytest.mark.parametrize("name", ["fr3", "panda"])
def test_franka_hand_frames(name):
    joints = urdf_joints(urdf_tree(name))
    hand = joints[f"{name}_hand_joint"].find("origin")
    assert [float(x) for x in hand.get("rpy").split()] == pytest.approx([0, 0, -np.pi / 4])
    tcp = joints[f"{name}_hand_tcp_joint"]
    assert tcp.find("parent").get("link") == f"{name}_hand"
    assert [float(x) for x in tcp.find("origin").get("xyz").split()] == pytest.approx([0, 0, 0.1034])
    flange = joints[f"{name}_joint8"].find("origin")
    assert [float(x) for x in flange.get("xyz").split()] == pytest.approx([0, 0, 0.107])


@pytest.mark.parametrize("name", ROBOTS)
def test_urdf_loads_in_mujoco(name):
    import mujoco

    cfg = load_robot(name)
    m = mujoco.MjModel.from_xml_string(cfg.urdf.read_text())
    d = mujoco.MjData(m)
    names = {m.joint(i).name for i in range(m.njnt)}
    assert set(cfg.arm_joints) | {cfg.gripper.joint, *cfg.gripper.mimic_joints} <= names
    assert m.neq >= 1  # the finger <mimic> became an equality constraint
    assert m.body(cfg.tcp_link).id > 0  # fixed TCP frame kept as a body
    for b in range(1, m.nbody):
        if m.body_dofnum[b] > 0:
            assert m.body_mass[b] > 0 and np.all(m.body_inertia[b] > 0), m.body(b).name
    # The home pose (gripper open) is free of self-collisions.
    for i, jn in enumerate(cfg.arm_joints):
        d.qpos[m.jnt_qposadr[m.joint(jn).id]] = cfg.home[i]
    d.qpos[m.jnt_qposadr[m.joint(cfg.gripper.joint).id]] = cfg.gripper.open
    for mj, mult in zip(cfg.gripper.mimic_joints, cfg.gripper.mimic_multipliers):
        d.qpos[m.jnt_qposadr[m.joint(mj).id]] = mult * cfg.gripper.open
    mujoco.mj_forward(m, d)
    assert d.ncon == 0, [(m.body(m.geom_bodyid[c.geom1]).name, m.body(m.geom_bodyid[c.geom2]).name)
                         for c in d.contact[: d.ncon]]
    # MuJoCo's TCP agrees with the kinematics core at home.
    from magma_ros.core.kinematics import Kinematics

    assert np.allclose(d.body(cfg.tcp_link).xpos, Kinematics(cfg).fk(cfg.home)[:3, 3], atol=1e-9)


# -------------------------------------------------------------------------------------- errors
def test_unknown_robot_names_valid_choices_in_one_line():
    with pytest.raises(ConfigError) as e:
        load_robot("panda2")
    msg = str(e.value)
    assert "\n" not in msg
    assert "'panda2'" in msg and "did you mean 'panda'" in msg
    assert all(r in msg for r in ROBOTS)


def _ros_yaml(tmp_path, text: str):
    p = tmp_path / "robot.yaml"
    p.write_text(text)
    return p


def _good_text() -> str:
    return data_path("config", "robots", "panda.yaml").read_text()


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda t: t + "\n  bad: [unclosed\n", "malformed YAML"),
        (lambda t: t.replace("/**:", "robot_params:"), "ros__parameters"),
        (lambda t: t.replace("    tcp_link: panda_hand_tcp", "    # tcp removed"), "tcp_link"),
        (lambda t: t.replace("velocity_max: [2.175, 2.175, 2.175,", "velocity_max: [2.175, 2.175,"),
         "velocity_max"),
        (lambda t: t.replace("home: [0.0, -0.7853981633974483", "home: [9.0, -0.7853981633974483"), "home"),
        (lambda t: t.replace("delta_mode: measured", "delta_mode: measurd"), "did you mean 'measured'"),
        (lambda t: t.replace("acceleration_max: [15.0,", "acceleration_max: [fast,"), "acceleration_max"),
    ],
)
def test_malformed_robot_yaml_is_a_one_line_config_error(tmp_path, mutate, needle):
    text = mutate(_good_text())
    assert text != _good_text()
    with pytest.raises(ConfigError) as e:
        load_robot(_ros_yaml(tmp_path, text))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_robot(tmp_path / "nope.yaml")


def test_unknown_keys_are_kept_in_extra():
    cfg = load_robot("wx250s")
    assert cfg.extra["sleep"] == [0.0, -1.80, 1.55, 0.0, 0.8, 0.0]  # Interbotix sleep pose
