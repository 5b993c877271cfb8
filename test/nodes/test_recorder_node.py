"""Recorder node over DDS beside the MuJoCo sim and the safety node: services, latched state, the files."""

from __future__ import annotations

import re
import signal

import pytest
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String
from std_srvs.srv import Trigger

from magma_ros.data.lerobot import read_frames, read_info

WAIT = 60.0
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def call(node, name: str, timeout: float = 60.0):
    """Call a std_srvs/Trigger service; returns the response."""
    cli = node.create_client(Trigger, name)
    assert node.spin_until(cli.service_is_ready, WAIT), f"service {name} not available"
    fut = cli.call_async(Trigger.Request())
    assert node.spin_until(fut.done, timeout), f"{name}: no reply"
    return fut.result()


class State:
    """Latest recorder/state text."""

    def __init__(self, node):
        self.text = ""
        node.create_subscription(String, "recorder/state", self._on, LATCHED)

    def _on(self, m):
        self.text = m.data

    def frames(self) -> int:
        m = re.match(r"recording episode \d+: (\d+) frames", self.text)
        return int(m.group(1)) if m else -1


def test_record_discard_record(nodes, rclpy_node, tmp_path):
    """Two saved episodes (one discarded between them): dataset frames = what stop reported; bags open."""
    from mcap_ros2.reader import read_ros2_messages

    out = tmp_path / "session"
    sim = nodes.start("sim", {"robot": "fr3", "controller": "jtc", "width": 160, "height": 120, "camera_fps": 10.0})
    nodes.start("safety", {"robot": "fr3", "use_sim_time": True})
    rec = nodes.start("recorder", {"robot": "fr3", "out": str(out), "width": 160, "height": 120, "fps": 10,
                                   "step_period": 0.2, "instruction": "pick up the red block", "use_sim_time": True})
    st = State(rclpy_node)
    assert rclpy_node.spin_until(lambda: st.text.startswith("idle"), WAIT), nodes.dump()
    saved = []
    for action in ("stop", "discard", "stop"):
        r = call(rclpy_node, "recorder/start")
        assert r.success, r.message
        assert rclpy_node.spin_until(lambda: st.frames() >= 8, WAIT), (st.text, nodes.log(rec), nodes.log(sim))
        r = call(rclpy_node, f"recorder/{action}")
        assert r.success, r.message
        if action == "stop":
            m = re.match(r"episode (\d+) saved: (\d+) frames", r.message)
            assert m, r.message
            saved.append((int(m.group(1)), int(m.group(2))))
        else:
            assert "discarded" in r.message
    assert [e for e, _ in saved] == [0, 1]
    r = call(rclpy_node, "recorder/stop")
    assert not r.success and "not recording" in r.message

    root = out / "lerobot"
    info = read_info(root)
    assert info["total_episodes"] == 2 and info["total_frames"] == sum(n for _, n in saved)
    f = read_frames(root)
    for e, n in saved:
        assert int((f["episode_index"] == e).sum()) == n
    assert f["observation.state"].shape[1] == 8 and f["action"].shape[1] == 7
    assert (f["safety.source"] == 0).all()  # nothing drove the arm: the safety node held
    bags = sorted(p.name for p in (out / "mcap").iterdir())
    assert bags == ["episode_000000.mcap", "episode_000001.mcap"]
    topics = {m.channel.topic for m in read_ros2_messages(str(out / "mcap" / "episode_000001.mcap"))}
    assert {"/joint_states", "/camera/camera/color/image_raw", "/safety/source"} <= topics, topics
    # a late subscriber gets the state (transient local)
    late = State(rclpy_node)
    assert rclpy_node.spin_until(lambda: late.text.startswith("idle: next episode 2"), 10.0), late.text
    # Ctrl-C of the node while recording saves the episode (a clean exit loses nothing)
    assert call(rclpy_node, "recorder/start").success
    assert rclpy_node.spin_until(lambda: late.frames() >= 4, WAIT), late.text
    nodes.stop(rec, sig=signal.SIGINT, timeout=60.0)
    assert rec.returncode == 0, nodes.log(rec)
    assert "shutdown: episode 2 saved" in nodes.log(rec)
    assert read_info(root)["total_episodes"] == 3


@pytest.mark.parametrize("out", ["/proc/magma_ros_unwritable"])
def test_unwritable_path_one_line_error(nodes, rclpy_node, out):
    """An unwritable output path: start fails with one line naming the path; the node keeps running."""
    rec = nodes.start("recorder", {"robot": "fr3", "out": out, "instruction": "x"})
    r = call(rclpy_node, "recorder/start")
    assert not r.success
    assert out in r.message and "\n" not in r.message, r.message
    assert rec.poll() is None, nodes.log(rec)
    r = call(rclpy_node, "recorder/discard")
    assert not r.success and "not recording" in r.message
