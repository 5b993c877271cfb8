"""launch/teleop.launch.yaml as the project's launch runner resolves it (no processes started)."""

from __future__ import annotations

import pytest

from magma_ros.core.errors import ConfigError
from magma_ros.launch_runner import plan


def _by_name(p):
    return {s.node_name: s for s in p.processes}


@pytest.mark.parametrize("device, driver", [("xbox", "joy_node"), ("ps5", "joy_node"), ("ps4", "joy_node"),
                                            ("spacemouse", "spacenav")])
def test_teleop_and_its_servo_are_wired_to_the_teleop_topics(device, driver):
    args = {"device": device, "robot": "wx250s", "period": "0.05", "namespace": "arm1", "use_sim_time": "true"}
    # the device driver's package (joy / spacenav) is not installed here: an error, as under ros2 launch
    with pytest.raises(ConfigError, match=f"package '{'joy' if driver == 'joy_node' else 'spacenav'}' not found"):
        plan("teleop.launch.yaml", args)
    p = plan("teleop.launch.yaml", dict(args, driver="false"))
    nodes = _by_name(p)
    teleop, servo = nodes["teleop"], nodes["teleop_servo"]
    assert teleop.parameters == {"device": device, "robot": "wx250s", "period": 0.05, "use_sim_time": True}
    # the servo node, remapped: teleop/ee_twist + teleop/gripper in, teleop/joint_command out
    assert servo.executable == "magma_ros_servo" and teleop.executable == "magma_ros_teleop"
    assert dict(servo.remaps) == {"magma/ee_twist": "teleop/ee_twist", "magma/gripper": "teleop/gripper",
                                  "magma/joint_command": "teleop/joint_command"}
    # one value for the teleop period and the servo's step, and every step from the measured pose
    assert servo.parameters["step_period"] == 0.05 and servo.parameters["delta_mode"] == "measured"
    assert teleop.namespace == servo.namespace == "/arm1"


def test_keyboard_starts_only_the_servo_and_says_what_to_run():
    p = plan("teleop.launch.yaml", {"device": "keyboard", "robot": "fr3"})
    assert set(_by_name(p)) == {"teleop_servo"} and not p.skipped
    assert any("magma_ros_teleop --ros-args -p device:=keyboard -p robot:=fr3" in m for m in p.messages), p.messages


def test_driver_false_starts_no_driver():
    p = plan("teleop.launch.yaml", {"device": "xbox", "driver": "false"})
    assert set(_by_name(p)) == {"teleop", "teleop_servo"} and not p.skipped
