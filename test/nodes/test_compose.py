"""nodes/compose.py: several nodes in one process on one executor, and the launch option compose:=true."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from magma_ros.core.errors import ConfigError
from magma_ros.core.robot import load_robot
from magma_ros.launch_runner import plan
from magma_ros.nodes.compose import parse_names


def test_node_names_come_before_the_ros_args_and_are_checked():
    assert parse_names(["sim", "safety,servo", "--ros-args", "-p", "robot:=fr3"]) == ["sim", "safety", "servo"]
    for bad in ([], ["--ros-args", "sim"], ["sim", "simm"], ["sim", "sim"]):
        with pytest.raises(ConfigError):
            parse_names(bad)


def test_launch_option_compose_runs_the_same_nodes_in_one_process():
    args = {"policy": "scripted", "scripted_actions": "0,0,0,0,0,0,1", "image_topic": "bench/image_raw"}
    apart = plan("sim.launch.yaml", dict(args, compose="false")).processes
    assert [p.label for p in apart] == ["sim", "safety", "servo", "policy"]  # the default is unchanged
    (one,) = plan("sim.launch.yaml", dict(args, compose="true")).processes
    i = one.cmd.index("--ros-args")
    assert one.cmd[i - 5:i] == ["magma_ros.nodes.compose", "policy", "sim", "safety", "servo"]
    ros = one.cmd[i:]
    assert not any(a.startswith("__node:=") for a in ros)  # renaming would give all nodes one name
    assert "policy:camera/camera/color/image_raw:=bench/image_raw" in ros  # only the policy's input moves
    # every parameter the separate nodes get, the composed process gets too (same values)
    params = {k: v for p in apart for k, v in p.parameters.items()}
    assert params == one.parameters
    (no_policy,) = plan("sim.launch.yaml", {"compose": "true", "with_policy": "false"}).processes
    assert no_policy.cmd[no_policy.cmd.index("--ros-args") - 2:][:2] == ["sim", "safety"]


@pytest.mark.slow
def test_composed_graph_drives_the_arm_with_one_clock_subscription(ros_env, rclpy_node, tmp_path):
    from trajectory_msgs.msg import JointTrajectory

    robot = load_robot("fr3")
    params = {"robot": "fr3", "controller": "jtc", "use_sim_time": "true", "policy": "scripted",
              "scripted_actions": "0.01,0,0,0,0,0,1; -0.01,0,0,0,0,0,1", "scripted_loop": "true",
              "step_period": "0.2", "camera_fps": "5.0", "width": "160", "height": "120", "instruction": "push"}
    cmd = [sys.executable, "-m", "magma_ros.nodes.compose", "sim", "safety", "servo", "policy", "--ros-args"]
    for k, v in params.items():
        cmd += ["-p", f"{k}:={v}"]
    log = tmp_path / "compose.log"
    proc = subprocess.Popen(cmd, env=ros_env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    cmds: list[np.ndarray] = []

    def on_traj(m):
        names = list(m.joint_names)
        cmds.append(np.array([m.points[0].positions[names.index(j)] for j in robot.arm_joints]))

    rclpy_node.create_subscription(JointTrajectory, f"{robot.arm_controller}/joint_trajectory", on_traj, 50)
    try:
        moved = rclpy_node.spin_until(
            lambda: len(cmds) > 1 and np.abs(cmds[-1] - cmds[0]).max() > 1e-3 or proc.poll() is not None, 180)
        assert moved and proc.poll() is None, log.read_text()[-4000:]
        # sim, safety, servo and policy follow /clock through one shared subscription
        assert rclpy_node.count_subscribers("/clock") == 1, log.read_text()[-4000:]
        assert rclpy_node.count_publishers(f"{robot.arm_controller}/joint_trajectory") == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, log.read_text()[-4000:]  # a clean shutdown of every node
