"""The shipped controller and robot YAMLs agree: every topic the safety node emits has a controller."""

import pytest
import yaml

from magma_ros.core.paths import data_path
from magma_ros.core.robot import ROBOTS, load_robot


@pytest.mark.parametrize("name", ROBOTS)
def test_controller_yaml_defines_the_controllers_the_robot_yaml_names(name):
    robot = load_robot(name)
    params = yaml.safe_load(data_path("config", "controllers", f"{name}_controllers.yaml").read_text())
    cm = params["controller_manager"]["ros__parameters"]
    for ns, kind in ((robot.arm_controller, "joint_trajectory_controller/JointTrajectoryController"),
                     (robot.forward_controller, "forward_command_controller/ForwardCommandController"),
                     (robot.gripper_controller, "joint_trajectory_controller/JointTrajectoryController")):
        ctrl = ns.split("/")[-1]  # the wx250s controllers live under the robot's namespace
        assert cm[ctrl]["type"] == kind
        assert params[ctrl]["ros__parameters"]["joints"]
    assert params[robot.arm_controller.split("/")[-1]]["ros__parameters"]["joints"] == list(robot.arm_joints)
    assert params[robot.forward_controller.split("/")[-1]]["ros__parameters"]["joints"] == list(robot.arm_joints)
    assert params[robot.gripper_controller.split("/")[-1]]["ros__parameters"]["joints"] == [robot.gripper.joint]
