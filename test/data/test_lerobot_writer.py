"""LeRobot v3.0 writer: the format LeRobot's own loader reads, resume, crash recovery, write errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, aux_python

from magma_ros.core.errors import ConfigError
from magma_ros.data.lerobot import DatasetIOError, LeRobotWriter, read_frames, read_info

READER = Path(__file__).with_name("lerobot_reader.py")
FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [3], "names": ["j1", "j2", "gripper"]},
    "action": {"dtype": "float32", "shape": [7], "names": None},
    "safety.source": {"dtype": "int64", "shape": [1], "names": None},
    "intervention": {"dtype": "bool", "shape": [1], "names": None},
    "observation.images.color": {"dtype": "video", "shape": [48, 64, 3], "names": None},
}
H, W = 48, 64


def frame(ep: int, i: int) -> dict:
    """A frame whose values encode (episode, frame): checkable after a round trip."""
    return {"observation.state": [ep, i, 0.25 * i],
            "action": [0.001 * i, -0.002 * i, 0.003, 0.01, -0.02, 0.03 * ep, i % 2],
            "safety.source": i % 3, "intervention": i % 3 == 2,
            "observation.images.color": np.full((H, W, 3), (40 * ep + 7 * i) % 250, np.uint8)}


def record(w: LeRobotWriter, ep: int, n: int, task: str) -> dict:
    st = w.begin_episode(task)
    for i in range(n):
        st.add_frame(frame(ep, i))
    st.finish()
    return w.commit(st)


def writer(root: Path, resume: bool = False, **kw) -> LeRobotWriter:
    return LeRobotWriter(root, 10, FEATURES, robot_type="fr3", resume=resume,
                         extra_info={"magma_ros": {"step_period": 0.2}}, **kw)


def lerobot_read(root: Path) -> dict:
    """Open the dataset with LeRobot 0.4.4's LeRobotDataset (second venv) -> its JSON dump."""
    out = subprocess.run([aux_python("lerobot"), str(READER), str(root)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def check_against_sent(got: dict, episodes: list[tuple[int, int, str]]) -> None:
    """Every frame LeRobot returns equals what was sent (video within codec error)."""
    assert got["num_episodes"] == len(episodes)
    assert got["num_frames"] == sum(n for _, n, _ in episodes)
    assert [e["length"] for e in got["episodes"]] == [n for _, n, _ in episodes]
    k = 0
    for idx, (ep_sent, n, task) in enumerate(episodes):
        for i in range(n):
            row, sent = got["frames"][k], frame(ep_sent, i)
            assert row["episode_index"] == idx and row["frame_index"] == i and row["index"] == k
            assert row["task"] == task
            assert row["timestamp"] == pytest.approx(i / 10, abs=1e-6)
            np.testing.assert_allclose(row["observation.state"], sent["observation.state"], rtol=1e-6)
            np.testing.assert_allclose(row["action"], np.float32(sent["action"]), rtol=1e-6)
            assert row["safety.source"] == sent["safety.source"]
            assert bool(row["intervention"]) == sent["intervention"]
            assert np.allclose(row["observation.images.color"], sent["observation.images.color"][0, 0, 0], atol=3)
            k += 1


def test_format_resume_and_lerobot_loader(tmp_path):
    """Two sessions (the second resumes): the layout LeRobot documents, and its loader reads every value."""
    root = tmp_path / "ds"
    w = writer(root)
    r0 = record(w, 0, 12, "pick the can")
    r1 = record(w, 1, 7, "open the drawer")
    w2 = writer(root, resume=True)
    assert w2.total_episodes == 2 and w2.recovered == []
    r2 = record(w2, 2, 9, "pick the can")

    info = read_info(root)
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10 and info["robot_type"] == "fr3"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, 28, 2)
    assert info["splits"] == {"train": "0:3"}
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    vf = info["features"]["observation.images.color"]
    assert vf["dtype"] == "video" and vf["shape"] == [H, W, 3] and vf["info"]["video.codec"] == "h264"
    for k in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert k in info["features"]
    assert info["magma_ros"] == {"step_period": 0.2}
    for rel in ("meta/stats.json", "meta/tasks.parquet", "meta/episodes/chunk-000/file-000.parquet",
                "data/chunk-000/file-000.parquet", "videos/observation.images.color/chunk-000/file-000.mp4"):
        assert (root / rel).is_file(), rel
    # data columns: fixed-size float32 vectors (datasets' Sequence(length=n)), int64 indices
    sch = pq.read_schema(root / "data/chunk-000/file-000.parquet")
    assert sch.field("observation.state").type == pa.list_(pa.float32(), 3)
    assert sch.field("index").type == pa.int64() and sch.field("timestamp").type == pa.float32()
    # episodes: one video file, each episode starting where the previous ended
    eps = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["dataset_from_index"] for e in eps] == [0, 12, 19]
    key = "videos/observation.images.color"
    assert [e[f"{key}/from_timestamp"] for e in eps] == pytest.approx([0.0, 1.2, 1.9])
    assert [e[f"{key}/to_timestamp"] for e in eps] == pytest.approx([1.2, 1.9, 2.8])
    assert eps[1]["stats/observation.state/max"] == pytest.approx([1.0, 6.0, 1.5])
    assert np.asarray(eps[0]["stats/observation.images.color/mean"]).shape == (3, 1, 1)
    assert r0["episode_index"] == 0 and r1["episode_index"] == 1 and r2["dataset_to_index"] == 28
    stats = json.loads((root / "meta/stats.json").read_text())
    assert stats["observation.state"]["count"] == [28]
    assert stats["observation.state"]["max"] == pytest.approx([2.0, 11.0, 2.75])

    got = lerobot_read(root)
    assert got["tasks"] == ["pick the can", "open the drawer"]
    check_against_sent(got, [(0, 12, "pick the can"), (1, 7, "open the drawer"), (2, 9, "pick the can")])


def test_resume_rules(tmp_path):
    root = tmp_path / "ds"
    record(writer(root), 0, 3, "t")
    with pytest.raises(ConfigError, match="already exists"):
        writer(root)
    other = dict(FEATURES, extra={"dtype": "float32", "shape": [2], "names": None})
    with pytest.raises(ConfigError, match="features differ.*extra"):
        LeRobotWriter(root, 10, other, resume=True)
    with pytest.raises(ConfigError, match="15 fps"):
        LeRobotWriter(root, 15, FEATURES, resume=True)


def test_discard_leaves_dataset_unchanged(tmp_path):
    root = tmp_path / "ds"
    w = writer(root)
    record(w, 0, 4, "t")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and ".staging" not in p.parts}
    st = w.begin_episode("t")
    st.add_frame(frame(1, 0))
    st.discard()
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and ".staging" not in p.parts}
    assert before == after and not list((root / ".staging").glob("episode-*"))
    assert record(w, 1, 2, "t")["episode_index"] == 1


def test_file_rollover_at_size_limit(tmp_path):
    """Past the size limits the next episode starts new data/video files, as LeRobot does."""
    root = tmp_path / "ds"
    w = writer(root, data_files_size_in_mb=1e-9, video_files_size_in_mb=1e-9)
    record(w, 0, 3, "t")
    r = record(w, 1, 3, "t")
    assert (r["data/file_index"], r["videos/observation.images.color/file_index"]) == (1, 1)
    assert r["videos/observation.images.color/from_timestamp"] == 0.0
    f = read_frames(root)
    assert list(f["index"]) == list(range(6))


SCRIPT = """
import os, signal, sys
import numpy as np
sys.path[:0] = [{test_dir!r}, {test_root!r}]
from test_lerobot_writer import writer, record, frame
from pathlib import Path
root = Path({root!r})
w = writer(root)
record(w, 0, 6, "done")
st = w.begin_episode("killed")
for i in range(5):
    st.add_frame(frame(1, i))
{before_kill}
os.kill(os.getpid(), signal.SIGKILL)
"""


def run_and_kill(root: Path, before_kill: str = "st.sync()") -> None:
    code = textwrap.dedent(SCRIPT).format(test_dir=str(Path(__file__).parent), root=str(root),
                                          test_root=str(Path(__file__).parent.parent), before_kill=before_kill)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]


def test_kill_mid_episode_loses_only_that_episode(tmp_path):
    """SIGKILL while recording: the finished episode is intact as the kill left it (LeRobot's loader on a
    killed recorder: test/system/test_collect_kill.py); the killed one is reported incomplete on the next
    open and never enters the dataset."""
    root = tmp_path / "ds"
    run_and_kill(root)
    assert read_info(root)["total_episodes"] == 1
    f = read_frames(root)
    assert list(f["frame_index"]) == list(range(6)) and (f["episode_index"] == 0).all()
    w = writer(root, resume=True)
    assert [(s.state, s.episode_index, s.frames) for s in w.recovered] == [("recording", 1, 5)]
    assert w.incomplete() and w.total_episodes == 1
    assert record(w, 1, 2, "next")["episode_index"] == 1
    assert read_info(root)["total_episodes"] == 2


def test_kill_after_finish_is_committed_on_recovery(tmp_path):
    """A stage that was finished (stop requested) but not committed when killed is saved, not lost."""
    root = tmp_path / "ds"
    run_and_kill(root, before_kill="st.finish()")
    w = writer(root, resume=True)
    assert [(s.state, s.episode_index, s.frames) for s in w.recovered] == [("stopped", 1, 5)]
    assert read_info(root)["total_episodes"] == 2
    assert list(read_frames(root)["frame_index"]) == [*range(6), *range(5)]


def test_kill_inside_commit_is_replayed(tmp_path):
    """SIGKILL between the renames of a commit: the journal (COMMIT.json) completes it on recovery."""
    root = tmp_path / "ds"
    kill_on_second_rename = textwrap.dedent("""
        import magma_ros.data.lerobot as L
        real, calls = os.replace, []
        def replace(a, b):
            calls.append(b)
            if len(calls) == 4:  # manifest, COMMIT.json, the data file: killed before the video's rename
                os.kill(os.getpid(), signal.SIGKILL)
            return real(a, b)
        L.os.replace = replace
        st.finish()
        w.commit(st)
    """)
    run_and_kill(root, before_kill=kill_on_second_rename)
    assert list((root / ".staging").glob("commit-*/COMMIT.json"))
    w = writer(root, resume=True)
    assert [s.state for s in w.recovered] == ["committing"]
    info = read_info(root)
    assert info["total_episodes"] == 2 and info["total_frames"] == 11
    f = read_frames(root)
    assert list(f["episode_index"]) == [0] * 6 + [1] * 5


def test_unwritable_path_is_one_line_naming_it():
    with pytest.raises(DatasetIOError) as e:
        writer(Path("/proc/magma_ros_nope/ds"))
    msg = str(e.value)
    assert "/proc/magma_ros_nope/ds" in msg and "\n" not in msg


DISK_FULL = """
import resource, signal, sys
from pathlib import Path
import numpy as np
sys.path[:0] = [{test_dir!r}, {test_root!r}]
from test_lerobot_writer import writer, record, frame
from magma_ros.data.lerobot import DatasetIOError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # then writes past the limit fail with EFBIG
w = writer(Path({root!r}))
record(w, 0, 5, "small")
resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))
rng = np.random.default_rng(0)
st = w.begin_episode("big")
try:
    for i in range(2000):
        f = frame(1, i)
        f["observation.images.color"] = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        st.add_frame(f)
    st.finish()
    w.commit(st)
except DatasetIOError as e:
    print("ERROR", e)
"""


def test_disk_full_stops_with_the_path_and_keeps_finished_episodes(tmp_path):
    """Files that cannot grow (RLIMIT_FSIZE: EFBIG, as ENOSPC on a full disk): one error line naming the
    file; the finished episode is intact."""
    root = tmp_path / "ds"
    code = textwrap.dedent(DISK_FULL).format(test_dir=str(Path(__file__).parent), root=str(root),
                                             test_root=str(Path(__file__).parent.parent))
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("ERROR")]
    assert p.returncode == 0 and len(lines) == 1, p.stdout + p.stderr[-3000:]
    assert str(root / ".staging") in lines[0], lines[0]
    info = read_info(root)
    assert info["total_episodes"] == 1 and info["total_frames"] == 5
    assert list(read_frames(root)["frame_index"]) == list(range(5))
