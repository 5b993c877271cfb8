"""The recorder's session core without ROS: the episode cycle, and a write error mid-episode."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from conftest import REPO

from magma_ros.data.episode import Sample
from magma_ros.data.lerobot import read_frames, read_info
from magma_ros.data.session import RecorderConfig, RecorderCore

JOINTS = [f"j{i}" for i in range(7)]


def sample(i: int, rgb=None) -> Sample:
    pose = np.eye(4)
    pose[2, 3] = 0.5 - 0.001 * i
    values = {"observation.images.color": rgb if rgb is not None else np.full((24, 32, 3), i % 250, np.uint8),
              "observation.state": np.full(8, i, np.float32), "observation.ee_pose": np.zeros(7, np.float32),
              "action.joints": np.full(8, i, np.float32), "teleop.intent": np.zeros(7, np.float32),
              "safety.source": 2 if i >= 5 else 1, "intervention": i >= 5, "observation.stamp": 0.1 * i}
    return Sample(values, pose, 1.0)


def core(out: Path, **kw) -> RecorderCore:
    cfg = RecorderConfig(out=str(out), width=32, height=24, instruction="wipe the table", **kw)
    return RecorderCore(cfg, JOINTS, "fr3")


def test_episode_cycle(tmp_path):
    c = core(tmp_path)
    assert c.stop() == (False, "not recording")
    ok, msg = c.start()
    assert ok and "episode 0" in msg
    assert not c.start()[0]  # one episode at a time
    for i in range(10):
        c.add(sample(i))
    assert c.state_text(1.0).startswith("recording episode 0: 10 frames")
    ok, msg = c.stop()
    assert ok and msg.startswith("episode 0 saved: 10 frames"), msg
    assert c.start()[0]
    c.add(sample(0))
    assert c.discard() == (True, "episode 1 discarded")
    assert c.state_text(2.0).startswith("idle: next episode 1")
    f = read_frames(tmp_path / "lerobot")
    assert list(f["frame_index"]) == list(range(10))
    np.testing.assert_allclose(f["action"][:8, 2], -0.002, atol=1e-7)  # dz over 2 frames (step_period 0.2 s)
    assert list(f["intervention"]) == [False] * 5 + [True] * 5
    assert sorted(p.name for p in (tmp_path / "mcap").iterdir()) == ["episode_000000.mcap"]
    assert read_info(tmp_path / "lerobot")["magma_ros"]["step_period"] == 0.2


SCRIPT = """
import resource, signal, sys
import numpy as np
from pathlib import Path
sys.path[:0] = [{here!r}, {test_root!r}]
from test_session import core, sample
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
c = core(Path({out!r}))
c.start(); [c.add(sample(i)) for i in range(6)]; print("STOP0", c.stop())
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))
rng = np.random.default_rng(0)
c.start()
for i in range(3000):
    c.add(sample(i, rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)))
    if c.error:
        break
print("STATE", c.state_text(0.0))
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
c.start(); [c.add(sample(i)) for i in range(4)]; print("STOP1", c.stop())
"""


def test_write_error_stops_the_episode_and_the_next_one_records(tmp_path):
    """Files that cannot grow (EFBIG under RLIMIT_FSIZE, as ENOSPC on a full disk): the episode ends with one
    line naming the file, the saved episode stays, and once there is room the next episode records."""
    code = textwrap.dedent(SCRIPT).format(here=str(Path(__file__).parent), test_root=str(REPO / "test"),
                                          out=str(tmp_path))
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = dict(ln.split(" ", 1) for ln in p.stdout.splitlines() if ln.split(" ", 1)[0] in ("STOP0", "STATE", "STOP1"))
    assert "episode 0 saved: 6 frames" in lines["STOP0"]
    assert lines["STATE"].startswith("error: recording stopped: cannot write") and str(tmp_path) in lines["STATE"]
    assert "episode 1 saved: 4 frames" in lines["STOP1"], lines
    info = read_info(tmp_path / "lerobot")
    assert info["total_episodes"] == 2 and info["total_frames"] == 10
