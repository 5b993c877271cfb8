"""``kill -9`` of the recorder mid-episode: every finished episode still opens with LeRobot's own loader,
the killed episode is reported incomplete and the next session appends after the last finished one."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest
from conftest import REPO, aux_python

READER = REPO / "test" / "data" / "lerobot_reader.py"


@pytest.mark.slow
def test_kill_recorder_mid_episode(nodes, rclpy_node, tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "test" / "nodes"))
    from test_recorder_node import State, call

    from magma_ros.data.lerobot import read_frames, read_info

    out = tmp_path / "session"
    params = {"robot": "fr3", "out": str(out), "width": 160, "height": 120, "instruction": "stack the cups",
              "use_sim_time": True}
    nodes.start("sim", {"robot": "fr3", "controller": "jtc", "width": 160, "height": 120, "camera_fps": 10.0})
    nodes.start("safety", {"robot": "fr3", "use_sim_time": True})
    rec = nodes.start("recorder", params)
    st = State(rclpy_node)
    assert call(rclpy_node, "recorder/start").success
    assert rclpy_node.spin_until(lambda: st.frames() >= 6, 90.0), (st.text, nodes.dump())
    r = call(rclpy_node, "recorder/stop")
    n0 = int(re.match(r"episode 0 saved: (\d+) frames", r.message).group(1))
    assert call(rclpy_node, "recorder/start").success
    assert rclpy_node.spin_until(lambda: st.frames() >= 6, 90.0), st.text
    nodes.stop(rec, sig=signal.SIGKILL)
    assert rec.returncode == -signal.SIGKILL

    root = out / "lerobot"
    got = subprocess.run([aux_python("lerobot"), str(READER), str(root)], capture_output=True, text=True,
                         timeout=900)
    assert got.returncode == 0, got.stderr[-3000:]
    ds = json.loads(got.stdout)
    assert ds["num_episodes"] == 1 and ds["num_frames"] == n0 and len(ds["frames"]) == n0
    assert [f["frame_index"] for f in ds["frames"]] == list(range(n0))
    assert list((out / "mcap").glob("episode_000001.mcap.partial"))  # the killed bag says it is incomplete

    rec2 = nodes.start("recorder", dict(params, resume=True))
    st2 = State(rclpy_node)
    assert rclpy_node.spin_until(lambda: st2.text.startswith("idle: next episode 1"), 60.0), nodes.log(rec2)
    assert "episode 1 of an earlier session is INCOMPLETE" in nodes.log(rec2)
    assert call(rclpy_node, "recorder/start").success
    assert rclpy_node.spin_until(lambda: st2.frames() >= 3, 90.0), st2.text
    r = call(rclpy_node, "recorder/stop")
    assert r.success and r.message.startswith("episode 1 saved"), r.message
    assert read_info(root)["total_episodes"] == 2
    f = read_frames(root)
    assert int((f["episode_index"] == 0).sum()) == n0
