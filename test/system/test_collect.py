"""Data collection end to end in MuJoCo with a scripted gamepad (``magma-ros collect``'s code path).

launch/collect.launch.yaml under the project's runner: sim, safety, a scripted policy with its servo,
the teleop node with its servo, the recorder. The scripted operator publishes sensor_msgs/Joy: the
policy drives, the operator takes over (deadman + stick), releases, stops the episode (one attempt is
discarded), hands back to the policy. Then the outputs are checked by their own readers: LeRobot 0.4.4's
LeRobotDataset (second venv), mcap_ros2, and the policy's statistics loader on ``magma-ros stats``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import REPO, aux_python

READER = REPO / "test" / "data" / "lerobot_reader.py"
TELEOP_PERIOD = 0.1  # [s] collect.launch.yaml's teleop_period default (the teleop servo's step)
DELIVERY = 0.05  # [s] allowance for the difference in delivery of two topics to the recorder (see below)


@pytest.mark.slow
def test_collect_policy_takeover_record_discard(ros_env, rclpy_node, tmp_path):
    from mcap_ros2.reader import read_ros2_messages
    from sensor_msgs.msg import JointState
    from trajectory_msgs.msg import JointTrajectory

    from magma_ros.core.actions import load_stats
    from magma_ros.core.robot import load_robot
    from magma_ros.data.collect import CollectPlan, collect

    robot = load_robot("fr3")
    sent = []  # every joint state the simulator published (the values the dataset must hold)
    rclpy_node.create_subscription(JointState, "joint_states",
                                   lambda m: sent.append(np.array(m.position[:7], np.float32)), 100)
    commands = []  # every arm command the safety node sent to the controller
    rclpy_node.create_subscription(JointTrajectory, f"{robot.arm_controller}/joint_trajectory",
                                   lambda m: commands.append(np.array(m.points[0].positions, np.float32)), 100)
    out = tmp_path / "session"
    result, error = {}, []

    def run():
        try:
            result["r"] = collect(out, CollectPlan(episodes=3, discard=(1,), policy_seconds=1.5,
                                                   teleop_seconds=1.5), width=160, height=120)
        except BaseException as e:  # noqa: BLE001 - reported below
            error.append(e)

    th = threading.Thread(target=run)
    th.start()
    rclpy_node.spin_until(lambda: not th.is_alive(), timeout=600.0)
    th.join()
    assert not error, f"{error[0]} (logs: {out / 'logs'})"
    r = result["r"]
    ev = "\n".join(r.events)
    assert len(re.findall(r"attempt \d: saved", ev)) == 3 and len(re.findall(r"attempt \d: discarded", ev)) == 1, ev
    assert "source before takeover: policy" in ev, ev  # the policy was driving when the operator took over

    # --- LeRobot's own loader: frame counts and values equal what was sent
    got = subprocess.run([aux_python("lerobot"), str(READER), str(r.dataset)], capture_output=True, text=True,
                         timeout=900)
    assert got.returncode == 0, got.stderr[-3000:]
    ds = json.loads(got.stdout)
    lengths = [e["length"] for e in r.episodes]
    assert ds["num_episodes"] == 3 and [e["length"] for e in ds["episodes"]] == lengths
    assert ds["num_frames"] == sum(lengths) and all(n >= 10 for n in lengths), lengths  # plan: >= 5 + 5 frames
    assert ds["tasks"] == ["pick up the red block"]
    sent_arr, cmd_arr = np.stack(sent), np.stack(commands)
    sources = []
    for row in ds["frames"]:
        q = np.asarray(row["observation.state"][:7], np.float32)
        assert np.abs(sent_arr - q).max(1).min() == 0.0, "observation.state is not a joint state the sim sent"
        c = np.asarray(row["action.joints"][:7], np.float32)
        assert np.abs(cmd_arr - c).max(1).min() == 0.0, "action.joints is not a command the safety node sent"
        assert len(row["observation.images.color"]) == 3
        sources.append(row["safety.source"])
        assert bool(row["intervention"]) == (row["safety.source"] == 2)
    assert 1 in sources and 2 in sources  # policy frames and teleop frames were both recorded

    # --- MCAP bags (one per saved episode): takeover without a jump, source switch within one period
    bags = sorted(r.mcap.glob("*.mcap"))
    assert [b.name for b in bags] == [f"episode_{i:06d}.mcap" for i in range(3)]
    for bag in bags:
        last_q, first_teleop, jump, switch_t = None, None, None, None
        for m in read_ros2_messages(str(bag)):
            t = m.log_time_ns * 1e-9
            if m.channel.topic == "/joint_states":
                pos = dict(zip(m.ros_msg.name, m.ros_msg.position))
                last_q = np.array([pos[n] for n in robot.arm_joints])
            elif m.channel.topic == "/teleop/joint_command" and first_teleop is None and m.ros_msg.points:
                first_teleop = t
                cmd = dict(zip(m.ros_msg.joint_names, m.ros_msg.points[0].positions))
                jump = np.abs(np.array([cmd[n] for n in robot.arm_joints]) - last_q).max()
            elif m.channel.topic == "/safety/source" and m.ros_msg.data == "teleop" and switch_t is None:
                switch_t = t  # (DDS does not order topics: it may arrive before the command that caused it)
        assert first_teleop is not None and switch_t is not None, bag
        assert jump < 0.03, f"{bag.name}: teleop's first command is {jump:.3f} rad from the measured joints"
        late = abs(switch_t - first_teleop)
        # one teleop period, plus DELIVERY: these are the recorder's receive times of two topics from two
        # processes, which a loaded 2-core machine delivers up to a few tens of ms apart
        assert late <= TELEOP_PERIOD + DELIVERY, \
            f"{bag.name}: source switched {late:.3f} s from the first teleop command"

    # --- statistics in the policy's format
    stats = tmp_path / "stats.json"
    p = subprocess.run([sys.executable, "-m", "magma_ros.cli", "stats", str(r.dataset), "--out", str(stats)],
                       capture_output=True, text=True, env=ros_env, cwd=REPO)
    assert p.returncode == 0, p.stderr
    s = load_stats(str(stats))
    assert s.step_period == 0.2 and s.name == "lerobot"
    assert np.all(s.q99[:6] >= s.q01[:6]) and np.any(s.q99[:3] > 0)
